"""Which Hugging Face hub datasets a deployment opens: the value of SELPRUNE_HUB_DATASETS.

The gateway and the worker read the same variable, so the gateway refuses a disallowed reference up
front (422) and the worker refuses it again when it resolves the job's datasets. The value is one of

* ``off`` (the default): no hub datasets. Streaming a dataset makes the worker fetch and cache whatever
  a tenant names, so an operator opts in;
* ``any``: every well-formed hub id;
* a comma-separated list of exact ids (``allenai/c4,wikitext``): those and no others. Ids compare
  exactly, case included, so a variant spelling is refused rather than guessed at.
"""

from __future__ import annotations

from protocol.constants import HUB_ID_PATTERN, PACKAGED_BUILDERS

__all__ = ["HUB_ANY", "HUB_OFF", "hub_dataset_refusal", "is_hub_id", "parse_hub_datasets"]

HUB_OFF = "off"
HUB_ANY = "any"
SETTING = "SELPRUNE_HUB_DATASETS"


def is_hub_id(dataset_id: str) -> bool:
    """Shaped like 'name' or 'org/name', and not one of datasets' local-file builders."""
    return (
        bool(HUB_ID_PATTERN.fullmatch(dataset_id))
        and ".." not in dataset_id
        and dataset_id.lower() not in PACKAGED_BUILDERS
    )


def parse_hub_datasets(value: str) -> str:
    """Normalize a setting value ("off", "any" or ids separated by commas); ValueError naming a bad id."""
    text = value.strip()
    if text.lower() in (HUB_OFF, HUB_ANY, ""):
        return text.lower() or HUB_OFF
    ids = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    bad = [i for i in ids if not is_hub_id(i) or i.lower() in (HUB_OFF, HUB_ANY)]
    if bad:
        raise ValueError(
            f"hub_datasets must be 'off', 'any' or comma-separated hub ids like 'org/name'; not {bad}"
        )
    return ",".join(ids)


def hub_dataset_refusal(policy: str, dataset_id: str) -> str | None:
    """None when `policy` allows the hub dataset `dataset_id`; else why not, naming the setting."""
    policy = parse_hub_datasets(policy)
    if policy == HUB_ANY:
        return None
    if policy == HUB_OFF:
        return f"hub dataset {dataset_id!r}: hub datasets are disabled on this server ({SETTING}=off)"
    if dataset_id in policy.split(","):
        return None
    return f"hub dataset {dataset_id!r} is not in this server's allowlist ({SETTING}): {policy}"
