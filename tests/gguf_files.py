"""Writing small transformers causal LMs to GGUF files, for tests that load a model by `.gguf` path.

There is no llama.cpp converter offline, so this does its job for the two families the tests need:
`gemma3_text` (stored as llama.cpp's "gemma3") and `llama`. Tensors are written as F32, so the file
reloads to the same weights exactly; the tokenizer is written as a byte-level BPE ("gpt2"), which is
what `tests.helpers.build_tokenizer` is.

The two value transforms are the inverses of what transformers undoes when it reads a GGUF file
(transformers/modeling_gguf_pytorch_utils.py): llama.cpp stores Gemma's zero-centred norms as `w + 1`
and permutes llama's q/k rows into its rotary layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from tests.helpers import build_model, build_tokenizer

# transformers model_type -> llama.cpp architecture name.
GGUF_ARCHS = {"gemma3_text": "gemma3", "llama": "llama"}

_CONTROL, _NORMAL = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)


def write_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    """Write `model` and its byte-level BPE `tokenizer` to `path` as an F32 GGUF file; return the path.

    `AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)` and the same for
    AutoTokenizer reload them.
    """
    config = model.config
    arch = GGUF_ARCHS.get(config.model_type)
    if arch is None:
        raise ValueError(f"no GGUF writer for model_type {config.model_type!r}; have {sorted(GGUF_ARCHS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-{arch}")
    _add_hparams(writer, config, arch)
    _add_tokenizer(writer, tokenizer)

    names = gguf.get_tensor_name_map(_model_arch(arch), config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # a file without output.weight is read back as tied
        stem, _, suffix = hf_name.rpartition(".")
        gguf_stem = names.get_name(stem)
        if gguf_stem is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r} of {arch}")
        name = f"{gguf_stem}.{suffix}"
        # add_tensor takes the array in torch's [out, in] layout; GGUF's reversed dims are its business.
        writer.add_tensor(name, _to_gguf(tensor, name, arch, config))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _model_arch(arch: str) -> gguf.MODEL_ARCH:
    return next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch)


def _add_hparams(writer: gguf.GGUFWriter, config: Any, arch: str) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = config.rope_parameters
    if arch == "gemma3":
        # Only the global layers' base is stored; transformers keeps its default for the local ones.
        writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    else:
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_rope_dimension_count(head_dim)


def _to_gguf(tensor: torch.Tensor, name: str, arch: str, config: Any) -> np.ndarray:
    array = tensor.detach().to(torch.float32).cpu().numpy()
    if arch == "gemma3" and name.endswith("norm.weight"):
        # Gemma's RMSNorm scales by (1 + w); llama.cpp stores (1 + w) and transformers subtracts 1.
        array = array + 1
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
        heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
        array = _permute_rotary(array, heads)
    return np.ascontiguousarray(array)


def _permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permute(); transformers' LlamaTensorProcessor reverses it.
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast) -> None:
    """A byte-level BPE as llama.cpp's "gpt2" model: the vocabulary in id order, its merges, special ids."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise ValueError("write_gguf writes byte-level BPE tokenizers only")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in state.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("the tokenizer's ids are not contiguous from 0")
    special = set(tokenizer.all_special_tokens)
    # tokenizers writes a merge as "a b" (older) or ["a", "b"] (newer); GGUF wants "a b".
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([_CONTROL if t in special else _NORMAL for t in tokens])
    writer.add_token_merges(merges)
    for add_id, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add_id(token_id)
    # The test tokenizer's post-processor prepends BOS; the flag makes the reloaded one do the same.
    bos_first = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(bos_first)
    writer.add_add_eos_token(False)


def build_tiny(model_type: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """The family's tiny test model (tests.helpers.build_model), with noise on its norm weights."""
    model = build_model(model_type, tokenizer, seed)
    with torch.no_grad():  # Gemma's norms start at 0 (it scales by 1 + w): noise makes a misstored one show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param), alpha=0.2)
    return model


def tiny_gemma3_gguf(folder: Path, seed: int = 0) -> tuple[Path, PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny random Gemma 3 and the test tokenizer written to `folder/tiny-gemma3.gguf`.

    Returns the file and the source model and tokenizer, to compare the reloaded ones against.
    """
    tokenizer = build_tokenizer()
    model = build_tiny("gemma3_text", tokenizer, seed)
    return write_gguf(model, tokenizer, Path(folder) / "tiny-gemma3.gguf"), model, tokenizer
