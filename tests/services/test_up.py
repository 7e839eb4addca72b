"""`dkdm up` as a user runs it: a real subprocess starting redis-server, a Ray head, the control plane and
the sampling app; a job posted over HTTP, sampled over HTTP, and still listed after a stop and a restart."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from services.up import UpOptions, api_token
from tests.conftest import run_dkdm
from tests.services.conftest import (
    BIN,
    Service,
    free_port,
    ray_head,
    retry_on_collision,
    running,
    start_process,
    stop_group,
    wait_for_http,
)

# The control plane's end-to-end job: 20 steps on the tiny teacher.
JOB = {
    "steps": 20,
    "pool": {"chain_steps": 10},
    "optim": {"batch_size": 16, "warmup_steps": 5},
    "run": {"log_every": 1, "checkpoint_every": 10, "eval_samples": 16, "sample_steps": 5},
    "ray": {"teacher_cpus": 1, "student_cpus": 1},
}
# A job that is still running, well past its first checkpoint, when `dkdm up` stops.
LONG_JOB = {**JOB, "steps": 100_000, "run": {**JOB["run"], "log_every": 5}}
# What `dkdm up` must find out by itself: no cluster, Redis or tokens inherited from the test session.
INHERITED = ("RAY_ADDRESS", "DKDM_REDIS_URL", "DKDM_API_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "DKDM_RUNS_DIR")


def poll(what: str, fn: Callable[[], Any], service: Service, timeout: float = 600.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        if service.process.poll() is not None:
            raise service.failed(f"exited with status {service.process.returncode} while waiting for {what}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid`` (from /proc), with its command line."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            found[p] = (Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")).strip()
        except OSError:
            continue
        todo += children.get(p, [])
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_up(data: Path, env: dict[str, str], api_port: int, sampling_port: int) -> Service:
    args = [str(BIN / "dkdm"), "up", "--data", str(data), "--num-cpus", "4", "--dashboard-port", str(free_port())]
    args += ["--api-port", str(api_port), "--sampling-port", str(sampling_port)]
    return start_process("dkdm up", args, env)


def announced(service: Service, what: str) -> str:
    """The URL `dkdm up` printed for ``what`` (once everything is up)."""
    pattern = re.compile(rf"^{what}:\s+(http://\S+?)(?:/v1/models/\S*)?(?:\s|$)", re.M)
    match = poll(f"`dkdm up` to print the {what} URL", lambda: pattern.search(service.output(100_000)), service)
    return match.group(1)


def stop(service: Service) -> None:
    """Ctrl-C: `dkdm up` exits 0 and leaves no process it started behind."""
    started = descendants(service.process.pid)
    assert any("redis-server" in c for c in started.values()) and any("raylet" in c for c in started.values())
    service.process.send_signal(signal.SIGINT)
    assert service.process.wait(timeout=180) == 0, service.output()
    deadline = time.monotonic() + 30  # a killed process may take a moment to leave /proc
    while left := {p: c for p, c in started.items() if alive(p)}:
        assert time.monotonic() < deadline, f"left running after Ctrl-C: {left}"
        time.sleep(0.5)
    assert "stopped" in service.output()


def test_the_api_token_is_given_or_generated_once_and_kept_private(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("DKDM_API_TOKEN", raising=False)
    token, source = api_token(UpOptions(), tmp_path)
    saved = tmp_path / "api-token"
    assert len(token) >= 16 and "generated" in source and saved.read_text().strip() == token
    assert saved.stat().st_mode & 0o077 == 0  # readable by its owner only
    assert api_token(UpOptions(), tmp_path) == (token, f"saved in {saved}")  # a restart keeps it
    monkeypatch.setenv("DKDM_API_TOKEN", "e" * 20)
    assert api_token(UpOptions(), tmp_path)[0] == "e" * 20
    assert api_token(UpOptions(token="f" * 20), tmp_path)[0] == "f" * 20


@pytest.mark.parametrize(
    "args, message",
    [
        (["--api-port", "70000"], "ports must be 0"),
        (["--num-cpus", "0"], "--num-cpus at least 1"),
        (["--token", "short"], "at least 16 characters"),
    ],
)
def test_bad_up_options_are_one_line_before_anything_starts(args: list[str], message: str, tmp_path: Path) -> None:
    proc = run_dkdm("up", "--data", str(tmp_path / "d"), *args, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("dkdm: error:") and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "redis-server" not in proc.stdout


@pytest.mark.slow
@pytest.mark.e2e
def test_up_runs_a_job_samples_it_and_keeps_it_across_a_restart(tiny_teacher: Path, tmp_path: Path) -> None:
    # Beside another Ray on the machine, as in a full run of the suite (its session head): a job's driver
    # must join `dkdm up`'s own cluster. Ray's job supervisor once picked the other one, and the job
    # failed with "PoolShard ... all references to the actor were removed ... never ran".
    with ray_head(num_cpus=1, auth=False) as other:
        _up_runs_a_job_samples_it_and_keeps_it(tiny_teacher, tmp_path)
        # Two Ctrl-C's of `dkdm up` stopped what it started and nothing else: the other head still answers.
        assert requests.get(f"{other.dashboard}/api/version", timeout=30).status_code == 200


def _up_runs_a_job_samples_it_and_keeps_it(tiny_teacher: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    env["DKDM_MODEL_ROOTS"] = json.dumps([str(tiny_teacher.parent)])  # the tiny teacher, besides up's own runs folder

    def first() -> Service:
        service = start_up(data, env, free_port(), free_port())
        try:
            wait_for_http(f"{announced(service, 'control plane')}/healthz", service)
        except BaseException:
            stop_group(service.process)
            raise
        return service

    with running(retry_on_collision(first)) as service:
        api, sampling = announced(service, "control plane"), announced(service, "sampling")
        auth = {"Authorization": f"Bearer {(data / 'api-token').read_text().strip()}"}
        assert requests.get(f"{api}/healthz").status_code == 200
        response = requests.post(f"{api}/jobs", json={**JOB, "teacher": str(tiny_teacher)}, headers=auth)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        view = poll("the job to end", lambda: _ended(api, job_id), service)
        assert view["state"] == "SUCCEEDED", view
        assert f"job-{job_id}" in requests.get(f"{api}/models").json()
        url = f"{sampling}/v1/models/job-{job_id}/samples"

        def sampled() -> requests.Response | None:
            try:
                r = requests.post(url, json={"num": 4, "steps": 5, "format": "npz"}, headers=auth, timeout=120)
            except requests.ConnectionError:
                return None  # Serve's proxy is still starting
            return r if r.status_code not in (502, 503) else None

        answer = poll("a sample", sampled, service, 180)
        assert answer.status_code == 200, answer.text
        with np.load(io.BytesIO(answer.content), allow_pickle=False) as arrays:
            assert arrays["arr_0"].shape == (4, 8, 8, 1)
        # A second job is still running when `dkdm up` stops: the restart must neither lose it nor leave
        # it RUNNING on a cluster that no longer runs it.
        response = requests.post(f"{api}/jobs", json={**LONG_JOB, "teacher": str(tiny_teacher)}, headers=auth)
        assert response.status_code == 202, response.text
        cut = response.json()["id"]
        poll("a checkpoint of the second job", lambda: requests.get(f"{api}/jobs/{cut}").json()["checkpoints"], service)
        stop(service)

    # Again on the same data folder, on free ports it picks itself: Redis replays its append-only file.
    with running(start_up(data, env, 0, 0)) as service:
        api, sampling = announced(service, "control plane"), announced(service, "sampling")
        wait_for_http(f"{api}/healthz", service)
        assert requests.get(f"{api}/jobs/{job_id}").json()["state"] == "SUCCEEDED"
        assert f"job-{job_id}" in requests.get(f"{api}/models").json()
        assert f"job-{job_id}" in poll("the sampling app", lambda: _models(sampling), service, 180)
        assert f"saved in {data / 'api-token'}" in service.output()  # the same token as before
        # Its driver died with the cluster: it said so itself, or the control plane finds it gone (Ray no
        # longer knows it and it stopped beating).
        view = poll("the cut job to be failed", lambda: _ended(api, cut), service, 120)
        assert view["state"] == "FAILED" and view["error"] and "\n" not in view["error"], view
        resumed = requests.post(f"{api}/jobs/{cut}/resume", headers=auth)
        assert resumed.status_code == 202, resumed.text
        running_again = poll("the resumed job to run", lambda: _running(api, cut), service)
        assert running_again["submission"] == f"dkdm-{cut}-r1"
        assert running_again["submissions"][0]["outcome"] == "FAILED"
        assert requests.post(f"{api}/jobs/{cut}/cancel", headers=auth).status_code == 200
        view = poll("the resumed job to stop", lambda: _ended(api, cut), service)
        assert view["state"] == "CANCELLED" and view["step"] < LONG_JOB["steps"], view
        stop(service)


def _running(api: str, job_id: str) -> dict[str, Any] | None:
    view = requests.get(f"{api}/jobs/{job_id}").json()
    return view if view["state"] == "RUNNING" else None


def _ended(api: str, job_id: str) -> dict[str, Any] | None:
    view = requests.get(f"{api}/jobs/{job_id}").json()
    return view if view["state"] not in ("PENDING", "RUNNING") else None


def _models(sampling: str) -> dict[str, Any] | None:
    try:
        r = requests.get(f"{sampling}/v1/models", timeout=30)
    except requests.ConnectionError:
        return None
    return r.json() if r.status_code == 200 else None
