"""Which device a model runs on, in which weight dtype, and how a device_map spreads it over several.

`dtype="auto"` takes what the hardware computes natively: bfloat16 on a GPU that supports it (float16 on
older ones), bfloat16 on a CPU with AVX512-BF16 or AMX instructions, float32 elsewhere. Statistics are
float64 and evaluation scores float32 whatever the weights are (`activations`, `evaluation`), and
`bench/dtype_check.py` is the check behind the CPU rule: the embedded model's bf16 perplexity on the
built-in sets within 1% of fp32. `choose_dtype` also says why, for the load log
("dtype auto -> bfloat16 (CPU has AVX512-BF16)").

A device_map (accelerate's, through `from_pretrained`) places a model too big for one device over
several GPUs, or GPUs plus CPU memory and disk; `max_memory` bounds what each may hold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from selprune_core.errors import ConfigError

__all__ = [
    "DEVICE_MAP_STRATEGIES",
    "DTYPES",
    "MaxMemory",
    "auto_dtype",
    "check_device_map",
    "choose_dtype",
    "cpu_bf16_support",
    "parse_dtype",
    "parse_max_memory",
    "resolve_device",
]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# accelerate's placement strategies (what `from_pretrained(device_map=...)` takes as a string).
DEVICE_MAP_STRATEGIES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")
# accelerate's max_memory: GPU index, "cpu" or "mps" -> bytes.
MaxMemory = dict[int | str, int]

_CPUINFO = Path("/proc/cpuinfo")
_MEMORY_KEY = re.compile(r"(?:cuda:)?(\d+)|cpu|mps")
_MEMORY_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(b|[kmgt]i?b)?", re.IGNORECASE)
_UNITS = (
    {"": 1, "b": 1}
    | {f"{p}b": 1000**i for i, p in enumerate("kmgt", 1)}
    | {f"{p}ib": 1024**i for i, p in enumerate("kmgt", 1)}
)


def resolve_device(name: str) -> torch.device:
    """Map "auto" to cuda when available, else cpu; validate explicit names ("cpu", "cuda:1")."""
    key = name.strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(key)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"unknown device {name!r}; use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA devices")
    return device


def cpu_bf16_support() -> str | None:
    """The CPU's native bfloat16 instructions ("AMX" or "AVX512-BF16"); None when it has neither.

    Asks torch (which also checks that the OS enables AMX tiles), or reads /proc/cpuinfo where this
    torch has no such probe.
    """
    try:
        return _torch_bf16_probe()
    except (AttributeError, RuntimeError):
        return _cpuinfo_bf16(_CPUINFO)


def _torch_bf16_probe() -> str | None:
    # Private torch probes (torch.cpu, 2.3 and later); AttributeError where this torch lacks them.
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def _cpuinfo_bf16(path: Path) -> str | None:
    try:
        flags = set(re.findall(r"\w+", path.read_text()))
    except OSError:
        return None
    for label, flag in (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")):
        if flag in flags:
            return label
    return None


def auto_dtype(device: torch.device | str) -> tuple[torch.dtype, str]:
    """What "auto" means on `device`, and why."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "GPU supports bfloat16"
        return torch.float16, "GPU without bfloat16"
    if dev.type == "cpu":
        native = cpu_bf16_support()
        if native is not None:
            return torch.bfloat16, f"CPU has {native}"
        return torch.float32, "CPU without AVX512-BF16 or AMX"
    return torch.float32, f"{dev.type} device"


def choose_dtype(name: str, device: torch.device | str = "cpu") -> tuple[torch.dtype, str]:
    """A dtype name as a torch dtype, with the reason ("as requested" unless it was "auto")."""
    key = name.strip().lower().removeprefix("torch.")
    if key == "auto":
        return auto_dtype(device)
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[key], "as requested"


def parse_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """Map a dtype name to a torch dtype; "auto" as `auto_dtype` decides for `device`."""
    return choose_dtype(name, device)[0]


def check_device_map(name: str) -> str:
    """A device_map strategy name, checked."""
    key = name.strip().lower()
    if key not in DEVICE_MAP_STRATEGIES:
        raise ConfigError(f"unknown device_map {name!r}; use one of: {', '.join(DEVICE_MAP_STRATEGIES)}")
    return key


def parse_max_memory(spec: str | Mapping[int | str, int] | None) -> MaxMemory | None:
    """accelerate's max_memory (device -> bytes) from "0=20GiB,1=20GiB,cpu=60GiB": a GPU index, cuda:N,
    cpu or mps, then bytes or a size in KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (of 1024),
    letter case ignored. A mapping passes through; empty gives None."""
    if spec is None or isinstance(spec, Mapping):
        return dict(spec) if spec else None
    out: MaxMemory = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, sep, size = (s.strip() for s in part.partition("="))
        device = _MEMORY_KEY.fullmatch(key.lower())
        amount = _MEMORY_SIZE.fullmatch(size)
        if not sep or device is None or amount is None:
            raise ConfigError(
                f"max_memory entry {part!r}: use DEVICE=SIZE, DEVICE a GPU index, cpu or mps, "
                "SIZE bytes or e.g. 20GiB (like 0=20GiB,cpu=60GiB)"
            )
        number, unit = amount.groups()
        target: int | str = int(device.group(1)) if device.group(1) is not None else key.lower()
        if target in out:
            raise ConfigError(f"max_memory names {key!r} twice")
        out[target] = int(float(number) * _UNITS[(unit or "").lower()])
    return out or None
