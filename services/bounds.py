"""What a job needs of a cluster (CPUs, GPUs, memory), worked out from its plan before anything is placed.

Pure functions of a plan and the cluster's totals: the control plane runs them at ``POST /jobs`` (a
refusal is a 422 naming the fields to change) and the driver runs the CPU/GPU check again before it
places anything, since the cluster may have shrunk since. The memory figure is a lower bound: it counts
what the job must hold whatever the model's activations (pool, knowledge queues, weights and optimiser
state, evaluation samples), so a job refused here could never have run, while one accepted still may
run short on activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dkdm_core.plan import JobPlan
    from dkdm_core.spec import DistillSpec

FLOAT_BYTES = 4  # pool samples, knowledge batches, weights and optimiser state are float32
POOL_INDEX_BYTES = 8 + 1  # per pool sample: its t (int64) and its leased flag (bool)
SHIP_BYTES = {"fp32": 4, "bf16": 2}  # per element of a shipped knowledge batch (ray.ship_dtype)
STUDENT_COPIES = 5  # weights, EMA weights, gradients and AdamW's two moments


@dataclass(frozen=True)
class Refusal:
    """Why a job cannot run here: the spec fields to change and one line saying why."""

    fields: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class MemoryPart:
    name: str
    bytes: int
    fields: tuple[str, ...]  # the spec fields that size it, the first the one most worth lowering


def gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def placement_refusal(spec: DistillSpec) -> Refusal | None:
    """A ``runtime.device`` the Ray engine cannot honour: its actors run where Ray places them, on a
    GPU exactly when ``ray.teacher_gpus`` / ``ray.student_gpus`` ask for one, else on the CPU."""
    device, r = spec.runtime.device, spec.ray
    gpus = r.teacher_gpus > 0 or r.student_gpus > 0
    fields = ("runtime.device", "ray.teacher_gpus", "ray.student_gpus")
    if device.startswith("cuda") and not gpus:
        return Refusal(
            fields,
            f"runtime.device {device!r} on the ray engine needs ray.teacher_gpus or ray.student_gpus above 0: "
            "replicas and ranks run on the GPUs Ray gives them (fractions share one GPU)",
        )
    if device == "cpu" and gpus:
        return Refusal(
            fields, "runtime.device 'cpu' on the ray engine needs ray.teacher_gpus and ray.student_gpus at 0"
        )
    return None


def resource_refusal(spec: DistillSpec, totals: dict[str, float]) -> Refusal | None:
    """The job's CPUs or GPUs beyond what the cluster has in all (it could never be placed), or a
    device its placement contradicts."""
    refusal = placement_refusal(spec)
    if refusal is not None:
        return refusal
    r = spec.ray
    for kind, teacher, student in (
        ("CPU", r.teacher_cpus, r.student_cpus),
        ("GPU", r.teacher_gpus, r.student_gpus),
    ):
        need = r.teacher_replicas * teacher + r.students * student
        have = totals.get(kind, 0.0)
        if need > have + 1e-9:
            low = kind.lower()
            fields = (("ray.teacher_replicas", f"ray.teacher_{low}s") if teacher else ()) + (
                ("ray.students", f"ray.student_{low}s") if student else ()
            )
            return Refusal(
                fields,
                f"the job needs {need:g} {kind}s (ray.teacher_replicas x ray.teacher_{low}s + ray.students x "
                f"ray.student_{low}s) but the Ray cluster has {have:g}; lower them (fractions are allowed)",
            )
    return None


def weights_bytes(model_dir: str | Path) -> int:
    """The size of a model folder's weights on disk: what loading them takes, whatever the architecture."""
    folder = Path(model_dir)
    # The files load_model reads: model.safetensors, or an imported diffusers UNet's or DiT's (never
    # the training checkpoints a teacher folder may also hold).
    files = list(folder.glob("*.safetensors")) or [
        p for part in ("unet", "transformer") for p in (folder / part).glob("*.safetensors")
    ]
    return sum(p.stat().st_size for p in files if p.is_file())


def memory_parts(plan: JobPlan, teacher_weights: int) -> list[MemoryPart]:
    """What the job holds at once, part by part (see the module doc: activations are not counted)."""
    spec, r = plan.spec, plan.spec.ray
    sample = math.prod(plan.sample_shape) * FLOAT_BYTES
    outputs = 2 if plan.teacher_card.learn_sigma else 1  # ε (and the variance output) per sample
    batch_sample = sample * (2 + outputs)  # x_t, x_{t-1} and the teacher's outputs
    # What a rank's queue holds per sample: x_t and the teacher's outputs, in ray.ship_dtype.
    shipped_sample = math.prod(plan.sample_shape) * SHIP_BYTES[r.ship_dtype] * (1 + outputs)
    params = int(plan.student_card.info.get("parameters") or 0)
    return [
        # |B+| = ρ·K·b samples in the shards, and once more as the snapshot a checkpoint gathers.
        MemoryPart(
            "pool",
            2 * plan.pool_size * (sample + POOL_INDEX_BYTES),
            ("pool.rho", "optim.batch_size", "pool.chain_steps"),
        ),
        # Per rank: the queued knowledge batches, one being put and one being trained on.
        MemoryPart(
            "knowledge queues",
            r.students * (r.queue_size + 2) * plan.rank_batch * shipped_sample,
            ("ray.queue_size", "optim.batch_size", "ray.students"),
        ),
        # Per replica: the teacher's weights and one chunk of shuffle denoise (inputs and outputs).
        MemoryPart(
            "teacher replicas",
            r.teacher_replicas * (teacher_weights + spec.teacher_batch_size * batch_sample),
            ("teacher_batch_size", "ray.teacher_replicas"),
        ),
        MemoryPart("student ranks", r.students * STUDENT_COPIES * FLOAT_BYTES * params, ("ray.students",)),
        # The final evaluation draws its samples (and the teacher's, for the teacher-feature FD) at once.
        MemoryPart(
            "evaluation samples",
            (spec.run.eval_samples + spec.run.quality_samples) * sample,
            ("run.eval_samples", "run.quality_samples"),
        ),
    ]


def shard_refusal(plan: JobPlan, node_bytes: int) -> Refusal | None:
    """A pool shard lives whole in one actor, so on one node: its samples and the snapshot a
    checkpoint gathers of them must fit the largest node's memory and object store, whatever the
    cluster has in all."""
    largest = max(plan.shard_sizes, default=0)
    need = 2 * largest * (math.prod(plan.sample_shape) * FLOAT_BYTES + POOL_INDEX_BYTES)
    if need <= node_bytes:
        return None
    return Refusal(
        ("ray.shards", "pool.rho", "optim.batch_size"),
        f"the largest pool shard needs {gb(need)} ({largest} samples and their checkpoint snapshot) but the "
        f"largest Ray node has {gb(node_bytes)} of memory and object store; raise ray.shards to spread the "
        "pool over more actors, or lower pool.rho or optim.batch_size",
    )


def memory_refusal(parts: list[MemoryPart], limit: int, source: str) -> Refusal | None:
    """Refuse a job whose parts exceed ``limit`` bytes, naming the fields of its largest parts: as many
    of them as could, lowered, bring the job under the limit."""
    total = sum(p.bytes for p in parts)
    if total <= limit:
        return None
    excess = total - limit
    named: list[MemoryPart] = []
    for part in sorted(parts, key=lambda p: p.bytes, reverse=True):
        named.append(part)
        if sum(p.bytes for p in named) >= excess:
            break
    fields = tuple(dict.fromkeys(f for p in named for f in p.fields))
    breakdown = ", ".join(f"{p.name} {gb(p.bytes)}" for p in named)
    return Refusal(
        fields,
        f"the job needs at least {gb(total)} of memory ({breakdown}) but the limit is {gb(limit)} ({source}); "
        f"lower {', '.join(fields)}",
    )
