"""GET /v1/jobs/{id}/plot: the PNG the worker stored, under the same tenant rules as the job itself."""

from __future__ import annotations

import pytest

from protocol import keys
from tests.unit.service.helpers import KEY_A, KEY_B, TENANT_A, assert_error, auth, put_job

pytestmark = pytest.mark.redis

PNG = b"\x89PNG\r\n\x1a\n" + b"not really an image, the route never decodes it"
JOB = "c" * 32


def test_plot_is_served_as_png(client, r):
    put_job(r, JOB, "local", "running")
    r.set(keys.JOB_PLOT_KEY.format(job_id=JOB), PNG)
    resp = client.get(f"/v1/jobs/{JOB}/plot")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "image/png"
    assert resp.content == PNG


def test_no_plot_before_the_first_step(client, r):
    put_job(r, JOB, "local", "queued")
    assert_error(client.get(f"/v1/jobs/{JOB}/plot"), 404, "PlotNotReady", "no completed step yet")


def test_a_job_of_another_kind_has_no_plot(client, r):
    put_job(r, JOB, "local", "succeeded", kind="evaluate")
    assert_error(client.get(f"/v1/jobs/{JOB}/plot"), 404, "PlotNotReady", "evaluate job")


def test_unknown_job_is_404(client):
    assert_error(client.get(f"/v1/jobs/{'0' * 32}/plot"), 404, "JobNotFound")


def test_another_tenants_plot_is_404_like_an_unknown_job(authed, r):
    put_job(r, JOB, TENANT_A, "succeeded")
    r.set(keys.JOB_PLOT_KEY.format(job_id=JOB), PNG)
    assert authed.get(f"/v1/jobs/{JOB}/plot", headers=auth(KEY_A)).content == PNG
    other = authed.get(f"/v1/jobs/{JOB}/plot", headers=auth(KEY_B))
    unknown = authed.get(f"/v1/jobs/{'0' * 32}/plot", headers=auth(KEY_B))
    assert_error(other, 404, "JobNotFound")
    assert other.json()["error"]["message"].replace(JOB, "0" * 32) == unknown.json()["error"]["message"]


def test_plot_needs_a_key_when_keys_are_configured(authed, r):
    put_job(r, JOB, TENANT_A, "succeeded")
    assert authed.get(f"/v1/jobs/{JOB}/plot").status_code == 401
