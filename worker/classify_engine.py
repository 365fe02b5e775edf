"""ClassifyEngine: image classification requests on the serving lane, every image a row through its
own mask.

The serving loop (worker/serving.py) hands it the classification tasks it read in one turn; the engine
groups them by model and answers each with one ClassifyDone or error event. Masks come from the same
device-resident `MaskTable` mechanism as generation (worker/mask_table.py, one table per model; a row
is a slot, slot 0 unmasked), and rows of different masks run as one forward pass through
`apply_row_masks` with the per-row keep factors the table gathers. Classification is a single forward,
so there is no decoding loop: every task of a turn is answered in that turn.

Images are decoded here (PNG and JPEG with Pillow, `.npy` with NumPy, never pickled), then prepared as
the model expects (worker/image_models.py `preprocess`: channels, size, normalisation), exactly as image
datasets are for jobs. A request that fails (an undecodable image, an unknown mask) fails alone; only a
device failure (worker/errors.py `classify`) fails everything and stops the worker.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from protocol import ClassifyDone, ClassifyTask, ClassLabel, GenerateFailed, GenerateTimings, ImagePrediction
from protocol.classify import MAX_IMAGE_SIDE, decode_image
from selprune_core.errors import ConfigError, DatasetError
from selprune_core.masking import apply_row_masks
from worker.errors import Outcome, WorkerFatalError, classify
from worker.image_data import intensities
from worker.image_models import LoadedClassifier, preprocess
from worker.mask_table import MaskTable
from worker.runtime import ModelRuntime
from worker.serve_engine import MaskLoader, ServeError, failed, mask_slot

__all__ = ["ClassifyEngine", "decode_pixels"]

log = logging.getLogger(__name__)

ClassifyReply = Callable[[list[tuple[ClassifyTask, ClassifyDone | GenerateFailed]]], None]


@dataclass
class _Prepared:
    task: ClassifyTask
    slot: int  # mask table slot; 0 = unmasked
    pixels: torch.Tensor  # [images, C, H, W], the model's input


def decode_pixels(text: str, channels: int) -> torch.Tensor:
    """One base64 image as intensities in [0, 1] [C, H, W]; ServeError InvalidImage otherwise."""
    try:
        raw, kind = decode_image(text)
        if kind == "npy":
            array = np.load(io.BytesIO(raw), allow_pickle=False)
            if array.ndim == 2:
                array = array[None]
            if array.ndim != 3 or array.shape[0] not in (1, 3, 4):
                raise ValueError(
                    f"an .npy image must be [H, W] or [C, H, W] with 1, 3 or 4 channels, not {list(array.shape)}"
                )
            pixels = intensities(array, "the .npy image")
        else:
            with Image.open(io.BytesIO(raw)) as image:
                if max(image.size) > MAX_IMAGE_SIDE:
                    raise ValueError(
                        f"the image is {image.size[0]}x{image.size[1]}; the limit is {MAX_IMAGE_SIDE} a side"
                    )
                grey = channels == 1
                array = np.asarray(image.convert("L" if grey else "RGB"))  # [H, W] or [H, W, 3] uint8
            pixels = intensities(array[None] if grey else array.transpose(2, 0, 1), kind)
    except (ValueError, DatasetError) as exc:
        raise ServeError("InvalidImage", str(exc)) from None
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:  # a corrupt file
        raise ServeError("InvalidImage", f"cannot read the image file: {exc}") from None
    if max(pixels.shape[1:]) > MAX_IMAGE_SIDE or min(pixels.shape[1:]) < 1:
        raise ServeError("InvalidImage", f"an image must be 1 to {MAX_IMAGE_SIDE} pixels a side")
    return pixels


class ClassifyEngine:
    def __init__(
        self, runtime: ModelRuntime, load_mask: MaskLoader, *, mask_slots: int, max_rows: int = 64
    ) -> None:
        self.runtime = runtime
        self.load_mask = load_mask
        self.mask_slots = mask_slots
        self.max_rows = max_rows  # images per forward pass
        self._tables: dict[str, MaskTable] = {}  # model ref -> its masks on its device

    def run(self, tasks: Sequence[ClassifyTask], reply: ClassifyReply) -> None:
        """Answer every task: one forward pass per model (in chunks of `max_rows` images)."""
        by_model: dict[str, list[ClassifyTask]] = {}
        for task in tasks:
            by_model.setdefault(task.model, []).append(task)
        for ref, group in by_model.items():
            self._run_model(ref, group, reply)

    def _table(self, ref: str, classifier: LoadedClassifier) -> MaskTable:
        table = self._tables.get(ref)
        if table is None or table.fingerprint != classifier.fingerprint:
            table = MaskTable(classifier.sites, classifier.fingerprint, classifier.device, self.mask_slots)
            self._tables[ref] = table
        return table

    def _run_model(self, ref: str, tasks: list[ClassifyTask], reply: ClassifyReply) -> None:
        try:
            classifier = self.runtime.classifier(ref)
            table = self._table(ref, classifier)
        except ConfigError as exc:  # a language model: it generates, it does not classify
            reply([(t, failed("ModelKindMismatch", str(exc))) for t in tasks])
            return
        except Exception as exc:
            self._fail(tasks, exc, reply, what=f"model {ref!r} could not be loaded")
            return
        admitted_at = time.time()
        batch: list[_Prepared] = []
        in_use: set[str] = set()
        for task in tasks:
            if task.mask_id is not None and task.mask_id not in in_use and len(in_use) >= table.capacity:
                self._forward(
                    classifier, table, batch, reply, admitted_at
                )  # the table is full: run what it holds
                batch, in_use = [], set()
            try:
                slot = 0 if task.mask_id is None else mask_slot(table, task, self.load_mask, in_use)
                pixels = self._prepare(task, classifier)
            except ServeError as exc:
                reply([(task, failed(exc.type, str(exc)))])
                continue
            except Exception as exc:  # a bug, or the device
                self._fail([task], exc, reply, what="classification failed")
                continue
            if task.mask_id is not None:
                in_use.add(task.mask_id)
            batch.append(_Prepared(task, slot, pixels))
        self._forward(classifier, table, batch, reply, admitted_at)

    @staticmethod
    def _prepare(task: ClassifyTask, classifier: LoadedClassifier) -> torch.Tensor:
        """The task's images as the model's input [images, C, H, W]; ServeError naming a bad one."""
        prep, out = classifier.preprocess, []
        for i, text in enumerate(task.images):
            try:
                pixels = decode_pixels(text, prep.channels)[None]  # [1, C, H, W]
                out.append(preprocess(pixels, prep, classifier.dtype))
            except ServeError as exc:
                raise ServeError(exc.type, f"images[{i}]: {exc}") from None
            except ConfigError as exc:  # channels the model cannot take
                raise ServeError("InvalidImage", f"images[{i}]: {exc}") from None
        return torch.cat(out)

    def _forward(
        self,
        classifier: LoadedClassifier,
        table: MaskTable,
        batch: list[_Prepared],
        reply: ClassifyReply,
        admitted_at: float,
    ) -> None:
        """Every image of `batch` through its row's mask, `max_rows` at a time; answer each task."""
        if not batch:
            return
        start = time.perf_counter()
        rows = sum(len(p.pixels) for p in batch)
        try:
            pixels = torch.cat([p.pixels for p in batch]).to(classifier.device)  # [rows, C, H, W]
            slots = [p.slot for p in batch for _ in range(len(p.pixels))]
            probs = []
            for begin in range(0, rows, self.max_rows):
                chunk = slice(begin, begin + self.max_rows)
                factors = table.factors(slots[chunk], classifier.dtype)
                with torch.inference_mode():
                    if factors is None:  # nobody masked: no hooks at all
                        logits = classifier.model(pixel_values=pixels[chunk]).logits
                    else:
                        with apply_row_masks(classifier.sites, factors):
                            logits = classifier.model(pixel_values=pixels[chunk]).logits
                    probs.append(logits.float().softmax(-1).cpu())  # [chunk, n_classes]
            every = torch.cat(probs)
        except Exception as exc:
            self._fail([p.task for p in batch], exc, reply, what="classification failed")
            return
        model_ms = 1000 * (time.perf_counter() - start)
        events: list[tuple[ClassifyTask, ClassifyDone | GenerateFailed]] = []
        at = 0
        for prepared in batch:
            task, n = prepared.task, len(prepared.pixels)
            top = every[at : at + n].topk(min(task.top_k, classifier.n_classes), dim=-1)
            at += n
            predictions = [
                ImagePrediction(
                    labels=[
                        ClassLabel(id=int(i), label=classifier.labels[int(i)], probability=float(p))
                        for p, i in zip(values.tolist(), ids.tolist(), strict=True)
                    ]
                )
                for values, ids in zip(top.values, top.indices, strict=True)
            ]
            timings = GenerateTimings(
                queue_ms=max(0.0, 1000 * (admitted_at - task.enqueued_at)), model_ms=model_ms, batch_rows=rows
            )
            done = ClassifyDone(
                model=task.model, mask_id=task.mask_id, predictions=predictions, timings=timings
            )
            events.append((task, done))
        reply(events)

    def _fail(self, tasks: list[ClassifyTask], exc: Exception, reply: ClassifyReply, *, what: str) -> None:
        """Answer `tasks` with `exc`; a device failure also stops serving (the worker restarts)."""
        outcome = classify(exc)
        if outcome is Outcome.out_of_memory:
            reply(
                [(t, failed("OutOfMemory", "out of device memory; retry with fewer images")) for t in tasks]
            )
            return
        if outcome is Outcome.rejected:  # a model that does not load (ModelLoadError, no hook sites)
            reply([(t, failed(type(exc).__name__, f"{what}: {exc}")) for t in tasks])
            return
        log.error("%s (%d requests)", what, len(tasks), exc_info=exc)
        reply([(t, failed("InternalError", f"{what}: {exc}")) for t in tasks])
        if outcome is Outcome.device_failure:
            raise WorkerFatalError(f"device failure while classifying: {exc}") from exc
