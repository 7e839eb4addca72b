"""Job state changes, all in one place: create (record + Ray submission), read (reconciled with Ray), cancel."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from dkdm_core.checkpoint import CheckpointError, ModelCard, read_card
from dkdm_core.plan import JobPlan, PlanError, make_plan
from dkdm_core.spec import POOL_METHODS, DistillSpec, RayEngineSpec
from services.bounds import memory_parts, memory_refusal, resource_refusal, shard_refusal, weights_bytes
from services.control_plane.launcher import UNKNOWN, RayLauncher, submission_id
from services.control_plane.settings import Settings
from services.evaluation import resolve_path
from services.jobs import durable, keys
from services.jobs.keys import TERMINAL_STATES
from services.jobs.store import JobStore, ModelRegistry, list_jobs


class _RequestChecks(BaseModel):
    """What ``POST /jobs`` adds to the engine's spec: the service picks the output folder and the
    engine, so only pool methods whose batch splits over the ranks can be asked for. Each check
    runs on its own field, so a refusal names that field."""

    model_config = ConfigDict(extra="forbid")

    out: None = None  # chosen by the service: runs_dir/<job id>
    engine: Literal["ray"] = "ray"

    @field_validator("out", mode="before")
    @classmethod
    def _out_is_chosen_by_the_service(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("chosen by the service (runs_dir/<job id>); leave it out")

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_is_ray(cls, value: Any) -> str:
        if value != "ray":
            raise ValueError("jobs submitted over the API run on the ray engine")
        return value

    @field_validator("method", check_fields=False)
    @classmethod
    def _learns_from_the_pool(cls, value: str) -> str:
        if value not in POOL_METHODS:
            raise ValueError(f"method {value!r} does not learn from the knowledge pool: it runs on engine 'local'")
        return value

    @field_validator("ray", check_fields=False)
    @classmethod
    def _batch_splits_over_the_ranks(cls, value: RayEngineSpec, info: ValidationInfo) -> RayEngineSpec:
        optim = info.data.get("optim")
        if optim is not None and optim.batch_size % value.students:
            raise ValueError(
                f"optim.batch_size ({optim.batch_size}) must be a multiple of ray.students ({value.students}): "
                "each rank trains on b/m samples of the global batch b"
            )
        return value


# The input model of POST /jobs: the engine's spec fields, less those the service chooses, plus its checks.
JobRequest = create_model(
    "JobRequest",
    __base__=_RequestChecks,
    **{n: (f.annotation, f) for n, f in DistillSpec.model_fields.items() if n not in ("out", "engine")},  # type: ignore[call-overload]
)


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher_replicas: int = Field(ge=1, le=1024)


class JobCreated(BaseModel):
    id: str
    state: str


class JobView(BaseModel):
    id: str
    state: str
    step: int
    total_steps: int
    progress: float
    created: float
    updated: float
    error: str
    out: str
    submission: str  # the live submission (Ray job id): the one state, error and cancel follow
    submissions: list[dict[str, Any]]  # every run of the job, oldest first: {id, submitted, outcome, error, ended}
    metrics: dict[str, float]
    counters: dict[str, float]
    checkpoints: list[str]
    spec: dict[str, Any]


class InvalidField(ValueError):
    """A request field that validated but cannot be accepted (e.g. a teacher outside the model roots);
    ``fields``: every field the message asks to change, ``field`` the first."""

    def __init__(self, field: str | tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.fields = (field,) if isinstance(field, str) else field
        self.field = self.fields[0]


class Conflict(RuntimeError):
    """The job is not in a state the request applies to (resuming a running or finished job)."""


class TooManyJobs(RuntimeError):
    """``max_running_jobs`` are PENDING or RUNNING: a capacity limit, so the same request may pass later."""


# The live states: a job in one of them has (or is about to have) a driver.
LIVE_STATES = frozenset({"PENDING", "RUNNING"})
RESUMABLE_STATES = frozenset({"FAILED", "CANCELLED"})
ERROR_CHARS = 500  # a record's error is one line, at most this long
ADMISSION_LOCK_S = 60.0  # the admission lock's lifetime, and the longest wait for it


def one_line(text: str, limit: int = ERROR_CHARS) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def driver_died(job_id: str, submission: str, message: str, log_tail: str) -> str:
    """One line for a driver that ended without writing its verdict, from Ray's multi-line report."""
    found = re.search(r"exit code (-?\d+)", message)
    code = int(found.group(1)) if found else None
    # A signal shows as -N (the driver was Ray's child) or 128+N (a shell in between reported it).
    signum = -code if code is not None and code < 0 else code - 128 if code is not None and code > 128 else None
    if signum is not None:
        try:
            why = f"killed by {signal.Signals(signum).name}"
        except ValueError:
            why = f"killed by signal {signum}"
    elif code is not None:
        lines = [ln for ln in log_tail.splitlines() if ln.strip()]
        why = f"exited with status {code}" + (f": {lines[-1].strip()}" if lines else "")
    else:
        why = (message.strip().splitlines() or ["no reason given by Ray"])[0]
    return _with_resume_hint(job_id, f"the driver (Ray job {submission}) died: {why}")


def driver_gone(job_id: str, submission: str, why: str) -> str:
    """One line for a live job that no driver runs any more and Ray has never heard of (its cluster was
    restarted, e.g. by a restart of `dkdm up`, or its driver ran outside Ray and was killed)."""
    silent = f"and its driver has sent no heartbeat for {keys.HEARTBEAT_TTL_S} s"
    return _with_resume_hint(job_id, f"the driver ({submission}) is gone: {why} {silent}")


def _with_resume_hint(job_id: str, line: str) -> str:
    hint = f"; POST /jobs/{job_id}/resume continues it from its last checkpoint"
    return one_line(line, ERROR_CHARS - len(hint)) + hint


class SubmitError(RuntimeError):
    """Ray refused or could not be reached; the job is recorded as FAILED with the reason."""


class JobService:
    def __init__(self, settings: Settings, client: redis.Redis, launcher: RayLauncher) -> None:
        self.settings = settings
        self.r = client
        self.launcher = launcher

    def store(self, job_id: str) -> JobStore:
        return JobStore(self.settings.redis_url, job_id, client=self.r)

    def read_teacher(self, teacher: str) -> tuple[str, ModelCard]:
        """The teacher's absolute folder and card (the one read of it for this job), if it is a model
        folder inside one of the model roots."""
        path = resolve_path(teacher).resolve()
        if not any(path.is_relative_to(root) for root in self.settings.model_roots):
            roots = ", ".join(str(r) for r in self.settings.model_roots)
            raise InvalidField("teacher", f"teachers are read only from below the model roots ({roots})")
        try:
            return str(path), read_card(path)
        except (CheckpointError, FileNotFoundError, ValueError) as exc:
            raise InvalidField("teacher", f"not a model folder: {exc}") from exc

    def plan(self, request: BaseModel, job_id: str) -> JobPlan:
        """The engine's spec and plan of a request: every check that needs the teacher, once."""
        teacher_dir, card = self.read_teacher(request.teacher)  # type: ignore[attr-defined]
        data = request.model_dump(exclude={"out"})
        data.update(teacher=teacher_dir, out=str(self.settings.runs_dir / job_id))
        try:
            return make_plan(DistillSpec.model_validate(data), card, teacher_dir)
        except PlanError as exc:
            raise InvalidField(exc.field, exc.message) from exc

    def check_limits(self, request: BaseModel) -> None:
        """The control plane's own bounds (settings ``job_max_*``), before anything is read."""
        s, spec = self.settings, request
        limits = [
            ("steps", spec.steps, s.job_max_steps, "job_max_steps"),  # type: ignore[attr-defined]
            ("pool.chain_steps", spec.pool.chain_steps or 0, s.job_max_chain_steps, "job_max_chain_steps"),  # type: ignore[attr-defined]
            ("run.eval_samples", spec.run.eval_samples, s.job_max_eval_samples, "job_max_eval_samples"),  # type: ignore[attr-defined]
            ("run.quality_samples", spec.run.quality_samples, s.job_max_eval_samples, "job_max_eval_samples"),  # type: ignore[attr-defined]
        ]
        for field, value, limit, setting in limits:
            if value > limit:
                raise InvalidField(field, f"{field}={value} exceeds this service's limit of {limit} ({setting})")

    def memory_limit(self, totals: dict[str, float] | None) -> tuple[int, str]:
        """The memory one job may need, and where that figure comes from."""
        if self.settings.job_memory_limit_bytes is not None:
            return self.settings.job_memory_limit_bytes, "the setting job_memory_limit_bytes"
        if totals and totals.get("memory"):
            cluster = int(totals["memory"] + totals.get("object_store_memory", 0.0))
            return cluster, "the Ray cluster's memory and object store"
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"

    def check_cluster(self, plan: JobPlan) -> None:
        """The job's CPUs and GPUs against the cluster (when Ray answers) and its memory against the limit."""
        totals = self.launcher.cluster_totals()
        refusal = resource_refusal(plan.spec, totals) if totals is not None else None
        if refusal is None:
            limit, source = self.memory_limit(totals)
            refusal = memory_refusal(memory_parts(plan, weights_bytes(plan.teacher_dir)), limit, source)
        node_bytes = self.launcher.largest_node_bytes() if totals is not None else None
        if refusal is None and node_bytes is not None:
            refusal = shard_refusal(plan, node_bytes)
        if refusal is not None:
            raise InvalidField(refusal.fields, refusal.message)

    def running_jobs(self) -> int:
        """Jobs PENDING or RUNNING (after reconciling each with Ray: a dead driver's job does not count)."""
        ids = list_jobs(self.r, 100_000)
        with self.r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            records = pipe.execute()
        live = 0
        for job_id, record in zip(ids, records, strict=True):
            if record.get("state") in LIVE_STATES and self.reconcile(job_id, record).get("state") in LIVE_STATES:
                live += 1
        return live

    @contextlib.contextmanager
    def admitting(self) -> Iterator[None]:
        """Held from counting the live jobs until the new one is recorded as live, so two requests (to
        one control plane or to several) cannot both take the last place; it expires should its holder die."""
        lock = self.r.lock(keys.admission(), timeout=ADMISSION_LOCK_S, blocking_timeout=ADMISSION_LOCK_S)
        if not lock.acquire():
            raise TooManyJobs(f"other jobs have been admitted for over {ADMISSION_LOCK_S:.0f} s; retry")
        try:
            yield
        finally:
            with contextlib.suppress(redis.exceptions.LockError):  # it expired: a slow admission, not an error
                lock.release()

    def check_capacity(self) -> None:
        running = self.running_jobs()
        if running >= self.settings.max_running_jobs:
            raise TooManyJobs(
                f"{running} jobs are pending or running and the limit is {self.settings.max_running_jobs} "
                "(max_running_jobs); retry when one ends"
            )

    def create(self, request: BaseModel) -> JobCreated:
        job_id = uuid.uuid4().hex[:12]
        self.check_limits(request)
        plan = self.plan(request, job_id)
        self.check_cluster(plan)
        spec = plan.spec
        store = self.store(job_id)
        first = submission_id(job_id)
        # The engine takes the plan from the record: it does not read the teacher's card again.
        fields = {"out": spec.out, "total_steps": spec.steps, "error": "", "plan": plan.model_dump_json()}
        fields |= {"submission": first, "submissions": [{"id": first, "submitted": time.time()}]}
        with self.admitting():
            self.check_capacity()
            store.create(spec.model_dump(), state="PENDING", **fields)
        self.submit(store, first)
        return JobCreated(id=job_id, state="PENDING")

    def submit(self, store: JobStore, submission: str) -> None:
        try:
            self.launcher.submit(store.job_id, submission)
        except Exception as exc:
            store.set_state("FAILED", error=one_line(f"could not submit to Ray at {self.launcher.address}: {exc}"))
            raise SubmitError(f"could not submit job {store.job_id} to Ray: {one_line(str(exc))}") from exc

    def resume(self, job_id: str) -> JobView | None:
        """Run a FAILED or CANCELLED job again under a new submission: the engine continues from the
        newest checkpoint in the job's output folder (student, pool and step count; counters go on)."""
        store = self.store(job_id)
        record = store.record()
        if not record:
            return None
        record = self.reconcile(job_id, record)
        state = record.get("state", "PENDING")
        if state not in RESUMABLE_STATES:
            raise Conflict(f"job {job_id} is {state}: only a FAILED or CANCELLED job can be resumed")
        live = record.get("submission") or submission_id(job_id)
        seen = self.launcher.status(live)
        if seen is not None and seen[0] in ("PENDING", "RUNNING"):
            raise Conflict(f"job {job_id}'s submission {live} is still {seen[0]} in Ray; wait for it to end")
        new = submission_id(job_id, max(1, len(store.submissions())))
        with self.admitting():
            self.check_capacity()
            store.clear_requests("cancel", "cancel_requested_at", "abort")  # the last run's, not this one's
            if not store.begin_submission(new, allowed=RESUMABLE_STATES, state="PENDING", error=""):
                raise Conflict(f"job {job_id} changed state meanwhile; look at it again")
        self.submit(store, new)
        return self.view(job_id)

    def reconcile(self, job_id: str, record: dict[str, str]) -> dict[str, str]:
        """A record still PENDING/RUNNING whose live submission ended in Ray without saying so gets Ray's
        verdict, in one line. Only the live submission counts: an older, failed one never overwrites
        the state of the run that replaced it."""
        if record.get("state") in TERMINAL_STATES:
            return record
        live = record.get("submission") or submission_id(job_id)
        if (copied := self.finished_copy(job_id, record, live)) is not None:
            return copied
        seen = self.launcher.status(live)
        if seen is None or seen[0] not in ("FAILED", "STOPPED", UNKNOWN):
            return record
        store = self.store(job_id)
        if seen[0] == UNKNOWN and not self.silent(store, record):
            return record  # just submitted, or a driver Ray does not run (started by hand) that still beats
        fresh = store.record()  # the engine may have written its verdict, or a resume begun, meanwhile
        if fresh.get("state") in TERMINAL_STATES or (fresh.get("submission") or submission_id(job_id)) != live:
            return fresh
        if seen[0] == "STOPPED":
            store.set_state("CANCELLED", error="stopped through Ray")
        elif seen[0] == UNKNOWN:
            store.set_state("FAILED", error=driver_gone(job_id, live, seen[1]))
        else:
            store.set_state("FAILED", error=driver_died(job_id, live, seen[1], self.launcher.logs_tail(live)))
        return store.record()

    def finished_copy(self, job_id: str, record: dict[str, str], live: str) -> dict[str, str] | None:
        """The verdict of the job's durable copy (``OUT/job.json``) when it is newer than the live record
        Redis holds: a driver that lost Redis writes its FAILED there, and a Redis back after the driver
        gave up still says RUNNING. Only the live submission's copy counts."""
        copy = durable.read_copy(durable.copy_path(record["out"])) if record.get("out") else None
        if copy is None or copy["id"] != job_id:
            return None
        written = copy["record"]
        finished = written.get("state") in TERMINAL_STATES and written.get("submission", live) == live
        if not finished or float(written.get("updated") or 0) <= float(record.get("updated") or 0):
            return None
        store = self.store(job_id)
        store.set_state(written["state"], error=written.get("error", ""))
        return store.record()

    @staticmethod
    def silent(store: JobStore, record: dict[str, str]) -> bool:
        """No driver heartbeat, and no change to the record, for ``HEARTBEAT_TTL_S``."""
        quiet = time.time() - float(record.get("updated") or 0) > keys.HEARTBEAT_TTL_S
        return quiet and not store.beats("driver")

    def recover(self, job_id: str) -> bool:
        """Rebuild a record Redis lost from the job's durable copy, runs_dir/<id>/job.json, if there is one."""
        if Path(job_id).name != job_id or job_id.startswith("."):
            return False
        copy = durable.read_copy(durable.copy_path(self.settings.runs_dir / job_id))
        return copy is not None and copy["id"] == job_id and self.store(job_id).restore(copy)

    def recover_all(self) -> list[str]:
        """Rebuild every job record below runs_dir that Redis lost (at start-up); the ids rebuilt."""
        return [p.parent.name for p in durable.find_copies([self.settings.runs_dir]) if self.recover(p.parent.name)]

    def view(self, job_id: str) -> JobView | None:
        store = self.store(job_id)
        record = store.record()
        if not record and self.recover(job_id):
            record = store.record()
        if not record:
            return None
        record = self.reconcile(job_id, record)
        step, total = int(float(record.get("step", 0))), int(float(record.get("total_steps", 0)))
        out = record.get("out", "")
        run_dir = Path(out) / "ray_train" / "student"
        checkpoints = sorted(str(p) for p in run_dir.glob("checkpoint_*")) if out and run_dir.is_dir() else []
        submissions = json.loads(record.get("submissions", "[]"))
        if submissions and "outcome" not in submissions[-1] and record.get("state") in TERMINAL_STATES:
            submissions[-1]["outcome"] = record["state"]  # the live one's outcome is the record's state
        return JobView(
            id=job_id,
            state=record.get("state", "PENDING"),
            step=step,
            total_steps=total,
            progress=step / total if total else 0.0,
            created=float(record.get("created", 0)),
            updated=float(record.get("updated", 0)),
            error=record.get("error", ""),
            out=out,
            submission=record.get("submission", submission_id(job_id)),
            submissions=submissions,
            metrics=store.metrics(),
            counters={k: v for k, v in store.counters().items() if v},
            checkpoints=checkpoints,
            spec=json.loads(record.get("spec", "{}")),
        )

    def list(self, limit: int = 100) -> list[JobView]:
        return [v for v in (self.view(j) for j in list_jobs(self.r, limit)) if v is not None]

    def cancel(self, job_id: str) -> JobView | None:
        store = self.store(job_id)
        record = store.record()
        if not record:
            return None
        if record.get("state") not in TERMINAL_STATES:
            # The engine stops at its next log step and saves a checkpoint there; a job that never
            # started is stopped in Ray and marked at once.
            store.request(cancel=1, cancel_requested_at=time.time())
            if record.get("state") == "PENDING":
                live = record.get("submission") or submission_id(job_id)
                seen = self.launcher.status(live)
                if seen is None or seen[0] in ("PENDING", UNKNOWN):
                    self.launcher.stop(live)
                    store.set_state("CANCELLED", error="cancelled before it started")
        return self.view(job_id)

    def scale(self, job_id: str, teacher_replicas: int) -> JobView | None:
        store = self.store(job_id)
        if not store.exists():
            return None
        store.request(teacher_replicas=teacher_replicas)
        return self.view(job_id)

    def models(self) -> dict[str, dict[str, Any]]:
        return ModelRegistry(self.r).all()
