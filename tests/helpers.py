"""Tiny models and a tokenizer built in code, shared by the unit tests.

Nothing here touches the network: the tokenizer is a byte-level BPE trained on `CORPUS`, and the
models are random-init transformers configs two layers deep and 32 wide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from selprune_core.families import FAMILIES, Family, build_tiny
from selprune_core.masks import NeuronMask
from selprune_core.sites import model_fingerprint, resolve_sites

CORPUS = [
    "the cat sat on the mat and the dog sat on the log",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i)",
    "a quick brown fox jumps over the lazy dog",
    "import torch\nx = torch.zeros(3)",
    "the weather is nice today and the sun is out",
    "class Foo:\n    def bar(self):\n        return None",
    "she sells sea shells by the sea shore",
]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def random_mask(model: Any, seed: int = 0, frac: float = 0.3) -> NeuronMask:
    """A zero-ablation mask pruning about `frac` of each layer's FF and attention neurons, seeded."""
    import torch

    sites = resolve_sites(model)
    g = torch.Generator().manual_seed(seed)
    ff = torch.rand(sites.n_layers, sites.d_mlp, generator=g) > frac
    attn = torch.rand(sites.n_layers, sites.d_attn, generator=g) > frac
    return NeuronMask(model_fingerprint(model), ff, attn, sites.n_heads)


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE with pad/bos/eos/unk that prepends BOS, like the Llama tokenizers."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts or CORPUS, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


# Every family selprune_core.families lists that the installed transformers has: two layers deep, 32
# wide. gemma's heads x head_dim (4 x 16) differs from its hidden size, and most use grouped-query
# attention.
FAMILY_BY_TYPE: dict[str, Family] = {f.model_type: f for f in FAMILIES if f.available}
ARCHS = tuple(FAMILY_BY_TYPE)


def build_model(
    arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, **overrides: Any
) -> PreTrainedModel:
    """A random-init causal LM of a family in FAMILIES, 2 layers, width 32, in eval mode."""
    if arch not in FAMILY_BY_TYPE:
        raise ValueError(f"unknown test arch {arch!r}")
    return build_tiny(
        FAMILY_BY_TYPE[arch],
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=seed,
        **overrides,
    )


def site_inputs(sites: Any, run: Callable[[], None], *, flatten: bool = False) -> dict[str, Any]:
    """Every FF / attention site input of `run`'s forwards, captured by plain pre-hooks (not selprune's
    recorders), concatenated over calls: {"ff"|"attn": [layer, batch, ..., d] float64}; with `flatten`,
    each call is flattened to [tokens, d] first (calls whose sequence lengths differ)."""
    import torch

    seen: dict[str, list[list[Any]]] = {kind: [[] for _ in range(sites.n_layers)] for kind in ("ff", "attn")}
    handles = [
        module.register_forward_pre_hook(
            lambda _m, args, kind=kind, layer=layer: seen[kind][layer].append(
                (args[0].reshape(-1, args[0].shape[-1]) if flatten else args[0]).double()
            )
        )
        for kind, modules in (("ff", sites.ff_modules), ("attn", sites.attn_modules))
        for layer, module in enumerate(modules)
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {kind: torch.stack([torch.cat(xs) for xs in layers]) for kind, layers in seen.items()}


def build_vit(seed: int = 0, *, num_channels: int = 1, image_size: int = 8, num_labels: int = 10) -> Any:
    """A tiny random-init ViT image classifier (2 layers, 32 wide, 2x2 patches), in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForImageClassification

    config = AutoConfig.for_model(
        "vit",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=image_size,
        patch_size=2,
        num_channels=num_channels,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    model = AutoModelForImageClassification.from_config(config)
    model.eval()
    return model


def local_runtime(root: Any) -> Any:
    """A CPU, float32 worker ModelRuntime over a test's folder: local models under `root/models` (the
    models root), caches under `root/cache`, `root` as the data root."""
    from worker.runtime import ModelRuntime

    return ModelRuntime(
        cache_dir=root / "cache", data_root=root, device="cpu", dtype="float32", models_root=root / "models"
    )
