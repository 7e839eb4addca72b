"""The embedded default: a local Ray and a private ``redis-server`` when no cluster is given.

With ``RAY_ADDRESS`` set, Ray connects to that cluster; with ``DKDM_REDIS_URL`` set, that Redis
is used. Otherwise the engine starts its own: ``ray.init()`` on this machine and a real
``redis-server`` on a free loopback port with persistence off, stopped when the job ends.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

REDIS_URL_ENV = "DKDM_REDIS_URL"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` process on 127.0.0.1. Metadata only, so by default nothing is saved to
    disk; with ``appendfsync`` ("everysec" as docker-compose's Redis and ``dkdm up``, "always" where a test
    counts every write) it keeps an append-only file in ``directory`` and survives ``restart``."""

    def __init__(self, port: int | None = None, directory: Path | None = None, appendfsync: str | None = None) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: `make install` installs it (apt-get install redis-server), "
                f"or point {REDIS_URL_ENV} at a running Redis"
            )
        if self.directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dkdm-redis-")
            self.directory = Path(self._tmp.name)
        fsync = self.appendfsync
        persist = ["--appendonly", "yes", "--appendfsync", fsync] if fsync else ["--appendonly", "no"]
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persist]
        args += ["--dir", str(self.directory), "--daemonize", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        # A bare client: this loop is the retry (and must see the process exit), not the ride-out client's.
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0, retry=Retry(NoBackoff(), 0))
        taken = False
        while True:
            try:
                client.ping()  # BusyLoadingError while the append-only file is replayed
                if client.info("server").get("process_id") == self.process.pid:
                    break
                # Another server holds the port and answered: ours cannot bind it and exits. Never take
                # that server for ours (stopping ours would leave it, and its data is not ours).
                taken = True
                raise redis.ConnectionError(f"port {self.port} is taken")
            except redis.ConnectionError:  # BusyLoadingError too: the append-only file is being replayed
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    err = err or (f"port {self.port} already in use by another process" if taken else "")
                    raise RuntimeError(f"redis-server exited at start: {err.strip()}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer on port {self.port}") from None
                time.sleep(0.02)
        client.close()
        log.info("started redis-server on 127.0.0.1:%d", self.port)
        return self

    def shutdown(self) -> None:
        """Stop the process (SIGTERM: Redis flushes its append-only file), keeping its directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self, timeout: float = 10.0) -> RedisServer:
        """Stop and start again on the same port and directory (with ``appendonly``, the data survives)."""
        self.shutdown()
        return self.start(timeout)

    def stop(self) -> None:
        self.shutdown()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        # A server started already (``with redis_server() as server``) is used as it is: starting it again
        # would leave the running process unstopped.
        if self.process is not None and self.process.poll() is None:
            return self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """``DKDM_REDIS_URL`` if set, else the URL of a private redis-server living for the block."""
    given = os.environ.get(REDIS_URL_ENV)
    if given:
        yield given
        return
    with RedisServer() as server:
        yield server.url


def start_local_head(**init: Any) -> Any:
    """``ray.init(**init)`` starting a new head on this machine, its dashboard agent on a free port.

    ``ray.init()`` gives a head's dashboard agent Ray's fixed default port (52365) and has no argument
    to change it. With two such heads on one machine (``dkdm up`` and a ``dkdm distill --engine ray``,
    two test sessions), the second agent cannot bind the port and exits while the head runs on: that
    head then answers every job submission "No available agent to submit job". Port 0 lets the agent
    bind one the OS picks; it records the port it got for the dashboard, as Ray does for its other
    agents. ``ray start`` takes ``--dashboard-agent-listen-port``; this is its ``ray.init`` counterpart,
    in effect only for the duration of the call.
    """
    parameter: Any = importlib.import_module("ray._private.parameter")
    fixed = parameter.RayParams

    class FreeAgentPort(fixed):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    parameter.RayParams = FreeAgentPort
    try:
        return ray.init(**init)
    finally:
        parameter.RayParams = fixed


@contextlib.contextmanager
def ray_cluster() -> Iterator[None]:
    """Connect to ``RAY_ADDRESS`` (or the cluster a ``ray job`` runs in), else start a local Ray.

    A Ray this block starts is shut down at its end; an existing connection is left alone.
    """
    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace="dkdm", logging_level=logging.WARNING)
    else:
        # Workers run this interpreter, so they import the project the way the driver does. The
        # dashboard stays on: Ray Train's state queries and `ray job submit` go through it.
        start_local_head(namespace="dkdm", logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
