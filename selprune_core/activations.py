"""Per-neuron activation statistics, streamed through scoped forward pre-hooks.

For every counted token t and neuron n we keep float64 running sums

    N, sum x, sum x^2, sum |x|, sum sqrt|x|, sum [x > 0]

per component (FF: [layer, d_mlp]; attention pre-out: [layer, n_heads * d_head]). Every importance
function of the paper (freq, abs, rms, std, sqrt) and the authors' legacy formulas derive from these.
Plain sums make statistics *mergeable*: two partial collections add up to one collection over both,
so collection can be sharded across workers. float64 matters: sum x^2 in fp32 loses precision over
about 1e5 tokens.

Pruned neurons read exactly their mask value (0, or their offset under mean ablation): the prune
loop enters `apply_mask` before collecting, so the mask pre-hook runs before ours (hooks run in
registration order), as in the authors' code.

Gradient attributions (the `taylor` scorers) need one more thing per neuron: how much the loss would
change if the neuron were replaced by a constant c. To first order that is sum_t (c - x_t) * dL/dx_t
over the tokens of a chunk (one batch), so for every batch we keep the two sums

    A = sum_t x_t * dL/dx_t,    B = sum_t dL/dx_t        (rows [batch_index, layer, d])

and any center c gives the chunk's estimated loss change c * B - A afterwards. L is the summed
next-token cross-entropy of the batch. Collecting them costs a backward pass per batch.

Which tokens count: every real (non-padding) position, except the first `skip_first` positions of
every text and of every row. The first positions of a sequence carry very large activations in many
models (an "attention sink", with or without a BOS token), so short texts would otherwise weigh those
positions far more than long ones and bias the forget/retain ratio toward "short text" neurons.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from selprune_core.batching import TokenBatch
from selprune_core.hooks import scoped_pre_hooks
from selprune_core.partial_forward import decoder_body, forward_to_last_site, stop_after_last_site
from selprune_core.placement import input_device
from selprune_core.sites import ModelSites

__all__ = [
    "STAT_FIELDS",
    "ATTRIBUTION",
    "ComponentStats",
    "ActivationStats",
    "record_activations",
    "collect_activations",
]

# Names of the running sums; `fields` arguments choose a subset to save time when a scorer needs less.
STAT_FIELDS: tuple[str, ...] = ("sum", "sum_sq", "sum_abs", "sum_sqrt", "pos_count")
# Asking for this pseudo-field collects the per-batch gradient attribution rows (attr_xg, attr_g).
ATTRIBUTION = "attr"


@dataclass
class ComponentStats:
    """Running sums for one component. Absent fields are None (not collected)."""

    n: int  # counted tokens; every neuron of a component sees the same tokens
    sum: torch.Tensor | None = None  # [layer, d] float64, sum x
    sum_sq: torch.Tensor | None = None  # sum x^2
    sum_abs: torch.Tensor | None = None  # sum |x|
    sum_sqrt: torch.Tensor | None = None  # sum sqrt|x|
    pos_count: torch.Tensor | None = None  # sum [x > 0]
    attr_xg: torch.Tensor | None = None  # [batch_index, layer, d] float64: sum_t x_t * dL/dx_t per batch
    attr_g: torch.Tensor | None = None  # [batch_index, layer, d] float64: sum_t dL/dx_t per batch

    @classmethod
    def zeros(cls, n_layers: int, width: int, which: Iterable[str], device: torch.device) -> ComponentStats:
        sums = {name: torch.zeros(n_layers, width, dtype=torch.float64, device=device) for name in which}
        return cls(n=0, **sums)

    @property
    def n_layers_width(self) -> tuple[int, int]:
        tensors = self._collected()
        assert tensors, "statistics without any running sum have no shape"
        layers, width = tensors[0].shape
        return int(layers), int(width)

    @property
    def device(self) -> torch.device:
        tensors = self._collected()
        return tensors[0].device if tensors else torch.device("cpu")

    def _collected(self) -> list[torch.Tensor]:
        """The running sums that were collected, in STAT_FIELDS order."""
        return [value for name in STAT_FIELDS if (value := getattr(self, name)) is not None]

    def _need(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"statistic {name!r} was not collected")
        assert isinstance(value, torch.Tensor)
        return value

    # Derived per-neuron summaries, all [layer, d] float64. Empty collections give zeros, never NaN.
    @property
    def mean(self) -> torch.Tensor:
        return self._need("sum") / max(self.n, 1)

    @property
    def abs(self) -> torch.Tensor:  # paper's I_abs: (1/N) sum |x|
        return self._need("sum_abs") / max(self.n, 1)

    @property
    def freq(self) -> torch.Tensor:  # I_freq: fraction of tokens with x > 0
        return self._need("pos_count") / max(self.n, 1)

    @property
    def sqrt(self) -> torch.Tensor:  # (1/N) sum sqrt|x|
        return self._need("sum_sqrt") / max(self.n, 1)

    @property
    def rms(self) -> torch.Tensor:  # I_rms: sqrt((1/N) sum x^2), the true RMS
        return (self._need("sum_sq") / max(self.n, 1)).sqrt()

    @property
    def var(self) -> torch.Tensor:  # population variance, clamped against cancellation
        return (self._need("sum_sq") / max(self.n, 1) - self.mean**2).clamp_min(0.0)

    @property
    def std(self) -> torch.Tensor:  # I_std: population standard deviation
        return self.var.sqrt()

    @property
    def sample_var(self) -> torch.Tensor:  # M2 / (N - 1), what the authors' "std" field holds
        return self.var * self.n / max(self.n - 1, 1)

    def attribution(self, center: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Mean absolute first-order loss change per token of replacing each neuron by `center`.

        sum over batches |center * B - A| / N, [layer, d] float64; `center` is a scalar or [layer, d].
        """
        a, g = self._need("attr_xg"), self._need("attr_g")  # [batch_index, layer, d]
        return (center * g - a).abs().sum(dim=0) / max(self.n, 1)

    def merge(self, other: ComponentStats) -> ComponentStats:
        """Statistics of the union of both token sets."""
        merged: dict[str, torch.Tensor | None] = {}
        for name in (*STAT_FIELDS, "attr_xg", "attr_g"):
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None):
                raise ValueError(f"cannot merge: {name!r} collected on one side only")
            if a is None:
                merged[name] = None
            else:  # running sums add; attribution rows concatenate
                merged[name] = (
                    torch.cat([a, b.to(a.device)]) if name.startswith("attr") else a + b.to(a.device)
                )
        return ComponentStats(n=self.n + other.n, **merged)

    def to_dict(self) -> dict[str, torch.Tensor]:
        names = (*STAT_FIELDS, "attr_xg", "attr_g")
        out = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        out["n"] = torch.tensor(self.n, dtype=torch.int64)
        return out

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor]) -> ComponentStats:
        return cls(n=int(tensors["n"].item()), **{k: v for k, v in tensors.items() if k != "n"})


@dataclass
class ActivationStats:
    """Statistics of one dataset for both components."""

    ff: ComponentStats  # [layer, d_mlp]
    attn: ComponentStats  # [layer, n_heads * d_head]
    n_texts: int = 0

    @property
    def n_tokens(self) -> int:
        return self.ff.n

    def merge(self, other: ActivationStats) -> ActivationStats:
        return ActivationStats(
            self.ff.merge(other.ff), self.attn.merge(other.attn), self.n_texts + other.n_texts
        )


class _Recorder:
    """Adds one batch's weighted sums into a ComponentStats, layer by layer (and, when attributing,
    the batch's gradient sums once backward reaches each hooked input)."""

    def __init__(self, stats: ComponentStats, attribute: bool = False) -> None:
        self.stats = stats
        self.token_weight: torch.Tensor | None = None  # [batch * pos] float64, 1 on counted tokens
        # The batch's token_weight on each other device a hooked input arrives on (a device_map may
        # spread the layers over several), keyed by the weight tensor it copies.
        self._weight_copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.which = [
            f.name for f in fields(stats) if f.name in STAT_FIELDS and getattr(stats, f.name) is not None
        ]
        self.attribute = attribute
        layers, width = stats.n_layers_width
        # This batch's attribution sums [layer, d], filled by gradient hooks during backward.
        self.batch_xg = torch.zeros(layers, width, dtype=torch.float64)
        self.batch_g = torch.zeros(layers, width, dtype=torch.float64)
        self.rows_xg: list[torch.Tensor] = []
        self.rows_g: list[torch.Tensor] = []

    def hook(self, layer: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            weight = self._weight_on(x.device)
            # float64 per batch too, not only across batches: a batch of 2048 tokens summed in fp32
            # already rounds away the small activations of most neurons.
            x = x.reshape(-1, x.shape[-1]).double()  # [batch * pos, d]
            # Weighted sums as one GEMV each (w @ f(x)): padding and excluded positions have w = 0.
            stats = self.stats
            for name in self.which:
                if name == "sum":
                    value = weight @ x
                elif name == "sum_sq":
                    value = weight @ (x * x)
                elif name == "sum_abs":
                    value = weight @ x.abs()
                elif name == "sum_sqrt":
                    value = weight @ x.abs().sqrt()
                else:  # pos_count
                    value = weight @ (x > 0).double()
                total = getattr(stats, name)
                total[layer] += value.to(total.device)  # one [d] vector per field across devices
            if self.attribute and args[0].requires_grad:
                args[0].register_hook(self._on_grad(layer, x, weight))  # type: ignore[no-untyped-call]

        return record

    def _weight_on(self, device: torch.device) -> torch.Tensor:
        """This batch's token weights on `device`, copied there once per batch."""
        weight = self.token_weight
        assert weight is not None, "recorder called outside collect_activations"
        if weight.device == device:
            return weight
        copy = self._weight_copies.get(device)
        if copy is None or copy[0] is not weight:
            copy = (weight, weight.to(device))
            self._weight_copies[device] = copy
        return copy[1]

    def _on_grad(self, layer: int, x: torch.Tensor, weight: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def on_grad(grad: torch.Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1]).double()  # [batch * pos, d]
            self.batch_xg[layer] += (weight @ (x * g)).cpu()
            self.batch_g[layer] += (weight @ g).cpu()

        return on_grad

    def end_batch(self) -> None:
        """Keep this batch's attribution sums as one row and reset them."""
        if self.attribute:
            self.rows_xg.append(self.batch_xg.clone())
            self.rows_g.append(self.batch_g.clone())
            self.batch_xg.zero_()
            self.batch_g.zero_()

    def finish(self) -> None:
        if self.attribute and self.rows_xg:
            device = self.stats.device
            self.stats.attr_xg = torch.stack(self.rows_xg).to(device)  # [batch_index, layer, d]
            self.stats.attr_g = torch.stack(self.rows_g).to(device)


@contextlib.contextmanager
def record_activations(
    sites: ModelSites, ff: ComponentStats, attn: ComponentStats, *, attribute: bool = False
) -> Iterator[tuple[_Recorder, _Recorder]]:
    """Register recording pre-hooks on every layer, for this thread only; removed on exit, even on error."""
    recorders = (_Recorder(ff, attribute), _Recorder(attn, attribute))
    hooks = [
        (module, recorder.hook(layer))
        for recorder, modules in zip(recorders, (sites.ff_modules, sites.attn_modules), strict=True)
        for layer, module in enumerate(modules)
    ]
    with scoped_pre_hooks(hooks):
        yield recorders
    for recorder in recorders:
        recorder.finish()


def _summed_next_token_loss(model: nn.Module, batch: TokenBatch, device: torch.device) -> torch.Tensor:
    """Forward with gradients from the input embeddings on; the batch's summed next-token CE."""
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    embed = model.get_input_embeddings()  # type: ignore[operator]
    # A leaf that requires grad at the bottom makes every hooked input part of the graph, while the
    # weights' own gradients are never computed (autograd.grad asks for this leaf only).
    embeds = embed(ids).detach().requires_grad_(True)  # [batch, pos, d_model]
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits  # [batch, pos, vocab]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # padding is never a target
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
    torch.autograd.grad(loss, embeds)
    return loss.detach()


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    sites: ModelSites,
    batches: Iterable[TokenBatch],
    *,
    sample_tokens: int,
    skip_first: int = 0,
    which: Iterable[str] = STAT_FIELDS,
    on_batch: Callable[[int], None] | None = None,
) -> ActivationStats:
    """Stream batches through the model and accumulate statistics until the token budget is exceeded.

    With `skip_first` 0 counting follows the authors: every real position counts (BOS included).
    Otherwise the first `skip_first` positions of every text and every row are left out. Collection
    stops once the count *exceeds* `sample_tokens`, keeping the whole last batch. Including
    ATTRIBUTION in `which` also collects the gradient attribution rows (a backward pass per batch).
    """
    model.eval()
    which = tuple(which)
    attribute = ATTRIBUTION in which
    sums = tuple(name for name in which if name != ATTRIBUTION)
    if attribute and "sum" not in sums:
        sums = (*sums, "sum")  # cheap, and gives attribution-only statistics their shape
    unknown = set(sums) - set(STAT_FIELDS)
    assert not unknown, f"unknown statistics {sorted(unknown)}"
    device = input_device(model)  # where token ids go; with a device_map, layers may compute elsewhere
    ff = ComponentStats.zeros(sites.n_layers, sites.d_mlp, sums, device)
    attn = ComponentStats.zeros(sites.n_layers, sites.d_attn, sums, device)
    n_texts = 0
    body = decoder_body(model)
    # The stop hook is entered after the recorders, so it runs after them on the last sites; with
    # attribution the whole forward is needed (the loss reads the logits).
    stop = contextlib.nullcontext() if attribute else stop_after_last_site(sites)
    with record_activations(sites, ff, attn, attribute=attribute) as recorders, stop:
        for batch in batches:
            weight = batch.attention_mask.to(device=device, dtype=torch.float64)  # [batch, pos]
            if skip_first > 0:
                weight[:, :skip_first] = 0.0  # right padding: the first columns start every row
                weight *= (batch.position_in_text().to(device) >= skip_first).to(weight.dtype)
            counted = int(weight.sum().item())
            for recorder in recorders:
                recorder.token_weight = weight.reshape(-1)
            if attribute:
                with torch.enable_grad():
                    _summed_next_token_loss(model, batch, device)
                for recorder in recorders:
                    recorder.end_batch()
            else:
                forward_to_last_site(body, batch, device)
            ff.n += counted
            attn.n += counted
            n_texts += len(batch.text_index)
            if on_batch is not None:
                on_batch(ff.n)
            if ff.n > sample_tokens:
                break
    return ActivationStats(ff=ff, attn=attn, n_texts=n_texts)
