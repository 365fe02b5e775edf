"""A Gemma 3 model loaded from a `.gguf` file by path: transformers reads back what tests/gguf_files.py
writes, `load_model` loads it with its hook sites, and `selprune prune` prunes it into a mask.

The model is a tiny random-init one written here; the embedded model's GGUF path is the real-model
test (tests/unit/core/test_loading.py, marked slow).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from selprune.cli import main
from selprune_core.loading import load_model
from selprune_core.masks import NeuronMask
from selprune_core.sites import model_fingerprint
from tests.gguf_files import GGUF_ARCHS, build_tiny, tiny_gemma3_gguf, write_gguf
from tests.helpers import CORPUS, build_tokenizer

CODE = [t for t in CORPUS if "def " in t or "import" in t or "for " in t or "class" in t]
PROSE = [t for t in CORPUS if t not in CODE]
LAYERS, D_MLP, D_ATTN = 2, 64, 4 * 16  # the gemma3_text family: attention is heads x head_dim wide


@pytest.fixture(scope="module")
def gemma3_file(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, PreTrainedModel, PreTrainedTokenizerFast]:
    return tiny_gemma3_gguf(tmp_path_factory.mktemp("gguf"))


def _logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    batch = tokenizer(CORPUS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits: torch.Tensor = model(**batch).logits
    return logits


@pytest.mark.parametrize("model_type", sorted(GGUF_ARCHS))
def test_written_gguf_reloads_through_transformers_unchanged(model_type: str, tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    source = build_tiny(model_type, tokenizer, seed=1)
    path = write_gguf(source, tokenizer, tmp_path / f"{model_type}.gguf")

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    reloaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    assert type(model) is type(source) and model.config.model_type == model_type
    assert model.config.tie_word_embeddings == source.config.tie_word_embeddings
    for text in CORPUS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == text
    specials = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    assert [getattr(reloaded, s) for s in specials] == [getattr(tokenizer, s) for s in specials]
    # The weights round-trip exactly (F32), so only the transforms on the way can make these differ:
    # Gemma's norms stored as 1 + w, llama's permuted q/k rows.
    torch.testing.assert_close(_logits(model, tokenizer), _logits(source, tokenizer), atol=1e-5, rtol=0)


def test_load_model_loads_a_gemma3_gguf_file_with_its_sites(gemma3_file, tmp_path: Path) -> None:
    path, source, tokenizer = gemma3_file
    loaded = load_model(str(path), cache_dir=tmp_path / "cache", device="cpu", dtype="float32")

    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    sites = loaded.sites
    assert (sites.model_type, sites.n_layers, sites.d_mlp) == ("gemma3_text", LAYERS, D_MLP)
    assert (sites.n_heads, sites.d_head) == (4, 16)
    # Dequantized and unmarked: casts and save_pretrained work on it like on any dense model.
    assert not getattr(loaded.model, "is_quantized", False)
    assert getattr(loaded.model.config, "quantization_config", None) is None
    assert loaded.tokenizer.pad_token_id == tokenizer.pad_token_id
    # Same checkpoint as the source model: a mask made on either fits the other.
    assert loaded.fingerprint == model_fingerprint(source)
    torch.testing.assert_close(
        _logits(loaded.model, tokenizer), _logits(source, tokenizer), atol=1e-5, rtol=0
    )

    # As a worker confined to a models root loads it: by name under the root, in another dtype.
    confined = load_model(
        path.name, cache_dir=tmp_path / "cache", device="cpu", dtype="bfloat16", models_root=path.parent
    )
    assert confined.model.dtype == torch.bfloat16 and confined.fingerprint == loaded.fingerprint


def test_selprune_prune_prunes_a_gemma3_gguf_file(gemma3_file, tmp_path: Path, capsys) -> None:
    path, source, _ = gemma3_file
    out = tmp_path / "masks"
    code = main(
        [
            "prune",
            "--model",
            str(path),
            "--forget",
            "inline:" + "|".join(CODE * 3),
            "--retain",
            "inline:" + "|".join(PROSE * 3),
            *("--steps", "2", "--ff-frac", "0.1", "--attn-frac", "0.05"),
            *("--collect-tokens", "300", "--eval-tokens", "200", "--token-limit", "32", "--batch-size", "4"),
            *("--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--data-root", str(tmp_path)),
            *("--device", "cpu", "--dtype", "float32"),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err

    found = re.search(r"^mask ([0-9a-f]+) \(stopped: steps\)$", printed.out, re.MULTILINE)
    assert found, printed.out
    mask = NeuronMask.load(out / f"{found[1]}.safetensors")
    assert mask.mask_id == found[1] and mask.fingerprint == model_fingerprint(source)
    assert tuple(mask.ff_keep.shape) == (LAYERS, D_MLP) and tuple(mask.attn_keep.shape) == (LAYERS, D_ATTN)
    # Two steps of 10% FF / 5% attention, chosen globally: some neurons pruned, most kept.
    assert 0 < int((~mask.ff_keep).sum()) < LAYERS * D_MLP // 2
    assert 0 < int((~mask.attn_keep).sum()) < LAYERS * D_ATTN // 2
    meta = json.loads((out / f"{found[1]}.json").read_text())
    assert meta["model"] == str(path) and len(meta["ff_per_layer"]) == LAYERS
