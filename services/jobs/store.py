"""Job metadata in Redis: the job record, counters, heartbeats, shard stats, leases and control.

Every read and write of the engine's Redis keys goes through ``JobStore`` (the key names are in
``keys``). Components (driver, replicas, student ranks) each open their own ``JobStore`` from the
Redis URL and the job id they were given.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import redis

from services.jobs import keys

_SOCKET_TIMEOUT_S = 10.0


def connect(url: str) -> redis.Redis:
    """A client for ``url`` that answers str, not bytes; fails fast when Redis is not there."""
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=_SOCKET_TIMEOUT_S)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ConnectionError(f"cannot reach Redis at {url}: {exc}") from exc
    return client


class JobStore:
    """One job's metadata."""

    def __init__(self, url: str, job_id: str, client: redis.Redis | None = None) -> None:
        self.url = url
        self.job_id = job_id
        self.r = client if client is not None else connect(url)

    # The job record -------------------------------------------------------------------------------

    def create(self, spec: dict[str, Any], state: keys.JobState = "PENDING", **fields: Any) -> bool:
        """Write a new job record; False (and no change) if the job already exists."""
        now = time.time()
        record = {"state": state, "spec": json.dumps(spec), "created": now, "updated": now, **fields}
        if not self.r.hsetnx(keys.job(self.job_id), "created", now):
            return False
        pipe = self.r.pipeline()
        pipe.hset(keys.job(self.job_id), mapping={k: _encode(v) for k, v in record.items()})
        pipe.zadd(keys.jobs_index(), {self.job_id: now})
        pipe.execute()
        return True

    def exists(self) -> bool:
        return bool(self.r.exists(keys.job(self.job_id)))

    def record(self) -> dict[str, str]:
        return self.r.hgetall(keys.job(self.job_id))

    def spec(self) -> dict[str, Any]:
        raw = self.r.hget(keys.job(self.job_id), "spec")
        if raw is None:
            raise KeyError(f"job {self.job_id} has no record in Redis")
        return json.loads(raw)

    def state(self) -> str | None:
        return self.r.hget(keys.job(self.job_id), "state")

    def update(self, **fields: Any) -> None:
        mapping = {k: _encode(v) for k, v in fields.items()}
        self.r.hset(keys.job(self.job_id), mapping={**mapping, "updated": time.time()})

    def set_state(self, state: keys.JobState, **fields: Any) -> None:
        self.update(state=state, **fields)

    # Submissions: each driver start of the job (a Ray job), the live one last ----------------------

    def submissions(self) -> list[dict[str, Any]]:
        """``[{id, submitted, outcome?, error?, ended?}]``, oldest first; the last one is the live one."""
        return list(json.loads(self.r.hget(keys.job(self.job_id), "submissions") or "[]"))

    def begin_submission(self, submission_id: str, allowed: frozenset[str] | None = None, **fields: Any) -> bool:
        """Make ``submission_id`` the live submission (no-op if it already is), closing the one before with
        the record's state and error as its outcome; with ``allowed``, only while the state is one of them
        (checked and written atomically: two resumes cannot both pass). False: the state was not allowed."""
        key = keys.job(self.job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    state, error, raw = pipe.hmget(key, "state", "error", "submissions")
                    if state is None or (allowed is not None and state not in allowed):
                        pipe.unwatch()
                        return False
                    subs = json.loads(raw or "[]")
                    if subs and subs[-1]["id"] == submission_id:
                        pipe.unwatch()
                        return True
                    if subs and "outcome" not in subs[-1]:
                        subs[-1].update(outcome=state, error=error or "", ended=time.time())
                    subs.append({"id": submission_id, "submitted": time.time()})
                    mapping = {"submission": submission_id, "submissions": json.dumps(subs), **fields}
                    pipe.multi()
                    pipe.hset(key, mapping={k: _encode(v) for k, v in {**mapping, "updated": time.time()}.items()})
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def clear_requests(self, *names: str) -> None:
        """Forget control requests of an earlier run (``cancel``, ``abort``) before the job runs again."""
        self.r.hdel(keys.control(self.job_id), *names)

    def next_attempt(self) -> int:
        """Count driver starts of this job; batch ids carry it so a resumed run never reuses one."""
        return int(self.r.hincrby(keys.job(self.job_id), "attempts", 1))

    # Counters and metrics -------------------------------------------------------------------------

    def add(self, **amounts: float) -> None:
        """Add to counters in one round trip (ints with HINCRBY, floats with HINCRBYFLOAT)."""
        pipe = self.r.pipeline(transaction=False)
        self._count(pipe, amounts)
        pipe.execute()

    def _count(self, pipe: Any, amounts: dict[str, float]) -> None:
        for name, amount in amounts.items():
            if isinstance(amount, int):
                pipe.hincrby(keys.counters(self.job_id), name, amount)
            else:
                pipe.hincrbyfloat(keys.counters(self.job_id), name, amount)

    def counters(self) -> dict[str, float]:
        raw = self.r.hgetall(keys.counters(self.job_id))
        return {name: float(raw.get(name, 0)) for name in sorted(set(keys.COUNTERS) | raw.keys())}

    def set_metrics(self, values: dict[str, float]) -> None:
        if values:
            self.r.hset(keys.metrics(self.job_id), mapping={k: _encode(v) for k, v in values.items()})

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.r.hgetall(keys.metrics(self.job_id)).items()}

    # Knowledge batches: exactly once ------------------------------------------------------------

    def consume(self, batch_id: str) -> bool:
        """Record that a rank trained on ``batch_id``; False if some rank already had."""
        pipe = self.r.pipeline()
        pipe.sadd(keys.consumed(self.job_id), batch_id)
        pipe.hincrby(keys.counters(self.job_id), "batches_consumed", 1)
        added, _ = pipe.execute()
        return bool(added)

    def consumed_count(self) -> int:
        return int(self.r.scard(keys.consumed(self.job_id)))

    # Pool shards and leases ----------------------------------------------------------------------

    def set_shard(self, index: int, stats: dict[str, Any]) -> None:
        self.r.hset(keys.shards(self.job_id), str(index), json.dumps(stats))

    def shards(self) -> dict[int, dict[str, Any]]:
        return {int(k): json.loads(v) for k, v in self.r.hgetall(keys.shards(self.job_id)).items()}

    def open_lease(self, shard: int, lease_id: int, replica: str) -> None:
        info = json.dumps({"replica": replica, "taken": time.time()})
        self.r.hset(keys.leases(self.job_id), keys.lease_field(shard, lease_id), info)

    def close_lease(self, shard: int, lease_id: int, **counters: float) -> None:
        """Drop a lease from the table and add the step's counters, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hdel(keys.leases(self.job_id), keys.lease_field(shard, lease_id))
        self._count(pipe, counters)
        pipe.execute()

    def set_queue_depths(self, depths: list[int]) -> None:
        if depths:
            self.r.hset(keys.queues(self.job_id), mapping={str(rank): d for rank, d in enumerate(depths)})

    def queue_depths(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.r.hgetall(keys.queues(self.job_id)).items()}

    def drop_leases(self, fields: list[str]) -> None:
        if fields:
            self.r.hdel(keys.leases(self.job_id), *fields)

    def leases(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.r.hgetall(keys.leases(self.job_id)).items()}

    # Control requests and heartbeats --------------------------------------------------------------

    def request(self, **fields: Any) -> None:
        """Ask the running job for something: ``cancel=1``, ``teacher_replicas=N``."""
        self.r.hset(keys.control(self.job_id), mapping={k: _encode(v) for k, v in fields.items()})

    def control(self) -> dict[str, str]:
        return self.r.hgetall(keys.control(self.job_id))

    def cancel_requested(self) -> bool:
        return self.r.hget(keys.control(self.job_id), "cancel") == "1"

    def heartbeat(self, component: str, **info: Any) -> None:
        value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), **info})
        self.r.set(keys.heartbeat(self.job_id, component), value, ex=keys.HEARTBEAT_TTL_S)

    def heartbeats(self) -> dict[str, dict[str, Any]]:
        prefix = keys.heartbeat(self.job_id, "")
        found = {}
        for key in self.r.scan_iter(match=prefix + "*"):
            value = self.r.get(key)
            if value is not None:
                found[key[len(prefix) :]] = json.loads(value)
        return found


class ModelRegistry:
    """The students the sampling service may serve: name -> model folder (written when a job succeeds)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def register(self, name: str, path: str, **info: Any) -> None:
        self.r.hset(keys.models(), name, json.dumps({"path": path, "created": time.time(), **info}))

    def get(self, name: str) -> dict[str, Any] | None:
        raw = self.r.hget(keys.models(), name)
        return json.loads(raw) if raw is not None else None

    def all(self) -> dict[str, dict[str, Any]]:
        return {name: json.loads(raw) for name, raw in self.r.hgetall(keys.models()).items()}


def list_jobs(client: redis.Redis, limit: int = 100) -> list[str]:
    """The newest ``limit`` job ids, newest first."""
    return list(client.zrevrange(keys.jobs_index(), 0, limit - 1))


def _encode(value: Any) -> str | int | float:
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value)
