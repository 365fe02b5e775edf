"""Wire types to core types, at the boundary: the protocol package never sees the core's, and the core
never sees the wire's."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from transformers import PreTrainedTokenizerBase

from protocol import ChoiceLogprobs, GenerateChoice, GenerateTask, PruneParams, SamplingParams
from protocol.datasets import BuiltinData, FileData, HubData, ImageData, InlineData
from selprune_core.config import (
    BudgetConfig,
    CollectConfig,
    EvalConfig,
    PruneConfig,
    SamplingConfig,
    StopConfig,
)
from selprune_core.data import DatasetRef, dataset_ref_from_dict, describe
from selprune_core.decoding import Generation
from selprune_core.token_logprobs import TokenLogprob


def to_dataset_ref(spec: InlineData | FileData | HubData | BuiltinData) -> DatasetRef:
    """The core's dataset reference for a wire spec."""
    return dataset_ref_from_dict(spec.model_dump())


IMAGE_TOPK = 3  # k of an image classifier's top-k accuracy (capped at its number of classes)


def describe_spec(spec: InlineData | FileData | HubData | BuiltinData | ImageData) -> str:
    """A short label for any dataset reference (the name of its eval set, in mask metadata and plots)."""
    return spec.describe() if isinstance(spec, ImageData) else describe(to_dataset_ref(spec))


def set_names(
    specs: Sequence[InlineData | FileData | HubData | BuiltinData | ImageData],
    taken: Collection[str] = (),
) -> list[str]:
    """Each reference's eval-set name (`describe_spec`), made unique: a repeated description gets
    " (2)", " (3)", ... so that two sets described alike (two inline sets of 24 texts) both keep
    their results instead of the second overwriting the first. `taken` names are avoided too."""
    used, names = set(taken), []
    for spec in specs:
        base = name = describe_spec(spec)
        copy = 1
        while name in used:
            copy += 1
            name = f"{base} ({copy})"
        used.add(name)
        names.append(name)
    return names


def image_eval_config(n_classes: int, batch_size: int, seed: int) -> EvalConfig:
    """How an image classifier is evaluated: every image, top-1 and top-3, bootstrap intervals."""
    return EvalConfig(topk=min(IMAGE_TOPK, n_classes), batch_size=batch_size, seed=seed)


def image_prune_config(params: PruneParams, n_classes: int) -> PruneConfig:
    """`prune_config` for an image classifier: `batch_size` counts images, `collect_tokens` sequence
    positions (patches + CLS per image), and every held-out image is evaluated."""
    cfg = prune_config(params)
    return dataclasses.replace(cfg, eval=image_eval_config(n_classes, params.batch_size, params.seed))


def prune_config(params: PruneParams) -> PruneConfig:
    """The core's pruning config for a job's parameters (recipe defaults already filled in)."""
    return PruneConfig(
        ff_frac=params.ff_frac,
        attn_frac=params.attn_frac,
        ff_scoring=params.ff_scoring,
        attn_scoring=params.attn_scoring,
        ff_eps=params.ff_eps,
        attn_eps=params.attn_eps,
        steps=params.steps,
        recalculate=params.recalculate,
        prune_heads=params.prune_heads,
        head_reduce=params.head_reduce,
        random_baseline=params.random_baseline,
        seed=params.seed,
        offset_mode=params.offset_mode,
        selection=params.selection,
        stop=StopConfig(**params.stop.model_dump()) if params.stop else None,
        budget=BudgetConfig(**params.budget.model_dump()) if params.budget else None,
        collect=CollectConfig(
            token_limit=params.token_limit,
            sample_tokens=params.collect_tokens,
            batch_size=params.batch_size,
            skip_first=max(params.skip_first, 1 if params.exclude_first_token else 0),
            pack=params.pack,
        ),
        eval=EvalConfig(
            token_limit=params.token_limit,
            sample_tokens=params.eval_tokens,
            batch_size=params.batch_size,
            seed=params.seed,
        ),
    )


def sampling_config(params: SamplingParams, row: int = 0) -> SamplingConfig:
    """The core's sampling config for row `row` of a request (its seed offset by the row index)."""
    return SamplingConfig(
        max_new_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=None if params.seed is None else params.seed + row,
        stop=tuple(params.stop),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        echo=params.echo,
    )


def choice_logprobs(tokenizer: PreTrainedTokenizerBase, entries: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    """OpenAI's `logprobs` object for a choice's tokens. Each token (and alternative) is decoded alone,
    and text offsets count those pieces from the start of the choice's text."""
    tokens = [_text(tokenizer, [e.token_id]) for e in entries]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return ChoiceLogprobs(
        tokens=tokens,
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[None if e.logprob is None else _alternatives(tokenizer, e.top) for e in entries],
        text_offset=offsets,
    )


def _alternatives(tokenizer: PreTrainedTokenizerBase, top: Sequence[tuple[int, float]]) -> dict[str, float]:
    """Decoded alternative -> log-probability, most likely first; where two ids decode to the same text
    (partial UTF-8 bytes), the more likely one is kept."""
    out: dict[str, float] = {}
    for token, value in top:
        out.setdefault(_text(tokenizer, [token]), value)
    return out


def generate_choice(
    task: GenerateTask, index: int, g: Generation, tokenizer: PreTrainedTokenizerBase
) -> GenerateChoice:
    """Choice `index` of `task`: with echo its prompt first (as sent, or decoded from its ids), and with
    logprobs OpenAI's per-token object (the prompt's tokens too, with echo)."""
    prompt = ""
    if task.sampling.echo:
        prompt_index = index // task.n
        if task.prompts is not None:
            prompt = task.prompts[prompt_index]
        elif task.prompt_ids is not None:
            prompt = _text(tokenizer, task.prompt_ids[prompt_index])
    logprobs = None if g.logprobs is None else choice_logprobs(tokenizer, g.logprobs)
    return GenerateChoice(
        index=index,
        text=prompt + g.text,
        finish_reason=g.finish_reason,
        prompt_tokens=g.prompt_tokens,
        completion_tokens=g.completion_tokens,
        logprobs=logprobs,
    )


def _text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(tokenizer.decode(ids))
