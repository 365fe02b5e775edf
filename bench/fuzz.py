"""Property-based fuzzing of the gateway's HTTP API: no request may get a response of 500 or above.

Schemathesis reads the gateway's own OpenAPI document and generates requests for every operation:
valid bodies and parameters, and (in negative mode) bodies that break the schema. Every response is
checked for a status below 500. `fuzz()` drives any ASGI app in-process or any base URL; the test
suite runs it briefly on a tiny model (tests/integration/test_fuzz.py), and this command runs it
long against a real local stack (gateway, Redis and a worker as `selprune up` runs them, on the
embedded model, with generation capped at a few tokens so the run stays cheap).

The last line holds the figures as name=value pairs:

    requests=<sent> server_errors=<responses >= 500> statuses=<status:count,...>

Usage: python bench/fuzz.py [--examples 60] [--seed 0] [--cache-dir ~/.cache/selprune]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as use_seed
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi

log = logging.getLogger("bench.fuzz")

# Where a generated request would only wait: a job's events stream blocks until the job finishes.
SKIPPED = {("GET", "/v1/jobs/{job_id}/events")}


@dataclass
class FuzzReport:
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[dict[str, Any]] = field(default_factory=list)  # the request and the answer

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def line(self) -> str:
        statuses = ",".join(f"{s}:{n}" for s, n in sorted(self.statuses.items()))
        return f"requests={self.requests} server_errors={len(self.server_errors)} statuses={statuses}"


def fuzz(
    schema: Any,
    session: requests.Session,
    *,
    examples: int,
    seed: int = 0,
    base_url: str | None = None,
) -> FuzzReport:
    """Send up to `examples` generated requests per operation of `schema` (valid and schema-breaking
    ones) through `session`; seeded, so a run repeats exactly."""
    report = FuzzReport()
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE) | operation.as_strategy(
            generation_mode=GenerationMode.NEGATIVE
        )

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @use_seed(seed)
        @given(case=strategy)
        def send(case: Any) -> None:
            response = case.call(session=session, base_url=base_url)
            report.statuses[response.status_code] += 1
            if response.status_code >= 500:
                report.server_errors.append(
                    {
                        "operation": f"{case.operation.method.upper()} {case.operation.path}",
                        "status": response.status_code,
                        "request": case.as_curl_command(),
                        "body": response.text[:500],
                    }
                )

        send()
    return report


def asgi_session(app: Any, headers: dict[str, str]) -> asgi.ASGIClient:
    """A requests session that reaches `app` in-process (enter it to run the app's lifespan)."""
    session = asgi.get_client(app)
    session.headers.update(headers)
    return session


@contextmanager
def local_stack(cache_dir: Path, key: str) -> Iterator[str]:
    """A real stack on the embedded model; yields its URL."""
    from selprune.local_stack import LocalStack, StackConfig, free_port

    env = {
        "SELPRUNE_API_KEYS": key,
        "SELPRUNE_MAX_NEW_TOKENS": "4",  # generation is fuzzed for its handling, not its text
        "SELPRUNE_GENERATE_TIMEOUT_S": "120",
        "SELPRUNE_ROLES": "serve",  # queued jobs only wait: running them is not what is fuzzed
    }
    cfg = StackConfig(port=free_port(), cache_dir=cache_dir, env=env, ready_timeout=600)
    with LocalStack(cfg) as stack:
        stack.start()
        yield stack.url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=60, help="generated requests per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=os.environ.get("SELPRUNE_CACHE_DIR", "~/.cache/selprune"))
    parser.add_argument("--out", default=None, help="write the report (with every 5xx) as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    key = "fuzz-" + os.urandom(8).hex()
    with local_stack(Path(args.cache_dir).expanduser(), key) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {key}"
            report = fuzz(schema, session, examples=args.examples, seed=args.seed, base_url=url)
    for failure in report.server_errors:
        log.info(
            "%s -> %s: %s\n  %s", failure["operation"], failure["status"], failure["body"], failure["request"]
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"statuses": report.statuses, "server_errors": report.server_errors}, indent=1)
        )
    print(report.line())
    sys.exit(1 if report.server_errors else 0)


if __name__ == "__main__":
    main()
