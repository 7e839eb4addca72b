"""The sampling service's guards, on a real Ray Serve app deployed with `dkdm serve sampling` onto a real
Ray head: the bearer token, the bound on concurrent requests (503 + Retry-After) and the cost budget."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from dkdm_core.checkpoint import count_parameters
from services.jobs.store import ModelRegistry
from tests.conftest import run_dkdm
from tests.services.conftest import BIN, ROOT, cluster_env, free_port, ray_head, redis_server
from tests.services.control_plane.conftest import TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RETRY_AFTER_S = 7
HEAVY = {"num": 64, "steps": 100, "format": "npz"}  # a few seconds of one core for the tiny model


@pytest.fixture(scope="module")
def cluster(tiny_teacher: Path) -> Iterator[dict[str, str]]:
    """Redis with two registered models and a Ray head: the environment `dkdm serve sampling` runs in, with
    one request at a time per replica and one waiting."""
    parameters = count_parameters(tiny_teacher)
    with redis_server() as server, ray_head(num_cpus=2) as head:
        registry = ModelRegistry(redis.Redis.from_url(server.url, decode_responses=True))
        registry.register("tiny", str(tiny_teacher), arch="unet-tiny")
        cond = ROOT / "dkdm_core" / "assets" / "teachers" / "digits-cond"
        registry.register("digits-cond", str(cond), arch="unet-small")
        yield cluster_env(
            DKDM_API_TOKEN=TOKEN,
            DKDM_REDIS_URL=server.url,
            RAY_ADDRESS=head.gcs,
            DKDM_SAMPLING_MAX_ONGOING_REQUESTS="1",
            DKDM_SAMPLING_MAX_QUEUED_REQUESTS="1",
            DKDM_SAMPLING_RETRY_AFTER_S=str(RETRY_AFTER_S),
            DKDM_SAMPLING_MAX_COST=str(100 * 100 * parameters),  # 100 samples at 100 steps
            DKDM_SAMPLING_GPUS_PER_REPLICA="0",
        )


def serve_sampling(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dkdm"), "serve", "sampling", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def sampling(cluster: dict[str, str], tiny_teacher: Path) -> Iterator[tuple[str, int]]:
    """The service deployed, serving the tiny teacher."""
    port = free_port()
    # The device rule of every command, on the CPU this suite runs on: no GPU asked of Ray.
    deployed = serve_sampling(cluster, "--port", str(port), "--device", "cpu")
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    yield f"http://127.0.0.1:{port}", count_parameters(tiny_teacher)


def post(url: str, body: dict, headers: dict | None = None, timeout: float = 300) -> requests.Response:
    """POST once the HTTP proxy answers (it starts a moment after the deployment)."""
    import time

    deadline = time.monotonic() + 120
    while True:
        try:
            return requests.post(url, json=body, headers=headers, timeout=timeout)
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "the sampling service did not come up"
            time.sleep(0.5)


def test_sampling_needs_the_token_and_the_model_list_shows_no_paths(
    sampling: tuple[str, int], tiny_teacher: Path
) -> None:
    base, parameters = sampling
    url = f"{base}/v1/models/tiny/samples"
    small = {"num": 2, "steps": 2, "format": "json"}
    missing = post(url, small)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert post(url, small, {"Authorization": "Bearer wrong-token-0123456789"}).status_code == 401
    assert post(f"{base}/v1/models/nope/samples", small).status_code == 401  # no model names to strangers
    assert post(f"{base}/v1/models/nope/samples", small, AUTH).status_code == 404
    assert post(url, small, AUTH).status_code == 200
    listed = requests.get(f"{base}/v1/models", timeout=30)  # readable without the token
    assert listed.status_code == 200
    assert set(listed.json()) == {"tiny", "digits-cond"}
    assert listed.json()["tiny"] == {
        "created": listed.json()["tiny"]["created"],
        "arch": "unet-tiny",
        "parameters": parameters,
    }
    assert str(tiny_teacher) not in listed.text and "/" not in json.dumps(listed.json())


def test_a_request_over_the_cost_budget_is_refused_naming_num(sampling: tuple[str, int]) -> None:
    base, parameters = sampling
    response = post(f"{base}/v1/models/tiny/samples", {"num": 200, "steps": 100}, AUTH)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "num"] and "at most 100 samples at 100 steps" in error["msg"]
    assert str(parameters) in error["msg"]


def test_requests_beyond_the_bound_get_503_with_retry_after(sampling: tuple[str, int]) -> None:
    """One runs, one waits, the rest are shed at once. A round in which the first request ended before
    the others arrived (a very slow client) proves nothing, so it is tried again, up to three rounds."""
    url = f"{sampling[0]}/v1/models/tiny/samples"
    post(url, {"num": 1, "steps": 1, "format": "json"}, AUTH)  # the replica holds the model from here on
    statuses: list[tuple[int, str | None]] = []
    for _ in range(3):
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: post(url, HEAVY, AUTH), range(6)))
        statuses += [(r.status_code, r.headers.get("retry-after")) for r in responses]
        if any(code == 503 for code, _ in statuses):
            break
    assert (503, str(RETRY_AFTER_S)) in statuses, statuses
    assert {code for code, _ in statuses} == {200, 503}, statuses


def test_sampling_by_class_with_guidance_and_class_fields_checked(sampling: tuple[str, int], tmp_path: Path) -> None:
    import numpy as np
    import torch

    from services.evaluation import load_classifier

    base = sampling[0] + "/v1/models"
    body = {"num": 8, "steps": 20, "format": "json", "class_labels": [4], "guidance_scale": 2.0}
    r = post(f"{base}/digits-cond/samples", body, AUTH)
    assert r.status_code == 200, r.text
    arr = np.asarray(r.json()["samples"], dtype=np.uint8)  # (8, 8, 8, 1)
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        assert (load_classifier()(images).argmax(1) == 4).float().mean() >= 0.75
    # The same through the REST client: `dkdm jobs sample --class 7 --guidance-scale 2`.
    out = tmp_path / "sevens.npz"
    env = {"DKDM_SAMPLE_URL": sampling[0], "DKDM_API_TOKEN": TOKEN}
    args = ["jobs", "sample", "digits-cond", "--num", "8", "--steps", "20", "--out", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        run_dkdm(*args, "--class", "7", "--guidance-scale", "2")
    sevens = torch.from_numpy(np.load(out)["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        assert (load_classifier()(sevens).argmax(1) == 7).float().mean() >= 0.75
    r = post(f"{base}/digits-cond/samples", {"num": 2, "class_labels": [1, 2, 3]}, AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "class_labels"]
    r = post(f"{base}/tiny/samples", {"num": 2, "guidance_scale": 3.0}, AUTH)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "guidance_scale"]


def test_gpus_the_cluster_lacks_are_one_line_before_deploying(cluster: dict[str, str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine's Ray head has a GPU")
    proc = serve_sampling(cluster, "--port", str(free_port()), "--device", "cuda", "--gpus-per-replica", "1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "dkdm: error: a sampler replica asks Ray for 1 GPU(s) (device 'cuda'), but the cluster has 0: "
        "use device cpu, or fewer GPUs per replica"
    ]
