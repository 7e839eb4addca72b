"""The control plane served for real: uvicorn on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from services.control_plane.app import create_app
from services.control_plane.settings import Settings
from tests.services.conftest import ServiceFailed, bindable, free_port, retry_on_collision

TOKEN = "test-token-0123456789abcdef"


def _start(settings: Settings) -> tuple[uvicorn.Server, threading.Thread, int]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive():  # uvicorn logged why; pytest shows it
            taken = " (port already in use)" if not bindable(port) else ""
            raise ServiceFailed(f"the control plane on port {port} exited at start{taken}")
        assert time.monotonic() < deadline, "the control plane did not start"
        time.sleep(0.02)
    return server, thread, port


@contextlib.contextmanager
def serve_api(settings: Settings) -> Iterator[str]:
    server, thread, port = retry_on_collision(lambda: _start(settings))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
