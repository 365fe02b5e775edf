"""A small RoBERTa-style masked LM trained offline on code and prose: the masked LM the MLM path is
shown on.

No hub access is needed. At first use a byte-level BPE tokenizer is trained with the `tokenizers`
library, then a small `RobertaForMaskedLM` is trained on CPU on the train splits of the built-in
corpora `python_code` and `english_prose`, in equal shares (every batch is half code windows, half
prose windows), with BERT's masking recipe (`mlm_eval.MlmMasking`). Model and tokenizer are cached
with `save_pretrained` under `<cache_dir>/models/mlm-code-prose/`, so `AutoTokenizer` and
`AutoModelForMaskedLM.from_pretrained(folder)` load them, next to `training.json` (recipe, key,
accuracies, unigram baselines, training time). The cache key is `RECIPE_VERSION` plus a hash of every
setting and of the training texts, so a changed recipe or corpus retrains.

Training never sees the validation texts: each corpus's train split is cut by
`splits.carve_validation`, the model trains on the rest, and the validation texts (the same carve the
MLM bench chooses its settings on) and the held-out split are only measured.

The tokenizer follows RoBERTa's layout: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, BPE merges, and
`<mask>` last, so the random replacement ids of method.md §6.3, [4, vocab - 2], are exactly its
non-special ids. It is trained on the prose repeated to match the code's characters (each code file
cut to its first `tokenizer_code_chars / files` characters), so neither corpus owns the vocabulary.

Training is deterministic: one seed for init, window choice, masking and dropout; deterministic
algorithms; one CPU thread (the 2-core dev machine is also slower with two, next to a neighbour).

The recipe was chosen on the validation texts only, under a budget of about 4 minutes of training on
that machine. Post-LN RoBERTa sits on the unigram plateau (masked loss ~6.7) for a number of *steps*,
not tokens: batches of 16-32 windows of 128-256 tokens (0.7-1.9 s a step) never left it in 150-260
steps (validation top-1 at or below the unigram baseline), nor did a peak learning rate of 2e-3 or
5e-3 in 1200 steps of 8 x 128 tokens; 1e-3 (or 5e-4) left it after about 350 steps, and masking 30%
of the training tokens after about 150. At 1200 steps of 8 x 128 tokens and 30% masking, validation
top-1 was 11.5% on code and 9.8% on prose with 4096 tokens (14.3% and 9.0% with 2048, whose shorter
tokens are easier to guess; 4096 kept). The held-out figures are measured once and recorded, never
tuned on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch import nn
from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForMaskedLM

from selprune_core.config import EvalConfig
from selprune_core.corpora import load_builtin
from selprune_core.errors import ConfigError
from selprune_core.loading import _ensure_converted, _is_complete
from selprune_core.mlm_eval import MlmMasking, evaluate_mlm, mask_text, mlm_vocab, plan_mlm
from selprune_core.mlm_measure import MaskedLM, load_masked_lm
from selprune_core.splits import carve_validation
from selprune_core.training_log import TrainingLog

__all__ = [
    "CORPORA",
    "RECIPE_VERSION",
    "MlmRecipe",
    "build_mlm",
    "ensure_code_prose_mlm",
    "load_code_prose_mlm",
    "recipe_key",
    "train_mlm",
    "train_tokenizer",
]

log = logging.getLogger(__name__)

RECIPE_VERSION = 2  # bump when the training code changes in a way the settings do not show
TRAINING_FILE = "training.json"
CORPORA = ("python_code", "english_prose")
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3, RoBERTa's; <mask> is added last


@dataclass(frozen=True)
class MlmRecipe:
    """Tokenizer, model shape and training settings of the code/prose MLM; all of them key the cache."""

    vocab_size: int = 4096  # BPE merges + 4 specials + <mask>
    tokenizer_code_chars: int = 2_000_000  # code characters the BPE is trained on (prose repeated to match)
    max_tokens: int = 128  # training window and longest input, <s> and </s> included
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512  # FF neurons per layer (d_mlp)
    dropout: float = 0.0  # hidden and attention dropout, training only
    steps: int = 1200
    batch_size: int = 8  # windows per step: half code, half prose
    lr: float = 1e-3  # AdamW peak, cosine decay to 0 after a linear warm-up
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0
    # Training masks 30% of the tokens (80/10/10): more predictions per step left the loss plateau
    # sooner. Evaluation always masks method.md's 15% (mlm_eval.MlmMasking()).
    masking: MlmMasking = field(default_factory=lambda: MlmMasking(share=0.3))


def recipe_key(recipe: MlmRecipe, corpora: Mapping[str, Sequence[str]]) -> str:
    """`v{RECIPE_VERSION}-{hash of every setting and training text}`."""
    h = hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode())
    for name in sorted(corpora):
        h.update(name.encode())
        for text in corpora[name]:
            h.update(hashlib.sha256(text.encode()).digest())
    return f"v{RECIPE_VERSION}-{h.hexdigest()[:12]}"


def train_tokenizer(recipe: MlmRecipe, code: Sequence[str], prose: Sequence[str]) -> PreTrainedTokenizerFast:
    """A RoBERTa-layout byte-level BPE trained on equal characters of code and prose."""
    per_file = max(1, recipe.tokenizer_code_chars // max(1, len(code)))
    code_part = [text[:per_file] for text in code]
    repeats = max(1, round(sum(map(len, code_part)) / max(1, sum(map(len, prose)))))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size - 1,  # <mask> comes last, after the merges
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*code_part, *(list(prose) * repeats)], trainer=trainer)
    # As in RoBERTa, <mask> takes the space before it: "the <mask>." fills to "the cat.", not "the  cat."
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=recipe.max_tokens,
    )


def build_mlm(recipe: MlmRecipe, vocab_size: int) -> RobertaForMaskedLM:
    """A freshly initialised RobertaForMaskedLM of the recipe's shape (seeded by the recipe)."""
    config = RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        intermediate_size=recipe.intermediate_size,
        hidden_dropout_prob=recipe.dropout,
        attention_probs_dropout_prob=recipe.dropout,
        max_position_embeddings=recipe.max_tokens + 2,  # positions start after the pad id (1)
        type_vocab_size=1,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(recipe.seed)
    return RobertaForMaskedLM(config)


def _stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """Every text's ids without specials, `</s>` after each: one stream [tokens] int64."""
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    eos = int(tokenizer.eos_token_id)
    return torch.tensor([token for text_ids in ids for token in [*text_ids, eos]], dtype=torch.long)


def _windows(
    streams: Sequence[torch.Tensor], per_stream: int, width: int, g: torch.Generator
) -> list[list[int]]:
    """`per_stream` random windows of `width` ids from each stream, each wrapped in <s> ... </s>."""
    out = []
    for stream in streams:
        if len(stream) <= width:
            raise ConfigError(
                f"a training stream of {len(stream)} tokens is too short for {width}-token windows"
            )
        starts = torch.randint(0, len(stream) - width, (per_stream,), generator=g).tolist()
        out += [[0, *stream[s : s + width].tolist(), 2] for s in starts]
    return out


def train_mlm(
    recipe: MlmRecipe, code: Sequence[str], prose: Sequence[str]
) -> tuple[RobertaForMaskedLM, PreTrainedTokenizerFast, float]:
    """Train tokenizer and model on `code` and `prose`, deterministically; the model comes back in
    eval mode, with the last step's loss."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        tokenizer = train_tokenizer(recipe, code, prose)
        vocab = mlm_vocab(tokenizer)
        streams = (_stream(tokenizer, code), _stream(tokenizer, prose))
        model = build_mlm(recipe, len(tokenizer))
        g = torch.Generator().manual_seed(recipe.seed)  # windows and masking
        warmup = max(1, int(recipe.warmup_frac * recipe.steps))
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda s: min(
                (s + 1) / warmup, 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / recipe.steps)).item())
            ),
        )
        model.train()
        progress = TrainingLog("the code/prose MLM", recipe.steps)
        loss = torch.tensor(float("nan"))
        for step in range(1, recipe.steps + 1):
            windows = _windows(streams, recipe.batch_size // 2, recipe.max_tokens - 2, g)
            masked = [mask_text(ids, vocab, recipe.masking, g) for ids in windows]
            inputs = torch.tensor([corrupted for corrupted, _ in masked])  # [batch, pos]; windows never pad
            rows = torch.tensor([row for row, (_, chosen) in enumerate(masked) for _ in chosen])  # [pred]
            cols = torch.tensor([pos for _, chosen in masked for pos in chosen])  # [pred]
            targets = torch.tensor(windows)[rows, cols]  # [pred] the original ids
            hidden = model.roberta(input_ids=inputs).last_hidden_state  # [batch, pos, hidden]
            logits = model.lm_head(hidden[rows, cols])  # [pred, vocab]: the head only where scored
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
            progress.step(step, float(loss))
        module: nn.Module = model
        module.eval()
        return model, tokenizer, float(loss.item())
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def code_prose_texts(cache_dir: Path) -> dict[str, dict[str, tuple[str, ...]]]:
    """{corpus: {"train": rest of train, "validation": carved from train, "heldout": held-out}}."""
    out = {}
    for name in CORPORA:
        splits = load_builtin(name, cache_dir)
        rest, validation = carve_validation(splits.train)
        out[name] = {"train": rest, "validation": validation, "heldout": splits.heldout}
    return out


def _measure(target: MaskedLM, texts: Sequence[str], most_common: int) -> dict[str, Any]:
    """Masked top-1 / top-10 / loss on `texts` (every text, first max_tokens tokens), and the unigram
    baseline: always predicting `most_common`, on the same masked positions."""
    cfg = EvalConfig(token_limit=target.max_tokens, sample_tokens=10**9, batch_size=16, seed=0)
    result = evaluate_mlm(target.model, target.tokenizer, texts, cfg)
    plan = plan_mlm(target.tokenizer, texts, cfg, token_limit=target.max_tokens)
    targets = torch.cat([batch.targets for batch in plan.batches])
    return {
        "top1": result.top1,
        "topk": result.topk,
        "loss": result.loss,
        "top1_ci": list(result.ci["top1"]),
        "predictions": result.n_tokens,
        "texts": result.n_texts,
        "unigram_top1": float((targets == most_common).double().mean()),
    }


def ensure_code_prose_mlm(cache_dir: Path, recipe: MlmRecipe | None = None) -> Path:
    """The folder of the code/prose MLM trained with `recipe`, training it (once) when the cache lacks it."""
    recipe = recipe if recipe is not None else MlmRecipe()
    target = Path(cache_dir) / "models" / "mlm-code-prose"
    texts = code_prose_texts(cache_dir)
    key = recipe_key(recipe, {name: parts["train"] for name, parts in texts.items()})
    info_path = target / TRAINING_FILE
    if _is_complete(target) and info_path.is_file() and json.loads(info_path.read_text()).get("key") == key:
        return target
    if target.exists():  # another recipe's model: this one replaces it
        log.info("cached code/prose MLM is not %s: retraining", key)
        shutil.rmtree(target)

    def train_into(dest: Path) -> None:
        started = time.perf_counter()
        code, prose = texts["python_code"]["train"], texts["english_prose"]["train"]
        model, tokenizer, last_loss = train_mlm(recipe, code, prose)
        seconds = time.perf_counter() - started
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
        loaded = load_masked_lm(dest)
        accuracy: dict[str, Any] = {}
        for name, parts in texts.items():
            counts = torch.bincount(_stream(tokenizer, parts["train"]), minlength=len(tokenizer))
            counts[list(tokenizer.all_special_ids)] = 0  # specials are never targets
            most_common = int(counts.argmax())
            accuracy[name] = {
                split: _measure(loaded, parts[split], most_common) for split in ("validation", "heldout")
            }
            accuracy[name]["unigram_token"] = tokenizer.convert_ids_to_tokens(most_common)
        info = {
            "key": key,
            "recipe": asdict(recipe),
            "train_seconds": round(seconds, 2),
            "last_train_loss": last_loss,
            "train_texts": {name: len(parts["train"]) for name, parts in texts.items()},
            "accuracy": accuracy,
        }
        (dest / TRAINING_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        log.info("trained the code/prose MLM in %.1f s: %s", seconds, accuracy)

    return _ensure_converted(target, train_into, {"key": key, "file": "mlm-code-prose (trained)"})


def load_code_prose_mlm(folder: Path, device: torch.device | str = "cpu") -> tuple[MaskedLM, dict[str, Any]]:
    """The cached masked LM in eval mode, and its `training.json`."""
    info: dict[str, Any] = json.loads((Path(folder) / TRAINING_FILE).read_text())
    return load_masked_lm(folder, device=device), info
