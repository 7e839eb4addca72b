"""Job state changes, all in one place: create (record + Ray submission), read (reconciled with Ray), cancel."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator

from dkdm_core.checkpoint import CheckpointError, ModelCard, read_card
from dkdm_core.plan import JobPlan, PlanError, make_plan
from dkdm_core.spec import POOL_METHODS, DistillSpec, RayEngineSpec
from services.control_plane.launcher import RayLauncher
from services.control_plane.settings import Settings
from services.evaluation import resolve_path
from services.jobs import durable
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
    metrics: dict[str, float]
    counters: dict[str, float]
    checkpoints: list[str]
    spec: dict[str, Any]


class InvalidField(ValueError):
    """A request field that validated but cannot be accepted (e.g. a teacher outside the model roots)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


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

    def create(self, request: BaseModel) -> JobCreated:
        job_id = uuid.uuid4().hex[:12]
        plan = self.plan(request, job_id)
        spec = plan.spec
        store = self.store(job_id)
        # The engine takes the plan from the record: it does not read the teacher's card again.
        fields = {"out": spec.out, "total_steps": spec.steps, "error": "", "plan": plan.model_dump_json()}
        store.create(spec.model_dump(), state="PENDING", **fields)
        try:
            self.launcher.submit(job_id)
        except Exception as exc:
            store.set_state("FAILED", error=f"could not submit to Ray at {self.launcher.address}: {exc}")
            raise SubmitError(f"could not submit job {job_id} to Ray: {exc}") from exc
        return JobCreated(id=job_id, state="PENDING")

    def reconcile(self, job_id: str, record: dict[str, str]) -> dict[str, str]:
        """A record still PENDING/RUNNING whose Ray job ended without saying so gets Ray's verdict."""
        if record.get("state") in TERMINAL_STATES:
            return record
        seen = self.launcher.status(job_id)
        if seen is None or seen[0] not in ("FAILED", "STOPPED"):
            return record
        store = self.store(job_id)
        fresh = store.record()  # the engine may have written its verdict meanwhile
        if fresh.get("state") in TERMINAL_STATES:
            return fresh
        if seen[0] == "STOPPED":
            store.set_state("CANCELLED", error="stopped through Ray")
        else:
            tail = self.launcher.logs_tail(job_id).strip().splitlines()[-1:] or [""]
            store.set_state("FAILED", error=f"Ray job failed: {seen[1]} {tail[0]}".strip())
        return store.record()

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
                seen = self.launcher.status(job_id)
                if seen is None or seen[0] == "PENDING":
                    self.launcher.stop(job_id)
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
