"""Image classification through masks end to end: /v1/classify -> the real gateway -> Redis -> the real
ServeLoop (in a thread) on a tiny random-init ViT -> back, equal to the model with the mask folded into
its weights; and one serving turn answering classifications on several masks as one batch, each row as
it is alone."""

from __future__ import annotations

import base64
import copy
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient
from PIL import Image

from protocol import ClassifyDone, ClassifyTask, keys
from selprune_core.masking import fold_into_weights
from selprune_core.masks import NeuronMask
from selprune_core.sites import resolve_sites
from service.main import create_app
from service.settings import GatewaySettings
from tests.helpers import build_vit, local_runtime, random_mask
from tests.integration import records
from tests.integration.servers import serving_thread
from tests.unit.service.helpers import KEY_A, TENANT_A, auth
from worker.image_models import preprocess
from worker.runtime import ModelRuntime
from worker.serving import ServeLoop, ensure_serve_group

pytestmark = pytest.mark.redis


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    build_vit().save_pretrained(tmp_path / "models" / "vit")
    return local_runtime(tmp_path)


@pytest.fixture
def gateway(redis_url, tmp_path, runtime, make_settings) -> Iterator[TestClient]:
    runtime.classifier("vit")  # loaded before the first request, so none waits on it
    settings = GatewaySettings(redis_url=redis_url, data_root=tmp_path, models=["vit"], api_keys=KEY_A)
    with serving_thread(make_settings(poll_block_ms=50), redis_url, runtime):
        with TestClient(create_app(settings)) as client:
            yield client


def pictures(n: int, seed: int = 0) -> np.ndarray:
    """[n, 8, 8] uint8 grey images."""
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8), dtype=np.uint8)


def png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def table(predictions: list[dict]) -> torch.Tensor:
    """[image, class] probabilities from a response's predictions (top_k = every class)."""
    out = torch.zeros(len(predictions), 10, dtype=torch.float64)
    for row, prediction in enumerate(predictions):
        for label in prediction["labels"]:
            out[row, label["id"]] = label["probability"]
    return out


def test_classify_through_a_mask_equals_the_folded_model(gateway, client, runtime):
    classifier = runtime.classifier("vit")
    mask = random_mask(classifier.model, seed=5, frac=0.4)
    mask_id = records.store_mask(client, mask.to_bytes(), {"model": "vit", "name": "pruned"}, TENANT_A)
    images = pictures(6)
    body = {"images": [png(p) for p in images], "mask_id": mask_id, "top_k": 10}
    resp = gateway.post("/v1/classify", json=body, headers=auth(KEY_A))
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["model"] == "vit" and answer["mask_id"] == mask_id and len(answer["predictions"]) == 6
    assert answer["predictions"][0]["labels"][0]["label"] == "LABEL_" + str(
        answer["predictions"][0]["labels"][0]["id"]
    )

    folded = copy.deepcopy(classifier.model)
    fold_into_weights(folded, resolve_sites(folded), mask)
    pixels = preprocess(torch.from_numpy(images[:, None] / 255.0).float(), classifier.preprocess)
    with torch.no_grad():
        expected = folded(pixel_values=pixels).logits.softmax(-1).double()
        base = classifier.model(pixel_values=pixels).logits.softmax(-1).double()
    got = table(answer["predictions"])
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    unmasked = gateway.post(
        "/v1/classify", json=body | {"mask_id": None, "model": "vit"}, headers=auth(KEY_A)
    ).json()
    torch.testing.assert_close(table(unmasked["predictions"]), base, atol=1e-5, rtol=0)


def test_one_turn_answers_classifications_on_several_masks_as_one_batch(redis_url, make_settings, runtime):
    client = redis.Redis.from_url(redis_url)
    classifier = runtime.classifier("vit")
    masks: list[NeuronMask | None] = [
        None,
        *(random_mask(classifier.model, seed=s, frac=0.5) for s in (1, 2)),
    ]
    ids = [
        None if m is None else records.store_mask(client, m.to_bytes(), {"model": "vit"}, "t") for m in masks
    ]
    now = time.time()
    tasks = [
        ClassifyTask(
            request_id=f"req{i}",
            tenant="t",
            model="vit",
            mask_id=ids[i % 3],
            images=[png(p) for p in pictures(2 + i, seed=i)],
            top_k=10,
            enqueued_at=now,
            deadline=now + 60,
        )
        for i in range(4)
    ]
    loop = ServeLoop(make_settings(poll_block_ms=50), client, runtime)
    ensure_serve_group(client)

    def serve(batch: list[ClassifyTask]) -> list[ClassifyDone]:
        for t in batch:
            client.xadd(keys.GENERATE_STREAM, {"classify": t.model_dump_json()})
        assert loop.turn() == len(batch)  # every task of the turn answered in it
        replies = []
        for t in batch:
            raw = client.lpop(keys.GENERATE_REPLY_KEY.format(request_id=t.request_id))
            replies.append(ClassifyDone.model_validate(json.loads(raw)))
        return replies

    together = serve(tasks)
    assert [r.timings.batch_rows for r in together] == [14] * 4  # 2 + 3 + 4 + 5 rows, one batch
    for t, done in zip(tasks, together, strict=True):
        (alone,) = serve([t])
        assert alone.timings.batch_rows == t.rows
        got = table([p.model_dump() for p in done.predictions])
        torch.testing.assert_close(got, table([p.model_dump() for p in alone.predictions]), atol=1e-6, rtol=0)
    client.close()
