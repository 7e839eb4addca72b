"""Job metadata in Redis: the job record, counters, heartbeats, shard stats, leases and control.

Every read and write of the engine's Redis keys goes through ``JobStore`` (the key names are in
``keys``). Components (driver, replicas, student ranks) each open their own ``JobStore`` from the
Redis URL and the job id they were given; the client rides out a Redis restart (``client``).

Writes of a job's state and bookkeeping run as one Lua script that first checks the job's record
exists: a Redis that lost its data must not get back a stub record (PENDING, no spec) or counters
that restart from 0, recreated by the next write of a running job. Such a write raises
``RecordGone`` instead. The record can be rebuilt in full from its durable copy (``durable``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from services.jobs import durable, keys
from services.jobs.client import redis_client

# KEYS[1] is the job record, KEYS[2] its writers hash; ARGV[1], ARGV[2] the writer and the write's
# sequence number, then (key index, op, field, value) quadruples applied in order, all or none (a
# script is atomic). Answers nil when the record is gone, 'dup' when this write went in already (a
# retry whose first reply was lost as Redis went down), else each op's reply.
_GUARDED_WRITE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
if tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') >= tonumber(ARGV[2]) then return 'dup' end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local out = {}
for i = 3, #ARGV, 4 do
  local key, op, field, value = KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if op == 'hset' then out[#out + 1] = redis.call('HSET', key, field, value)
  elseif op == 'hincrby' then out[#out + 1] = redis.call('HINCRBY', key, field, value)
  elseif op == 'hincrbyfloat' then out[#out + 1] = redis.call('HINCRBYFLOAT', key, field, value)
  elseif op == 'hdel' then out[#out + 1] = redis.call('HDEL', key, field)
  elseif op == 'sadd' then out[#out + 1] = redis.call('SADD', key, field)
  else return redis.error_reply('unknown op ' .. op) end
end
return out
"""

# KEYS: record, counters, jobs index; ARGV[1]: JSON {record, counters}, ARGV[2]: job id. Rebuilds a
# missing record (and its counters, unless some survived) from the durable copy; 0 if it exists.
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local copy = cjson.decode(ARGV[1])
for field, value in pairs(copy.record) do redis.call('HSET', KEYS[1], field, tostring(value)) end
if redis.call('EXISTS', KEYS[2]) == 0 then
  for field, value in pairs(copy.counters) do redis.call('HSET', KEYS[2], field, tostring(value)) end
end
redis.call('ZADD', KEYS[3], tonumber(copy.record.created) or 0, ARGV[2])
return 1
"""

Op = tuple[str, str, str, Any]  # (key, op, field, value)


class RecordGone(redis.RedisError):
    """A write to a job whose record is not in Redis (any more): nothing was written."""


def connect(url: str, ride_out_s: float | None = None) -> redis.Redis:
    """A client for ``url`` (see ``client.redis_client``) that has answered once: fails in one clear
    error, after the ride-out, when Redis is not there."""
    client = redis_client(url, ride_out_s)
    client.ping()
    return client


class JobStore:
    """One job's metadata."""

    def __init__(
        self, url: str, job_id: str, client: redis.Redis | None = None, ride_out_s: float | None = None
    ) -> None:
        self.url = url
        self.job_id = job_id
        self.r = client if client is not None else connect(url, ride_out_s)
        self._guarded = self.r.register_script(_GUARDED_WRITE)
        self._restore = self.r.register_script(_RESTORE)
        # Writes are numbered per thread (threads of one component write side by side), so a retried
        # write is recognised: the client retries after a lost reply, which must not count twice. Each
        # thread names itself once (a thread id may be reused by a later thread, a name is not).
        self._local = threading.local()

    def _write(self, *ops: Op) -> list[Any] | None:
        """Apply ``ops`` atomically if the job's record exists; ``RecordGone`` (nothing written) if not.
        Each op's reply, or None when a retry found the write done already (its first reply was lost)."""
        if not hasattr(self._local, "writer"):
            self._local.writer, self._local.seq = uuid.uuid4().hex, 0
        self._local.seq += 1
        names = [keys.job(self.job_id), keys.writers(self.job_id)]
        args: list[Any] = [self._local.writer, self._local.seq]
        for key, op, name, value in ops:
            if key not in names:
                names.append(key)
            args += [names.index(key) + 1, op, name, value]
        result = self._guarded(keys=names, args=args)
        if result is None:
            raise RecordGone(
                f"job {self.job_id} has no record in Redis (was Redis restarted without persistence?); "
                "not recreating a partial one"
            )
        return None if result == "dup" else list(result)

    # The job record -------------------------------------------------------------------------------

    def create(self, spec: dict[str, Any], state: keys.JobState = "PENDING", **fields: Any) -> bool:
        """Write a new job record; False (and no change) if the job already exists."""
        now = time.time()
        record = {"state": state, "spec": json.dumps(spec), "created": now, "updated": now, **fields}
        return self.restore({"id": self.job_id, "record": record, "counters": {}})

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
        """Change fields of an existing record (``RecordGone`` if there is none)."""
        record = keys.job(self.job_id)
        self._write(*((record, "hset", k, _encode(v)) for k, v in {**fields, "updated": time.time()}.items()))

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
        result = self._write((keys.job(self.job_id), "hincrby", "attempts", 1))
        return int(result[0] if result is not None else self.r.hget(keys.job(self.job_id), "attempts") or 0)

    # Counters and metrics -------------------------------------------------------------------------

    def add(self, **amounts: float) -> None:
        """Add to counters in one round trip (ints with HINCRBY, floats with HINCRBYFLOAT)."""
        if amounts:
            self._write(*self._count(amounts))

    def _count(self, amounts: dict[str, float]) -> list[Op]:
        key = keys.counters(self.job_id)
        return [(key, "hincrby" if isinstance(v, int) else "hincrbyfloat", name, v) for name, v in amounts.items()]

    def counters(self) -> dict[str, float]:
        raw = self.r.hgetall(keys.counters(self.job_id))
        return {name: float(raw.get(name, 0)) for name in sorted(set(keys.COUNTERS) | raw.keys())}

    def set_metrics(self, values: dict[str, float]) -> None:
        if values:
            self._write(*((keys.metrics(self.job_id), "hset", k, _encode(v)) for k, v in values.items()))

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.r.hgetall(keys.metrics(self.job_id)).items()}

    # Knowledge batches: exactly once ------------------------------------------------------------

    def consume(self, batch_id: str) -> bool:
        """Record that a rank trained on ``batch_id``; False if some rank already had."""
        result = self._write(
            (keys.consumed(self.job_id), "sadd", batch_id, ""),
            (keys.counters(self.job_id), "hincrby", "batches_consumed", 1),
        )
        return result is None or bool(result[0])  # None: this very call's first try added it

    def consumed_count(self) -> int:
        return int(self.r.scard(keys.consumed(self.job_id)))

    # Pool shards and leases ----------------------------------------------------------------------

    def set_shard(self, index: int, stats: dict[str, Any]) -> None:
        self._write((keys.shards(self.job_id), "hset", str(index), json.dumps(stats)))

    def shards(self) -> dict[int, dict[str, Any]]:
        return {int(k): json.loads(v) for k, v in self.r.hgetall(keys.shards(self.job_id)).items()}

    def open_lease(self, shard: int, lease_id: int, replica: str) -> None:
        info = json.dumps({"replica": replica, "taken": time.time()})
        self._write((keys.leases(self.job_id), "hset", keys.lease_field(shard, lease_id), info))

    def close_lease(self, shard: int, lease_id: int, **counters: float) -> None:
        """Drop a lease from the table and add the step's counters, in one round trip."""
        self._write((keys.leases(self.job_id), "hdel", keys.lease_field(shard, lease_id), ""), *self._count(counters))

    def set_queue_depths(self, depths: list[int]) -> None:
        if depths:
            self._write(*((keys.queues(self.job_id), "hset", str(rank), d) for rank, d in enumerate(depths)))

    def queue_depths(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.r.hgetall(keys.queues(self.job_id)).items()}

    def drop_leases(self, fields: list[str]) -> None:
        if fields:
            self._write(*((keys.leases(self.job_id), "hdel", f, "") for f in fields))

    def leases(self) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.r.hgetall(keys.leases(self.job_id)).items()}

    # Control requests and heartbeats --------------------------------------------------------------

    def request(self, **fields: Any) -> None:
        """Ask the running job for something: ``cancel=1``, ``teacher_replicas=N``. Not guarded: a
        request may be made before the engine wrote the record, and is no part of it."""
        self.r.hset(keys.control(self.job_id), mapping={k: _encode(v) for k, v in fields.items()})

    def control(self) -> dict[str, str]:
        return self.r.hgetall(keys.control(self.job_id))

    def cancel_requested(self) -> bool:
        return self.r.hget(keys.control(self.job_id), "cancel") == "1"

    def heartbeat(self, component: str, **info: Any) -> None:
        value = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), **info})
        self.r.set(keys.heartbeat(self.job_id, component), value, ex=keys.HEARTBEAT_TTL_S)

    def beats(self, component: str) -> bool:
        """Whether ``component`` sent a heartbeat within ``HEARTBEAT_TTL_S``."""
        return bool(self.r.exists(keys.heartbeat(self.job_id, component)))

    # The durable copy -----------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, str], dict[str, str]]:
        """The record and its counters as Redis holds them (strings: an integer counter stays one)."""
        return self.record(), self.r.hgetall(keys.counters(self.job_id))

    def save_copy(self, out: str | Path) -> Path:
        """Write the record and its counters to ``out/job.json`` (atomically)."""
        record, counters = self.snapshot()
        return durable.write_copy(out, self.job_id, record, counters)

    def restore(self, copy: dict[str, Any]) -> bool:
        """Rebuild this job's missing record (and counters) from a durable copy; False if it exists."""
        if copy.get("id") != self.job_id:
            raise ValueError(f"the copy is of job {copy.get('id')!r}, not {self.job_id!r}")
        record = {k: str(_encode(v)) for k, v in copy["record"].items()}  # as Redis stores them: strings
        counters = {k: _counter(v) for k, v in (copy.get("counters") or {}).items()}
        data = json.dumps({"record": record, "counters": counters})
        names = [keys.job(self.job_id), keys.counters(self.job_id), keys.jobs_index()]
        return bool(self._restore(keys=names, args=[data, self.job_id]))

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


def _counter(value: Any) -> str:
    """A counter as Redis must hold it for HINCRBY: "21", not "21.0"."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)
