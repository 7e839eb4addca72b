"""The Redis key schema of the distributed engine: every key the project writes, in one place.

Redis holds metadata only (states, counters, histograms, leases, heartbeats); tensors never go
there, they travel through the Ray object store. Every key of a job lives under its namespace
``dkdm:job:{job_id}`` so jobs never collide and one job's keys can be listed or dropped together.

    dkdm:jobs                           sorted set  job id -> creation time (the job index)
    dkdm:models                         hash        model name -> JSON {path, job_id, arch, created}:
                                                    the students the sampling service can serve
    dkdm:admission                      string      a lock: one control plane at a time counts the live
                                                    jobs and records a new (or resumed) one
    dkdm:job:{id}                       hash        the job record: state, spec (JSON), out, error,
                                                    created/updated times, step, total_steps
    dkdm:job:{id}:counters              hash        monotonic counters (see COUNTERS), HINCRBY/-FLOAT
    dkdm:job:{id}:metrics               hash        the latest logged student values (loss, mse, lr...)
    dkdm:job:{id}:shards                hash        shard index -> JSON: size, t-histogram, outstanding
                                                    leases, finished trajectories, samples advanced
    dkdm:job:{id}:leases                hash        "shard:lease" -> JSON: replica, taken-at time
    dkdm:job:{id}:consumed              set         knowledge batch ids a student rank consumed
    dkdm:job:{id}:queues                hash        student rank -> knowledge batches waiting in its queue
    dkdm:job:{id}:control               hash        requests to the running job: cancel, teacher_replicas
    dkdm:job:{id}:writers               hash        writer (component thread) -> number of its last write,
                                                    so a write retried after a lost reply applies once
    dkdm:job:{id}:heartbeat:{component} string      JSON {pid, host, time}; expires after HEARTBEAT_TTL_S
"""

from __future__ import annotations

from typing import Literal

PREFIX = "dkdm"
HEARTBEAT_TTL_S = 15  # a component silent this long is presumed dead

JobState = Literal["PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
TERMINAL_STATES: frozenset[str] = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})

# Counters a job accumulates; all start at 0 and only grow.
COUNTERS = (
    "pool_init_teacher_evaluations",  # shuffle-denoise teacher sample-evaluations
    "teacher_calls",  # one-step teacher calls on leased batches
    "teacher_evaluations",  # sample-evaluations in those calls
    "samples_advanced",  # pool samples replaced by their one-step-denoised version
    "batches_produced",  # knowledge batches handed to a student queue
    "batches_consumed",  # knowledge batches a student rank trained on
    "batches_dropped",  # fetched by a rank but never trained on (job end, worker restart)
    "stale_returns",  # teacher answers refused because their lease had expired
    "leases_expired",  # leases re-issued after lease_timeout_s
    "student_steps_total",  # optimiser steps taken, including steps redone after a restore
    "replica_restarts",  # dead teacher replicas replaced
    "teacher_busy_seconds",  # time replicas spent in teacher calls
    "lease_seconds",  # time replicas waited on shard.take round trips
    "return_seconds",  # time replicas waited on shard.put round trips
    "queue_put_seconds",  # time replicas waited for room in a student queue
    "student_wait_seconds",  # time student ranks waited for a knowledge batch
    "student_busy_seconds",  # time student ranks spent in training steps
)


def jobs_index() -> str:
    return f"{PREFIX}:jobs"


def models() -> str:
    return f"{PREFIX}:models"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def counters(job_id: str) -> str:
    return f"{job(job_id)}:counters"


def metrics(job_id: str) -> str:
    return f"{job(job_id)}:metrics"


def shards(job_id: str) -> str:
    return f"{job(job_id)}:shards"


def leases(job_id: str) -> str:
    return f"{job(job_id)}:leases"


def consumed(job_id: str) -> str:
    return f"{job(job_id)}:consumed"


def queues(job_id: str) -> str:
    return f"{job(job_id)}:queues"


def control(job_id: str) -> str:
    return f"{job(job_id)}:control"


def writers(job_id: str) -> str:
    return f"{job(job_id)}:writers"


def admission() -> str:
    return f"{PREFIX}:admission"


def heartbeat(job_id: str, component: str) -> str:
    return f"{job(job_id)}:heartbeat:{component}"


def lease_field(shard: int, lease_id: int) -> str:
    """The id of a lease, and of the knowledge batch made from it: unique within a job."""
    return f"{shard}:{lease_id}"
