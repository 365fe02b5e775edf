"""dtype "auto" by what the hardware computes natively, and the device_map settings' grammar."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selprune_core import devices
from selprune_core.devices import (
    DEVICE_MAP_STRATEGIES,
    check_device_map,
    choose_dtype,
    parse_dtype,
    parse_max_memory,
)
from selprune_core.errors import ConfigError
from worker import settings as worker_settings


@pytest.mark.parametrize("native", ["AVX512-BF16", "AMX"])
def test_auto_is_bfloat16_on_a_cpu_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: native)
    assert parse_dtype("auto", "cpu") is torch.bfloat16
    assert choose_dtype("auto", torch.device("cpu")) == (torch.bfloat16, f"CPU has {native}")


def test_auto_is_float32_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: None)
    assert parse_dtype("auto", "cpu") is torch.float32
    assert choose_dtype("AUTO", "cpu") == (torch.float32, "CPU without AVX512-BF16 or AMX")


def test_auto_on_other_devices_and_explicit_names(monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: "AMX")
    assert choose_dtype("auto", "mps") == (torch.float32, "mps device")
    assert choose_dtype("fp16", "cpu") == (torch.float16, "as requested")
    assert choose_dtype("torch.float32", "cpu") == (torch.float32, "as requested")


def test_cpu_probe_falls_back_to_cpuinfo_flags(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert devices._cpuinfo_bf16(info) == "AVX512-BF16"
    info.write_text("flags\t\t: avx512f amx_tile amx_bf16 amx_int8 avx512_bf16\n")
    assert devices._cpuinfo_bf16(info) == "AMX"
    info.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    assert devices._cpuinfo_bf16(info) is None
    assert devices._cpuinfo_bf16(tmp_path / "missing") is None

    def no_probe() -> str | None:
        raise AttributeError("this torch has no CPU probes")

    monkeypatch.setattr(devices, "_torch_bf16_probe", no_probe)
    monkeypatch.setattr(devices, "_CPUINFO", info)
    assert devices.cpu_bf16_support() is None


def test_the_probe_answers_on_this_machine():
    assert devices.cpu_bf16_support() in (None, "AVX512-BF16", "AMX")


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, cuda:1=1.5GB,cpu=60GiB") == {
        0: 20 * 2**30,
        1: 1_500_000_000,
        "cpu": 60 * 2**30,
    }
    assert parse_max_memory("CPU=1000") == {"cpu": 1000}
    assert parse_max_memory("mps=2mib") == {"mps": 2 * 2**20}
    assert parse_max_memory("") is None and parse_max_memory(None) is None
    assert parse_max_memory({"cpu": 5}) == {"cpu": 5}


@pytest.mark.parametrize("bad", ["cpu", "gpu0=1GB", "0=lots", "0=-1GB", "disk=1GB", "0=1GB,0=2GB", "0=1PB"])
def test_parse_max_memory_refuses(bad):
    with pytest.raises(ConfigError, match="max_memory"):
        parse_max_memory(bad)


@pytest.mark.parametrize(
    "text", ["0=20GiB,cpu=60GiB", "cuda:1=500MB", "cpu = 1000", "mps=2mib", "0=1.5gb", "gpu0=1GB", "0=1PB"]
)
def test_worker_settings_accept_what_the_core_parses(text):
    """worker/settings.py checks max_memory without torch; it must agree with the core's parser."""
    try:
        parse_max_memory(text)
        core_ok = True
    except ConfigError:
        core_ok = False
    worker_ok = all(worker_settings._MAX_MEMORY_ENTRY.match(p.strip()) for p in text.split(","))
    assert worker_ok == core_ok


def test_device_map_strategies_match_the_worker_settings():
    assert worker_settings._DEVICE_MAPS == DEVICE_MAP_STRATEGIES
    assert check_device_map(" Auto ") == "auto"
    with pytest.raises(ConfigError, match="unknown device_map"):
        check_device_map("everywhere")


def test_cpuinfo_path_is_the_real_one():
    assert devices._CPUINFO == Path("/proc/cpuinfo")
