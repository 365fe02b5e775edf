"""`selprune classify` and `selprune fill-mask` against the real gateway under uvicorn, served by the real
serving loop (in a thread) on tiny random-init models: the command prints what the HTTP API answers,
through a mask, and bad input fails with a usage error or the gateway's 4xx, naming the problem."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from selprune.cli import main
from service.settings import GatewaySettings
from tests.helpers import build_vit, local_runtime, random_mask
from tests.integration import records
from tests.integration.servers import serving_thread, uvicorn_gateway
from tests.integration.test_mlm_jobs import save_tiny_mlm
from tests.unit.service.helpers import KEY_A, TENANT_A, auth
from worker.runtime import ModelRuntime

pytestmark = pytest.mark.redis


@pytest.fixture
def runtime(tmp_path: Path) -> ModelRuntime:
    build_vit().save_pretrained(tmp_path / "models" / "vit")
    save_tiny_mlm(tmp_path / "models" / "mlm")
    runtime = local_runtime(tmp_path)
    runtime.classifier("vit"), runtime.masked_lm("mlm")  # loaded before the first request
    return runtime


@pytest.fixture
def url(redis_url: str, tmp_path: Path, runtime: ModelRuntime, make_settings) -> Iterator[str]:
    settings = GatewaySettings(redis_url=redis_url, data_root=tmp_path, models=["vit", "mlm"], api_keys=KEY_A)
    with (
        serving_thread(make_settings(poll_block_ms=50), redis_url, runtime),
        uvicorn_gateway(settings) as url,
    ):
        yield url


def cli(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv[:1], "--url", url, "--api-key", KEY_A, *argv[1:]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_classify_prints_the_gateways_answer_through_a_mask(url, runtime, redis_url, tmp_path, capsys):
    client = redis.Redis.from_url(redis_url)
    mask = random_mask(runtime.classifier("vit").model, seed=3, frac=0.4)
    mask_id = records.store_mask(client, mask.to_bytes(), {"model": "vit"}, TENANT_A)
    client.close()
    files = []
    for i, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)):
        files.append(tmp_path / f"digit{i}.png")
        Image.fromarray(pixels).save(files[-1])

    code, out, err = cli(
        capsys, url, "classify", *map(str, files), "--mask", mask_id, "--top-k", "3", "--json"
    )
    assert code == 0, err
    printed = json.loads(out)
    body = {"images": [base64.b64encode(f.read_bytes()).decode() for f in files]}
    direct = httpx.post(
        f"{url}/v1/classify", json=body | {"mask_id": mask_id, "top_k": 3}, headers=auth(KEY_A)
    )
    assert direct.status_code == 200, direct.text
    assert printed["predictions"] == direct.json()["predictions"] and printed["mask_id"] == mask_id
    assert f"mask {mask_id}" in err and "3 input(s)" in err

    code, out, _ = cli(capsys, url, "classify", *map(str, files), "--mask", mask_id, "--top-k", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    for f, line, prediction in zip(files, lines, printed["predictions"], strict=True):
        best = prediction["labels"][0]
        assert line.startswith(f"{f}: {best['label']} ({best['probability']:.3f}), ")
        assert line.count("(") == 3

    code, _, err = cli(capsys, url, "classify", str(tmp_path / "missing.png"))
    assert code == 2 and "cannot read image" in err and "missing.png" in err
    code, _, err = cli(capsys, url, "classify", str(files[0]), "--mask", "no-such-mask")
    assert code == 1 and "404" in err


def test_fill_mask_prints_the_filled_text_and_candidates(url, runtime, redis_url, capsys):
    client = redis.Redis.from_url(redis_url)
    mask = random_mask(runtime.masked_lm("mlm").model, seed=4, frac=0.3)
    mask_id = records.store_mask(client, mask.to_bytes(), {"model": "mlm"}, TENANT_A)
    client.close()
    inputs = ["def add(a, b):\n    return a <mask> b", "the cat sat on the <mask> and the <mask> sat"]

    code, out, err = cli(capsys, url, "fill-mask", *inputs, "--mask", mask_id, "--top-k", "2", "--json")
    assert code == 0, err
    printed = json.loads(out)
    direct = httpx.post(
        f"{url}/v1/fill-mask", json={"inputs": inputs, "mask_id": mask_id, "top_k": 2}, headers=auth(KEY_A)
    )
    assert printed["results"] == direct.json()["results"]

    code, out, _ = cli(capsys, url, "fill-mask", *inputs, "--mask", mask_id, "--top-k", "2")
    expected = []  # each filled text (the first holds a newline), then one line per mask position
    for result in printed["results"]:
        expected += result["filled"].splitlines()
        expected += [f"  token {m['position']}: " for m in result["masks"]]
    lines = out.splitlines()
    assert code == 0 and len(lines) == len(expected) == 6
    assert all(line.startswith(prefix) for line, prefix in zip(lines, expected, strict=True))
    first = printed["results"][0]["masks"][0]
    assert f"token {first['position']}: {first['tokens'][0]['token']!r}" in out

    code, _, err = cli(capsys, url, "fill-mask", "no mask token here", "--model", "mlm")
    assert code == 1 and "422" in err and "no mask token" in err
