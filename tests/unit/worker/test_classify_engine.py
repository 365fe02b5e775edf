"""The serving lane's image classification on a tiny random-init ViT: images decoded and prepared as the
jobs prepare them, a masked row equal to the model with that mask folded into its weights, every row of
a mixed-mask batch equal to its solo result, and a bad request failing alone."""

from __future__ import annotations

import base64
import copy
import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protocol import ClassifyDone, ClassifyTask, GenerateFailed
from selprune_core.masking import fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.sites import resolve_sites
from tests.helpers import build_vit, random_mask
from worker.classify_engine import ClassifyEngine, decode_pixels
from worker.errors import MaskNotFoundError
from worker.image_models import preprocess
from worker.runtime import ModelRuntime
from worker.serve_engine import ServeError


def b64_png(array: np.ndarray, mode: str | None = None) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def b64_npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def runtime(tmp_path: Path, tiny_model, tokenizer) -> ModelRuntime:
    build_vit().save_pretrained(tmp_path / "models" / "vit")
    tiny_model("llama").save_pretrained(tmp_path / "models" / "llama")
    tokenizer.save_pretrained(tmp_path / "models" / "llama")
    return ModelRuntime(
        cache_dir=tmp_path, data_root=tmp_path, device="cpu", dtype="float32", models_root=tmp_path / "models"
    )


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(n)]


def task(
    pictures: list[str], mask_id: str | None = None, top_k: int = 10, model: str = "vit"
) -> ClassifyTask:
    now = time.time()
    return ClassifyTask(
        request_id=f"r{now}{mask_id}{len(pictures)}".replace(".", ""),
        tenant="t",
        model=model,
        mask_id=mask_id,
        images=pictures,
        top_k=top_k,
        enqueued_at=now,
        deadline=now + 60,
    )


class Engine:
    """A ClassifyEngine on `runtime` with masks held in memory for tenant "t"."""

    def __init__(self, runtime: ModelRuntime, masks: list[NeuronMask]) -> None:
        self.masks = {m.mask_id: m.to_bytes() for m in masks}
        self.engine = ClassifyEngine(runtime, self._load, mask_slots=4, max_rows=5)

    def _load(self, mask_id: str, tenant: str) -> bytes:
        if tenant != "t" or mask_id not in self.masks:
            raise MaskNotFoundError(mask_id)
        return self.masks[mask_id]

    def run(self, tasks: list[ClassifyTask]) -> list[ClassifyDone | GenerateFailed]:
        replies: dict[str, ClassifyDone | GenerateFailed] = {}
        self.engine.run(tasks, lambda events: replies.update({t.request_id: e for t, e in events}))
        return [replies[t.request_id] for t in tasks]


def probabilities(done: ClassifyDone | GenerateFailed) -> torch.Tensor:
    """[image, class] probabilities, in class order (top_k = every class)."""
    assert isinstance(done, ClassifyDone), done
    out = torch.zeros(len(done.predictions), 10, dtype=torch.float64)
    for row, prediction in enumerate(done.predictions):
        for label in prediction.labels:
            out[row, label.id] = label.probability
    return out


def test_a_masked_row_equals_the_model_with_the_mask_folded_in(runtime):
    classifier = runtime.classifier("vit")
    mask = random_mask(classifier.model, seed=3, frac=0.4)
    pictures = images(7)
    got = probabilities(Engine(runtime, [mask]).run([task([b64_png(p) for p in pictures], mask.mask_id)])[0])
    folded = copy.deepcopy(classifier.model)
    fold_into_weights(folded, resolve_sites(folded), mask)
    pixels = preprocess(torch.from_numpy(np.stack(pictures)[:, None] / 255.0).float(), classifier.preprocess)
    with torch.no_grad():
        expected = folded(pixel_values=pixels).logits.softmax(-1).double()
        unmasked = classifier.model(pixel_values=pixels).logits.softmax(-1).double()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert not torch.allclose(got, unmasked, atol=1e-3)  # the mask did change the answer


def test_every_row_of_a_mixed_mask_batch_equals_its_solo_result(runtime):
    model = runtime.classifier("vit").model
    masks = [random_mask(model, seed=s, frac=0.5) for s in (1, 2)]
    engine = Engine(runtime, masks)
    batch = [
        task([b64_png(p) for p in images(3, seed=10)]),
        task([b64_png(p) for p in images(4, seed=11)], masks[0].mask_id),
        task([b64_png(p) for p in images(2, seed=12)], masks[1].mask_id),
        task([b64_png(p) for p in images(3, seed=13)], masks[0].mask_id, top_k=3),
    ]
    together = engine.run(batch)  # 12 rows, 3 masks (slot 0 too), in forwards of 5 rows
    assert all(isinstance(d, ClassifyDone) and d.timings.batch_rows == 12 for d in together)
    for one, done in zip(batch, together, strict=True):
        (alone,) = engine.run([one])
        torch.testing.assert_close(probabilities(done), probabilities(alone), atol=1e-6, rtol=0)
        assert isinstance(done, ClassifyDone) and len(done.predictions[0].labels) == one.top_k


def test_images_decode_to_the_models_input(runtime):
    classifier = runtime.classifier("vit")
    grey = images(1)[0]
    as_png = decode_pixels(b64_png(grey), 1)
    assert as_png.shape == (1, 8, 8) and torch.allclose(as_png, torch.from_numpy(grey / 255.0).float()[None])
    assert torch.equal(decode_pixels(b64_npy(grey), 1), as_png)  # uint8 .npy: 0..255 as well
    assert torch.equal(decode_pixels(b64_npy(grey[None] / 255.0), 1), as_png)  # float .npy: 0..1
    rgb = np.stack([grey, grey, grey], axis=-1)
    assert torch.equal(decode_pixels(b64_png(rgb), 1), as_png)  # RGB read as grey (luma)
    assert decode_pixels(b64_png(grey), 3).shape == (3, 8, 8)
    big = np.kron(grey, np.ones((4, 4), np.uint8))  # 32x32: resized to the model's 8x8
    assert preprocess(decode_pixels(b64_png(big), 1)[None], classifier.preprocess).shape == (1, 1, 8, 8)
    for bad, message in [
        (b64_npy(np.array([None], dtype=object)), "pickle"),
        (b64_npy(np.zeros((2, 8, 8))), "1, 3 or 4 channels"),
        (b64_npy(np.full((8, 8), 3.0)), "intensities in \\[0, 1\\]"),
        (base64.b64encode(b"\x89PNG\r\n\x1a\ntruncated").decode(), "cannot read the image file"),
    ]:
        with pytest.raises(ServeError, match=message) as info:
            decode_pixels(bad, 1)
        assert info.value.type == "InvalidImage"


def test_a_bad_request_fails_alone(runtime):
    good = task([b64_png(images(1)[0])])
    broken = task([b64_png(images(1)[0]), b64_npy(np.full((8, 8), 7.0))])
    unknown_mask = task([b64_png(images(1)[0])], mask_id="nope")
    text_model = task([b64_png(images(1)[0])], model="llama")
    replies = Engine(runtime, []).run([good, broken, unknown_mask, text_model])
    assert isinstance(replies[0], ClassifyDone)
    errors = [(r.error.type, r.error.message) for r in replies[1:] if isinstance(r, GenerateFailed)]
    assert [e[0] for e in errors] == ["InvalidImage", "MaskNotFound", "ModelKindMismatch"]
    assert errors[0][1].startswith("images[1]:") and "'llama' is a language model" in errors[2][1]
