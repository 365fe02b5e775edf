"""Wire types to core types, at the boundary: the protocol package never sees the core's, and the core
never sees the wire's."""

from __future__ import annotations

from protocol import PruneParams, SamplingParams
from protocol.datasets import BuiltinData, FileData, HubData, InlineData
from selprune_core.config import (
    BudgetConfig,
    CollectConfig,
    EvalConfig,
    PruneConfig,
    SamplingConfig,
    StopConfig,
)
from selprune_core.data import DatasetRef, dataset_ref_from_dict


def to_dataset_ref(spec: InlineData | FileData | HubData | BuiltinData) -> DatasetRef:
    """The core's dataset reference for a wire spec."""
    return dataset_ref_from_dict(spec.model_dump())


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
    )
