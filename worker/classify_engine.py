"""ClassifyEngine: image classification requests on the serving lane, every image a row through its
own mask (the shared machinery, masks and batching, is worker/row_engine.py's `RowEngine`).

Images are decoded here (PNG and JPEG with Pillow, `.npy` with NumPy, never pickled), then prepared as
the model expects (worker/image_models.py `preprocess`: channels, size, normalisation), exactly as image
datasets are for jobs. A request that fails (an undecodable image, an unknown mask) fails alone; only a
device failure (worker/errors.py `classify`) fails everything and stops the worker.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from protocol import ClassifyDone, ClassifyTask, ClassLabel, GenerateTimings, ImagePrediction
from protocol.classify import MAX_IMAGE_SIDE, decode_image
from selprune_core.errors import ConfigError, DatasetError
from worker.image_data import intensities
from worker.image_models import LoadedClassifier, preprocess
from worker.row_engine import RowEngine
from worker.serve_engine import ServeError

__all__ = ["ClassifyEngine", "decode_pixels"]


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


class ClassifyEngine(RowEngine[ClassifyTask, LoadedClassifier, ClassifyDone]):
    """Rows are images ([C, H, W] model input); outputs their class probabilities [n_classes]."""

    what = "classification"

    def target(self, ref: str) -> LoadedClassifier:
        return self.runtime.classifier(ref)  # ConfigError for a language model

    @staticmethod
    def dtype(target: LoadedClassifier) -> torch.dtype:
        return target.dtype

    def prepare(self, task: ClassifyTask, target: LoadedClassifier) -> list[Any]:
        """The task's images as the model's input, one [C, H, W] each; ServeError naming a bad one."""
        prep, out = target.preprocess, []
        for i, text in enumerate(task.images):
            try:
                pixels = decode_pixels(text, prep.channels)[None]  # [1, C, H, W]
                out.append(preprocess(pixels, prep, target.dtype)[0])
            except ServeError as exc:
                raise ServeError(exc.type, f"images[{i}]: {exc}") from None
            except ConfigError as exc:  # channels the model cannot take
                raise ServeError("InvalidImage", f"images[{i}]: {exc}") from None
        return out

    def compute(self, target: LoadedClassifier, rows: list[Any]) -> list[Any]:
        pixels = torch.stack(rows).to(target.device)  # [rows, C, H, W]
        logits = target.model(pixel_values=pixels).logits  # [rows, n_classes]
        return list(logits.float().softmax(-1).cpu())

    def answer(
        self, task: ClassifyTask, target: LoadedClassifier, outputs: list[Any], timings: GenerateTimings
    ) -> ClassifyDone:
        top = torch.stack(outputs).topk(min(task.top_k, target.n_classes), dim=-1)
        predictions = [
            ImagePrediction(
                labels=[
                    ClassLabel(id=int(i), label=target.labels[int(i)], probability=float(p))
                    for p, i in zip(values.tolist(), ids.tolist(), strict=True)
                ]
            )
            for values, ids in zip(top.values, top.indices, strict=True)
        ]
        return ClassifyDone(model=task.model, mask_id=task.mask_id, predictions=predictions, timings=timings)
