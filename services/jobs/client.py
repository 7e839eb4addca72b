"""The one way the project opens a Redis client: retries with back-off that ride out a Redis restart.

Every component (the engine's driver, replicas, shards and student ranks, the control plane, the
sampling service) gets its client from ``redis_client``. A restart of Redis with its append-only file
takes a few seconds: connections are refused, then the server answers LOADING while it replays the file.
The client retries such calls with exponential back-off for at most ``redis_ride_out_s`` in total, so a
restart passes unnoticed; past that limit the call raises ``RedisUnavailable`` naming the server, which
the engine turns into a FAILED job with a checkpoint and the CLI into one ``dkdm: error:`` line.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

T = TypeVar("T")

SOCKET_TIMEOUT_S = 10.0  # a server that accepted a command but never answers counts as down after this
CONNECT_TIMEOUT_S = 2.0  # an unreachable host (not a refused port) is retried after this
BACKOFF_BASE_S = 0.05  # first retry after 0.1 s: a restart is usually over within a second or two
BACKOFF_CAP_S = 2.0  # never sleep longer than this between tries, so a returning server is seen soon
RETRIED = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, socket.timeout, ConnectionError)


class RedisSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DKDM_", env_file=".env", extra="ignore")

    # How long a Redis call keeps retrying (connection refused, timeout, LOADING) before it fails: long
    # enough for a restart with an append-only file, short enough that a lost Redis fails the job soon.
    redis_ride_out_s: float = Field(30.0, ge=0.0, le=3600.0)


@lru_cache
def get_redis_settings() -> RedisSettings:
    return RedisSettings()


class RedisUnavailable(redis.ConnectionError):
    """Redis did not answer within the ride-out limit. One argument only, so it pickles across Ray."""


def server_name(url: str) -> str:
    """A Redis URL as errors may show it: without any user or password in it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


_deadline = threading.local()  # the outermost retry's deadline: the connection's own retry nests inside


class RideOut(Retry):
    """redis-py's ``Retry`` bounded by total time instead of a count of tries."""

    def __init__(self, seconds: float, server: str) -> None:
        super().__init__(
            ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S), retries=-1, supported_errors=RETRIED
        )
        self.seconds = seconds
        self.server = server

    def __deepcopy__(self, memo: dict[int, Any]) -> RideOut:  # redis-py copies it into every connection
        return RideOut(self.seconds, self.server)

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        outer = getattr(_deadline, "at", None)
        deadline = outer if outer is not None else time.monotonic() + self.seconds
        _deadline.at = deadline
        try:
            return self._loop(do, fail, is_retryable, with_failure_count, deadline)
        finally:
            _deadline.at = outer

    def _loop(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None,
        with_failure_count: bool,
        deadline: float,
    ) -> T:
        failures = 0
        while True:
            try:
                return do()
            except RETRIED as error:
                if isinstance(error, RedisUnavailable) or (is_retryable is not None and not is_retryable(error)):
                    raise
                failures += 1
                fail(error, failures) if with_failure_count else fail(error)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RedisUnavailable(
                        f"redis at {self.server}: no answer for {self.seconds:g} s (DKDM_REDIS_RIDE_OUT_S): {error}"
                    ) from error
                time.sleep(min(self._backoff.compute(failures), left))


def redis_client(url: str, ride_out_s: float | None = None) -> redis.Redis:
    """A client for ``url`` answering str, whose calls ride out a restart for ``ride_out_s`` seconds
    (default: the ``DKDM_REDIS_RIDE_OUT_S`` setting). It connects lazily: nothing is sent yet."""
    seconds = get_redis_settings().redis_ride_out_s if ride_out_s is None else ride_out_s
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=RideOut(seconds, server_name(url)),
    )
