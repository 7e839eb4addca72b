"""Prometheus metrics of the jobs, read from Redis at scrape time (no pushgateway).

The engine writes its counters, latest losses, shard histograms and queue depths to Redis; this
collector turns the newest jobs' records into metric families on every scrape, so the control plane
exports the engine's metrics without holding any state. Rates (steps/s, teacher calls/s) are
PromQL ``rate()`` over the ``_total`` counters. Jobs are labelled ``job_id``: ``job`` is the label
Prometheus gives every scrape target, and a metric label of that name would be renamed on ingestion.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.jobs import keys
from services.jobs.store import JobStore, list_jobs

JOB_STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")

# Engine counter -> exported counter name (without the _total suffix the client library appends).
COUNTER_METRICS = {
    "student_steps_total": (
        "dkdm_job_student_steps",
        "Student optimiser steps, including steps redone after a restore",
    ),
    "teacher_calls": ("dkdm_job_teacher_calls", "One-step teacher calls on leased batches"),
    "teacher_evaluations": ("dkdm_job_teacher_evaluations", "Teacher sample-evaluations (calls x batch)"),
    "pool_init_teacher_evaluations": ("dkdm_job_pool_init_teacher_evaluations", "Teacher evaluations of pool init"),
    "samples_advanced": ("dkdm_job_pool_samples_advanced", "Pool samples replaced by their denoised version"),
    "batches_produced": ("dkdm_job_batches_produced", "Knowledge batches handed to student queues"),
    "batches_consumed": ("dkdm_job_batches_consumed", "Knowledge batches trained on"),
    "batches_dropped": ("dkdm_job_batches_dropped", "Knowledge batches never trained on"),
    "leases_expired": ("dkdm_job_leases_expired", "Pool leases re-issued after their timeout"),
    "replica_restarts": ("dkdm_job_replica_restarts", "Dead teacher replicas replaced"),
    "student_wait_seconds": ("dkdm_job_student_wait_seconds", "Time student ranks waited for knowledge"),
    "student_busy_seconds": ("dkdm_job_student_busy_seconds", "Time student ranks spent training"),
    "teacher_busy_seconds": ("dkdm_job_teacher_busy_seconds", "Time teacher replicas spent in teacher calls"),
}
LOSS_TERMS = ("loss", "mse", "vlb")

# Every metric name this module exports (dashboards and alerts are checked against it).
EXPORTED = {
    "dkdm_jobs",
    "dkdm_job_state",
    "dkdm_job_teacher_replicas",
    "dkdm_job_step",
    "dkdm_job_total_steps",
    "dkdm_job_progress_ratio",
    "dkdm_job_loss",
    "dkdm_job_student_idle_ratio",
    "dkdm_job_pool_samples",
    "dkdm_job_queue_depth",
    "dkdm_job_digits_fd",
    "dkdm_job_teacher_fd",
    *(f"{name}_total" for name, _ in COUNTER_METRICS.values()),
}


class EngineCollector(Collector):
    def __init__(self, client: redis.Redis, url: str, max_jobs: int = 100) -> None:
        self.r = client
        self.url = url
        self.max_jobs = max_jobs

    def collect(self) -> Iterator[Metric]:
        f = _Families()
        states: Counter[str] = Counter()
        try:
            job_ids = list_jobs(self.r, self.max_jobs)
        except redis.RedisError:
            job_ids = []
        for job_id in job_ids:
            states[f.add_job(job_id, JobStore(self.url, job_id, client=self.r))] += 1
        for state in JOB_STATES:
            f.jobs.add_metric([state], states[state])
        yield from (f.jobs, f.state, f.replicas, f.step, f.total, f.progress, f.loss, f.idle, f.pool, f.depth)
        yield from (f.fd, f.tfd)
        yield from f.counters.values()


class _Families:
    """The metric families of one scrape, filled job by job."""

    def __init__(self) -> None:
        self.jobs = GaugeMetricFamily("dkdm_jobs", "Jobs by state (the newest jobs)", labels=["state"])
        # One series per job and state, 1 for the job's current state (a table or state timeline reads it).
        self.state = GaugeMetricFamily("dkdm_job_state", "1 for the job's current state", labels=["job_id", "state"])
        # Per-replica rates divide by it: the live driver's count, which scaling and restarts change.
        self.replicas = GaugeMetricFamily(
            "dkdm_job_teacher_replicas", "Teacher replicas of a running job", labels=["job_id"]
        )
        self.step = GaugeMetricFamily("dkdm_job_step", "The student's current step", labels=["job_id"])
        self.total = GaugeMetricFamily("dkdm_job_total_steps", "The job's step budget", labels=["job_id"])
        self.progress = GaugeMetricFamily("dkdm_job_progress_ratio", "step / total_steps", labels=["job_id"])
        self.loss = GaugeMetricFamily("dkdm_job_loss", "Latest logged loss terms", labels=["job_id", "term"])
        self.idle = GaugeMetricFamily(
            "dkdm_job_student_idle_ratio", "Rank 0's time waiting / wall time", labels=["job_id"]
        )
        self.pool = GaugeMetricFamily(
            "dkdm_job_pool_samples", "Pool samples per t band (band 0: lowest t)", labels=["job_id", "shard", "band"]
        )
        self.depth = GaugeMetricFamily(
            "dkdm_job_queue_depth", "Knowledge batches waiting per rank", labels=["job_id", "rank"]
        )
        self.fd = GaugeMetricFamily("dkdm_job_digits_fd", "Final digits Fréchet distance", labels=["job_id"])
        # figure: fd, floor, ceiling or score ((fd - floor) / (ceiling - floor)); see dkdm_core.metrics.
        # The latest figure: one every run.quality_every steps while training, then the final one.
        self.tfd = GaugeMetricFamily("dkdm_job_teacher_fd", "Teacher-feature FD", labels=["job_id", "figure"])
        self.counters = {
            name: CounterMetricFamily(metric, doc, labels=["job_id"]) for name, (metric, doc) in COUNTER_METRICS.items()
        }

    def add_job(self, job_id: str, store: JobStore) -> str:
        """One job's samples; returns its state."""
        record = store.record()
        state = record.get("state", "PENDING")
        for known in JOB_STATES:
            self.state.add_metric([job_id, known], float(known == state))
        s, n = float(record.get("step", 0)), float(record.get("total_steps", 0))
        self.step.add_metric([job_id], s)
        self.total.add_metric([job_id], n)
        self.progress.add_metric([job_id], s / n if n else 0.0)
        values = store.metrics()
        for term in LOSS_TERMS:
            if term in values:
                self.loss.add_metric([job_id, term], values[term])
        if "idle_fraction" in values:
            self.idle.add_metric([job_id], values["idle_fraction"])
        if "digits_fd" in values:
            self.fd.add_metric([job_id], values["digits_fd"])
        for name, value in values.items():
            if name.startswith("teacher_fd"):
                self.tfd.add_metric([job_id, name.removeprefix("teacher_fd").lstrip("_") or "fd"], value)
        for name, value in store.counters().items():
            if name in self.counters:
                self.counters[name].add_metric([job_id], value)
        if state not in keys.TERMINAL_STATES:
            for shard, stats in store.shards().items():
                for band, count in enumerate(stats.get("histogram", [])):
                    self.pool.add_metric([job_id, str(shard), str(band)], count)
            for rank, d in store.queue_depths().items():
                self.depth.add_metric([job_id, str(rank)], d)
            driver = store.r.get(keys.heartbeat(job_id, "driver"))  # expires with a dead driver
            replicas = json.loads(driver).get("replicas") if driver is not None else None
            if replicas is not None:
                self.replicas.add_metric([job_id], float(replicas))
        return state
