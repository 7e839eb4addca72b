"""Real services for the service tests: redis-server, Ray heads started with `ray start`, and helpers to
start any server process with its output kept.

The suite runs on loaded machines, beside other test sessions. So every service writes its output to a
log file that a failed start (or a test failing while it runs) shows; every port a Ray head would take
by default is chosen here, from below the kernel's ephemeral range (outgoing connections never take
those), checked free and claimed machine-wide (a file per port that names the claiming process), so two
sessions side by side never hand out the same port and their clusters cannot collide; and a start that
still loses a port race to some other program is retried once with fresh ports.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from services.engine.embedded import RedisServer

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
T = TypeVar("T")

# What servers print when a port was taken between our check and their bind.
COLLISION = re.compile(r"(?i)address already in use|already in use|EADDRINUSE|failed to bind|bind.*port")


class ServiceFailed(AssertionError):
    """A service that exited or never answered; the message carries its output."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(port: int) -> bool:
    """Nothing listens on ``port`` on any address (Ray's agents bind the node's IP, not loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


_taken: set[int] = set()  # ports this session handed out: never handed out twice
CLAIMS = Path(tempfile.gettempdir()) / "dkdm-test-ports"  # one file per port a live session holds


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(port: int) -> bool:
    """Claim ``port`` for this process on the whole machine; False if a live process holds it.

    A claim is a file created exclusively. One whose process is gone is taken over by renaming it away
    first: a rename succeeds for one session only, so two sessions never both take it over."""
    CLAIMS.mkdir(exist_ok=True)
    path = CLAIMS / str(port)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(path.read_text() or "0")
            except (OSError, ValueError):
                return False  # being written or taken over right now
            if holder and _alive(holder):
                return False
            try:
                path.rename(CLAIMS / f".stale-{port}-{os.getpid()}")
            except OSError:
                return False  # another session took it over first
            (CLAIMS / f".stale-{port}-{os.getpid()}").unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release_ports(ports: list[int]) -> None:
    """Give back ports this session claimed (their service has stopped): others may claim them now."""
    for port in ports:
        _taken.discard(port)
        with contextlib.suppress(OSError):
            if (CLAIMS / str(port)).read_text() == str(os.getpid()):
                (CLAIMS / str(port)).unlink()


atexit.register(lambda: release_ports(list(_taken)))


def reserve_ports(n: int, contiguous: bool = False) -> list[int]:
    """``n`` free TCP ports (a run of consecutive ones with ``contiguous``) between 20000 and the
    ephemeral range, picked at random and claimed machine-wide (``_claim``) before they are handed out."""
    low, high = 20000, _ephemeral_low() - 1
    for _ in range(1000):
        if contiguous:
            start = random.randint(low, high - n)
            ports = list(range(start, start + n))
        else:
            ports = random.sample(range(low, high), n)
        if _taken.intersection(ports) or not all(bindable(p) for p in ports):
            continue
        claimed = []
        for port in ports:
            if not _claim(port):
                break
            claimed.append(port)
        _taken.update(claimed)
        if len(claimed) == n:
            return ports
        release_ports(claimed)  # another session holds one of them: keep none, or the range fragments
    raise RuntimeError(f"no {n} free ports between {low} and {high}")


def free_port() -> int:
    return reserve_ports(1)[0]


def retry_on_collision(start: Callable[[], T]) -> T:
    """``start()``, once more if it failed because a port it chose was taken meanwhile."""
    try:
        return start()
    except (ServiceFailed, RuntimeError) as exc:
        if not COLLISION.search(str(exc)):
            raise
        return start()


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self, limit: int = 6000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-limit:]

    def failed(self, why: str) -> ServiceFailed:
        return ServiceFailed(f"{self.name} {why}; its output:\n{self.output()}")


def start_process(name: str, args: list[str], env: dict[str, str] | None = None) -> Service:
    """Start ``args`` in its own session with stdout and stderr in a log file."""
    log = Path(tempfile.mkstemp(prefix=f"dkdm-{name.replace(' ', '-')}-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(name, process, log)


def wait_for_http(url: str, service: Service, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token, 404...): it is up
        except OSError:
            if service.process.poll() is not None:
                raise service.failed(f"exited with status {service.process.returncode} before {url} answered") from None
            if time.monotonic() > deadline:
                raise service.failed(f"did not answer on {url} within {timeout:.0f} s") from None
            time.sleep(0.3)


def stop_group(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """Stop a process started with start_new_session and everything it started.

    A Ray head that ran jobs can take over 30 s to answer SIGTERM (an idle one stops in 2 s); the
    tests own every process of the group and nothing of it outlives the test, so after ``grace``
    seconds the whole group is killed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):  # the leader may be gone while its children live on
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def running(service: Service) -> Iterator[Service]:
    """Stop ``service`` at the end of the block; if the block fails, print its output (pytest shows it)."""
    try:
        yield service
    except BaseException:
        print(f"----- output of {service.name} -----\n{service.output()}", file=sys.stderr)
        raise
    finally:
        stop_group(service.process)
        service.log.unlink(missing_ok=True)


@contextlib.contextmanager
def http_service(name: str, make_args: Callable[[], tuple[list[str], str]], env: dict[str, str]) -> Iterator[Service]:
    """A server answering HTTP: ``make_args()`` gives its command and ready URL (fresh ports per try)."""

    def start() -> Service:
        args, url = make_args()
        service = start_process(name, args, env)
        try:
            wait_for_http(url, service)  # its output is in the error it raises
        except BaseException:
            stop_group(service.process)
            service.log.unlink(missing_ok=True)
            raise
        return service

    with running(retry_on_collision(start)) as service:
        yield service


def redis_server() -> RedisServer:
    """A started private redis-server (stop it, or use it as a context manager)."""
    return retry_on_collision(lambda: RedisServer(port=free_port()).start())


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_server() as server:
        yield server.url


# The Ray token of this session's clusters, given to every process through its environment: nothing
# is written to ~/.ray, and a fresh machine (where no token file exists yet) works the same.
RAY_TOKEN = secrets.token_hex(32)


def cluster_env(**extra: str) -> dict[str, str]:
    """The environment of cluster processes: this venv's `python` first, token auth on both sides."""
    path = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN, **extra}


@dataclass
class RayHead:
    dashboard: str  # http://127.0.0.1:PORT, the job-submission address
    gcs: str  # 127.0.0.1:PORT, what RAY_ADDRESS names


# Each worker process (task, actor, Serve replica, Ray Train worker) holds one port of this range.
WORKER_PORTS = 128
RAY_PORT_FLAGS = (
    "--port",  # GCS
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
)


def ray_head_args(num_cpus: int, temp: str, held: list[int]) -> tuple[list[str], dict[str, int]]:
    """The ``ray start`` command of a head on ports claimed here; every claimed port is added to ``held``."""
    ports = dict(zip(RAY_PORT_FLAGS, reserve_ports(len(RAY_PORT_FLAGS)), strict=True))
    held += ports.values()
    workers = reserve_ports(WORKER_PORTS, contiguous=True)
    held += workers
    args = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", str(num_cpus), "--temp-dir", temp]
    args += ["--dashboard-host", "127.0.0.1"]
    args += [item for flag, port in ports.items() for item in (flag, str(port))]
    args += ["--min-worker-port", str(workers[0]), "--max-worker-port", str(workers[-1])]
    return args, ports


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, auth: bool = True) -> Iterator[RayHead]:
    """A separate Ray head on ports chosen here, started in the project root; only its processes are stopped.
    With ``auth``, clients need RAY_AUTH_MODE=token (cluster_env) as on a real cluster."""
    temp = tempfile.mkdtemp(prefix="dkdm-rh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    chosen: dict[str, int] = {}
    held: list[int] = []  # the ports of every try, given back once the head has stopped

    def make_args() -> tuple[list[str], str]:
        args, ports = ray_head_args(num_cpus, temp, held)
        chosen.update(ports)
        return args, f"http://127.0.0.1:{ports['--dashboard-port']}/api/version"

    env = cluster_env() if auth else cluster_env(RAY_AUTH_MODE="disabled")
    try:
        with http_service("ray start --head", make_args, env):
            yield RayHead(f"http://127.0.0.1:{chosen['--dashboard-port']}", f"127.0.0.1:{chosen['--port']}")
    finally:
        release_ports(held)
