"""Real services for the service tests: a redis-server per session and Ray heads started with `ray start`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.engine.embedded import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def cluster_env(**extra: str) -> dict[str, str]:
    """The environment of cluster processes: this venv's `python` first, token auth on both sides."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token", **extra}


@dataclass
class RayHead:
    dashboard: str  # http://127.0.0.1:PORT, the job-submission address
    gcs: str  # 127.0.0.1:PORT, what RAY_ADDRESS names


def wait_for_http(url: str, process: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token, 404...): it is up
        except OSError:
            assert process.poll() is None, f"the process serving {url} exited"
            assert time.monotonic() < deadline, f"{url} did not come up"
            time.sleep(0.3)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started with start_new_session and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[RayHead]:
    """A separate Ray head on free ports, started in the project root; only its processes are stopped."""
    temp = tempfile.mkdtemp(prefix="dkdm-rh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    args = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--temp-dir", temp]
    args += ["--port", str(gcs), "--dashboard-port", str(dashboard), "--dashboard-host", "127.0.0.1"]
    args += ["--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port())]
    head = subprocess.Popen(
        args, cwd=ROOT, env=cluster_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_http(f"http://127.0.0.1:{dashboard}/api/version", head)
        yield RayHead(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}")
    finally:
        stop_group(head)
