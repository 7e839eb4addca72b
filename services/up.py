"""``dkdm up``: the whole service on one machine in one command.

It starts, in this order, what ``docker-compose.yml`` runs as separate containers: a ``redis-server``
with an append-only file in the data folder (job records and the model registry outlive a restart), a
local Ray head with token auth, the sampling app on Ray Serve and the control plane (uvicorn, in this
process). ``DKDM_REDIS_URL`` and ``RAY_ADDRESS`` name a Redis and a Ray cluster to use instead. A
signal (Ctrl-C, SIGTERM) stops what was started, in reverse order, and nothing else: on a cluster we
joined, only the sampling app we deployed is deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from pydantic import SecretStr

from services.auth import strong_enough

log = logging.getLogger(__name__)

REDIS_URL_ENV = "DKDM_REDIS_URL"
SAMPLING_APP = "dkdm-sampling"  # services.serving.app.deploy's application name
TOKEN_FILE = "api-token"


class StartError(RuntimeError):
    """A part of the service could not start (or stopped by itself); reported in one line."""


@dataclass(frozen=True)
class UpOptions:
    data: Path = Path("dkdm-data")
    host: str = "127.0.0.1"  # where the control plane and the sampling app listen
    api_port: int = 8080  # 0: a free port (so for every port below)
    sampling_port: int = 8000
    redis_port: int = 0
    dashboard_port: int = 8265  # Ray's dashboard: job submission goes through it
    # Ray's logical CPUs are scheduling slots, not cores: the sampler replica holds one for good, and a
    # job needs a teacher replica and a student beside it, so even a 2-core machine offers 4.
    num_cpus: int | None = None
    token: str | None = None
    # The sampler replicas' device and GPUs (None: DKDM_SAMPLING_DEVICE / _GPUS_PER_REPLICA, else their defaults).
    sampling_device: str | None = None
    gpus_per_replica: float | None = None


@dataclass(frozen=True)
class Endpoints:
    api: str
    sampling: str
    redis_url: str
    ray_dashboard: str
    token: str
    token_source: str
    data: Path

    def lines(self) -> list[str]:
        return [
            f"control plane:  {self.api}  (docs: {self.api}/docs)",
            f"sampling:       {self.sampling}/v1/models/{{name}}/samples",
            f"Ray dashboard:  {self.ray_dashboard}",
            f"Redis:          {self.redis_url}",
            f"data folder:    {self.data}",
            f"API token:      {self.token}  ({self.token_source})",
            f"  export DKDM_API_URL={self.api} DKDM_API_TOKEN={self.token}",
            "Ctrl-C stops everything `dkdm up` started.",
        ]


def _port(port: int) -> int:
    from services.engine.embedded import free_port

    return port or free_port()


def api_token(options: UpOptions, data: Path) -> tuple[str, str]:
    """The token given (flag, then ``DKDM_API_TOKEN``), else the one saved in the data folder, else a new
    one saved there: a restart on the same folder keeps the token clients already hold."""
    if options.token:
        return options.token, "given with --token"
    if os.environ.get("DKDM_API_TOKEN"):
        return os.environ["DKDM_API_TOKEN"], "from DKDM_API_TOKEN"
    saved = data / TOKEN_FILE
    if saved.is_file():
        return saved.read_text().strip(), f"saved in {saved}"
    token = secrets.token_urlsafe(24)
    saved.touch(mode=0o600)  # the secret never sits in a world-readable file, not even for a moment
    saved.write_text(token + "\n")
    return token, f"generated, saved in {saved}"


def _redis(options: UpOptions, data: Path, stack: contextlib.ExitStack) -> str:
    given = os.environ.get(REDIS_URL_ENV)
    if given:
        try:  # fail now, in one line, rather than answer 503 on every request
            redis.Redis.from_url(given, socket_timeout=5).ping()
        except redis.RedisError as exc:
            raise StartError(f"the Redis at {REDIS_URL_ENV}={given} does not answer: {exc}") from exc
        return given
    from services.engine.embedded import RedisServer

    (data / "redis").mkdir(exist_ok=True)
    server = RedisServer(port=options.redis_port or None, directory=data / "redis", appendfsync="everysec")
    try:
        server.start()
    except RuntimeError as exc:
        raise StartError(str(exc)) from exc
    stack.callback(server.stop)
    return server.url


def _ray_environment() -> None:
    """What the Ray processes inherit; set before Ray is imported, which reads RAY_AUTH_MODE once."""
    # Ray runs jobs as `python -m services.engine`, found on PATH: make it this interpreter, which
    # imports this installation, whether or not its virtualenv is activated.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if os.environ.get("RAY_ADDRESS"):
        return  # a cluster we join: its auth settings are the user's
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN"):
        # In the environment, not ~/.ray: the head, its workers, the jobs and the control plane share it.
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def _ray(options: UpOptions, stack: contextlib.ExitStack) -> str:
    """Connect to ``RAY_ADDRESS`` or start a local head; the job-submission (dashboard) address."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        context = ray.init(namespace="dkdm", logging_level=logging.WARNING)
        stack.callback(ray.shutdown)
        return os.environ.get("DKDM_RAY_ADDRESS") or f"http://{context.dashboard_url}"
    # A private, short temp dir (Ray's socket paths have a length limit): ray.init() starts a new head
    # instead of joining another cluster on this machine that recorded itself in /tmp/ray.
    temp = tempfile.mkdtemp(prefix="dkdm-up-", dir="/tmp")
    stack.callback(shutil.rmtree, temp, ignore_errors=True)
    port = _port(options.dashboard_port)
    from services.engine.embedded import start_local_head

    try:
        start_local_head(
            namespace="dkdm",
            num_cpus=options.num_cpus or max(4, os.cpu_count() or 1),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            logging_level=logging.WARNING,
            _temp_dir=temp,
        )
    except Exception as exc:
        ray.shutdown()
        raise StartError(f"the local Ray head did not start: {exc}") from exc
    stack.callback(ray.shutdown)  # stops every process of the head: GCS, raylet, dashboard, workers
    # Record the head in its temp dir, as `ray start` does. Ray's job supervisor finds the cluster a
    # submitted driver joins there; without the record it takes any GCS in the process list, so with a
    # second Ray on the machine a job's driver could join that one (where its actors died unstarted).
    ray._private.utils.write_ray_address(ray.get_runtime_context().gcs_address, temp)
    return f"http://127.0.0.1:{port}"


def _sampling(options: UpOptions, redis_url: str, token: str, stack: contextlib.ExitStack) -> str:
    from ray import serve

    from services.serving.app import deploy
    from services.serving.settings import SamplingSettings

    port = _port(options.sampling_port)
    devices = {"sampling_device": options.sampling_device, "sampling_gpus_per_replica": options.gpus_per_replica}
    chosen: dict[str, Any] = {k: v for k, v in devices.items() if v is not None}
    deploy(SamplingSettings(api_token=token, redis_url=redis_url, **chosen), options.host, port)
    if os.environ.get("RAY_ADDRESS"):  # a cluster we joined keeps its Serve; only our app goes
        stack.callback(serve.delete, SAMPLING_APP)
    return f"http://{options.host}:{port}"


def _settings_fields(data: Path) -> dict[str, Any]:
    """Where jobs write (below the data folder unless ``DKDM_RUNS_DIR`` says) and where teachers may be read."""
    from services.control_plane.settings import Settings

    base = Settings()
    runs_dir = base.runs_dir if os.environ.get("DKDM_RUNS_DIR") else (data / "runs" / "jobs").resolve()
    roots = list(base.model_roots)
    if not any(runs_dir.is_relative_to(root) for root in roots):
        roots.append(runs_dir)
    return {"runs_dir": runs_dir, "model_roots": roots}


def _control_plane(
    options: UpOptions, redis_url: str, dashboard: str, token: str, data: Path, stack: contextlib.ExitStack
) -> tuple[str, threading.Thread]:
    import uvicorn

    from services.control_plane.app import create_app
    from services.control_plane.settings import Settings

    settings = Settings(api_token=token, redis_url=redis_url, ray_address=dashboard, **_settings_fields(data))
    port = _port(options.api_port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=options.host, port=port, log_level="warning"))
    # In a thread: uvicorn then leaves the signals to us, and one handler stops every part.
    thread = threading.Thread(target=server.run, name="control-plane", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise StartError(f"the control plane could not listen on {options.host}:{port} (see the log above)")
        thread.join(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)

    stack.callback(stop)
    return f"http://{options.host}:{port}", thread


@contextlib.contextmanager
def started(options: UpOptions) -> Iterator[tuple[Endpoints, threading.Thread]]:
    """Every part running; each is stopped, in reverse order, when the block ends (or a later part fails)."""
    data = options.data.expanduser().resolve()
    data.mkdir(parents=True, exist_ok=True)
    token, source = api_token(options, data)
    strong_enough(SecretStr(token))  # a weak token given by the user: one line, before anything starts
    _ray_environment()
    with contextlib.ExitStack() as stack:
        redis_url = _redis(options, data, stack)
        dashboard = _ray(options, stack)
        sampling = _sampling(options, redis_url, token, stack)
        api, thread = _control_plane(options, redis_url, dashboard, token, data, stack)
        yield Endpoints(api, sampling, redis_url, dashboard, token, source, data), thread


def run(options: UpOptions, announce: Callable[[str], None]) -> None:
    """Start everything, ``announce`` the addresses, and stop everything at SIGINT or SIGTERM.

    A signal during start-up interrupts it (what started so far is stopped); once running, a signal
    only asks the main loop to stop, so shutting down is never cut short by a second Ctrl-C.
    """
    stop = threading.Event()
    state = {"running": False}

    def on_signal(signum: int, frame: Any) -> None:
        if not state["running"]:
            raise KeyboardInterrupt
        stop.set()

    def install() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    install()
    try:
        with started(options) as (endpoints, control_plane):
            install()  # Ray may have put its own handlers in place while starting
            state["running"] = True
            for line in endpoints.lines():
                announce(line)
            while not stop.wait(1.0):
                if not control_plane.is_alive():
                    raise StartError("the control plane stopped by itself")
            announce("stopping...")
    except KeyboardInterrupt:
        announce("interrupted while starting; stopped what had started")
        return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    announce("stopped")
