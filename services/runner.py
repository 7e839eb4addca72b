"""The training driver shared by ``dkdm teacher train`` and ``dkdm distill --engine local``.

It owns everything a trainer step object does not: resuming, the progress bar, the loss log,
checkpoints, sample grids and the final evaluation. Output folder layout:

    OUT/config.json, OUT/model.safetensors   the latest EMA model (what ``dkdm sample`` reads)
    OUT/spec.yaml                            the resolved job spec
    OUT/log.jsonl                            one JSON line per logged step
    OUT/checkpoints/step_XXXXXXXX/           resumable checkpoints (model + train_state.pt)
    OUT/samples/step_XXXXXXXX.png            sample grids
    OUT/metrics.json                         the final evaluation
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from dkdm_core.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    ModelCard,
    list_checkpoints,
    load_train_state,
    save_checkpoint,
    save_model,
)
from dkdm_core.sampling import draw, sampling_steps
from dkdm_core.spec import RunSpec
from dkdm_core.training import StepLogs, read_logs
from services.evaluation import digits_evaluator
from services.images import save_grid
from services.quality import quality_at, teacher_quality

log = logging.getLogger(__name__)


class SteppingTrainer(Protocol):
    steps_done: int
    ema: Any

    def step(self) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RunResult:
    out: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    grid: Path | None = None
    resumed_from: int = 0


# Fields a resumed run may change: its length, its outputs and its bookkeeping cadence.
RESUMABLE_CHANGES = frozenset({"steps", "out", "run", "engine", "ray", "runtime"})


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resumable(out: Path, spec: dict[str, Any], has_checkpoints: bool) -> None:
    """Refuse to resume a checkpoint made by a different job (another student, pool, seed...)."""
    previous_path = out / "spec.yaml"
    if not previous_path.is_file() or not has_checkpoints:
        return
    before = _flatten(yaml.safe_load(previous_path.read_text()) or {})
    after = _flatten(spec)
    changed = sorted(
        k
        for k in before.keys() | after.keys()
        if k.split(".")[0] not in RESUMABLE_CHANGES and before.get(k) != after.get(k)
    )
    if changed:
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed)
        raise ValueError(f"{out} holds checkpoints of a different job ({diff}); use a new --out to start over")


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run continues from, read once: the student and the pool both come from it."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["steps_done"])


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's training state, after checking its weights file reads too (a truncated file fails)."""
    state = load_train_state(path)
    weights = path / WEIGHTS_FILE
    try:
        load_file(str(weights))
    except Exception as exc:  # safetensors' own error type: a missing, truncated or foreign file
        raise CheckpointError(f"{weights} could not be read: {exc}") from exc
    return state


def resume_point(candidates: list[Path]) -> ResumePoint | None:
    """The newest of ``candidates`` (complete checkpoints, oldest first) whose files all read back.

    None means a fresh run: no checkpoint was ever completed (a crash during the first save leaves
    only ``step_*.tmp``). A newest checkpoint with a truncated or corrupt file is passed over for the
    previous one, with a warning naming both; if none reads back, the error names the newest file.
    """
    errors: list[CheckpointError] = []
    for path in reversed(candidates):
        try:
            state = _read_checkpoint(path)
        except CheckpointError as exc:
            log.warning("checkpoint %s is unreadable: %s", path, exc)
            errors.append(exc)
            continue
        if errors:
            log.warning("resuming from %s instead of the unreadable %s", path, candidates[-1])
        log.info("resuming from %s", path)
        return ResumePoint(path, state)
    if errors:
        raise CheckpointError(f"no checkpoint to resume from reads back: {errors[0]}; remove it or use a new --out")
    return None


def decide_resume(out: Path, spec: dict[str, Any], candidates: list[Path]) -> ResumePoint | None:
    """Whether (and from where) a run resumes: decided once, before any costly set-up."""
    check_resumable(out, spec, has_checkpoints=bool(candidates))
    return resume_point(candidates)


def evaluate_model(
    model: nn.Module, card: ModelCard, run: RunSpec, num: int, seed: int, quality_dir: Path | None = None
) -> tuple[dict[str, float], torch.Tensor]:
    """Samples from ``model`` and, for digits models, their digits FD and IS analogue.

    With ``quality_dir`` (where the teacher's samples are cached), a student also gets its
    teacher-feature FD (``services.quality``): the figure every job has, whatever its data.
    """
    start = time.perf_counter()
    samples = draw(model, card, num, seed, run.sample_steps, run.sampler)
    metrics: dict[str, float] = {
        "sample_seconds_per_image": (time.perf_counter() - start) / num,
        "sample_steps": float(sampling_steps(card, run.sample_steps)),
    }
    if card.data == "digits":
        metrics.update(digits_evaluator().evaluate(samples))
    if quality_dir is not None:
        metrics.update(teacher_quality(model, card, run, seed, quality_dir, samples))
    return metrics, samples


@dataclass
class _Run:
    """One training run's bookkeeping around the trainer: logs, checkpoints, grids, evaluations."""

    trainer: SteppingTrainer
    card: ModelCard
    out: Path
    total_steps: int
    run: RunSpec
    seed: int
    extra_log: Callable[[], dict[str, float]] | None
    saved_at: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def extra(self) -> dict[str, float]:
        return self.extra_log() if self.extra_log else {}

    def checkpoint(self) -> None:
        self.saved_at = self.trainer.steps_done
        save_checkpoint(self.checkpoints, self.saved_at, self.trainer.ema.model, self.card, self.trainer.state_dict())
        save_model(self.out, self.trainer.ema.model, self.card)

    def after_step(self, logs: StepLogs, log_file: IO[str]) -> dict[str, float] | None:
        """Log, checkpoint, sample and evaluate as the run spec says; the logged numbers, on log steps."""
        step, run, last = self.trainer.steps_done, self.run, self.trainer.steps_done == self.total_steps
        numbers = None
        if step % run.log_every == 0 or last:
            numbers = read_logs(logs)  # the one host read of a step's numbers, on log steps only
            record = {"step": step, **numbers, **self.extra(), "elapsed_s": time.perf_counter() - self.started}
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if step % run.checkpoint_every == 0:
            self.checkpoint()
        if step % run.sample_every == 0 and not last and len(self.card.sample_shape) == 3:
            _, samples = evaluate_model(self.trainer.ema.model, self.card, run, 64, self.seed)
            save_grid(samples, self.out / "samples" / f"step_{step:08d}.png")
        quality = {} if last else quality_at(self.trainer.ema.model, self.card, run, self.seed, self.out, step)
        if quality:
            log_file.write(json.dumps({"step": step, "quality": quality}) + "\n")
            log_file.flush()
        if run.eval_every and step % run.eval_every == 0 and not last:
            scores, _ = evaluate_model(self.trainer.ema.model, self.card, run, run.eval_samples, self.seed)
            log_file.write(json.dumps({"step": step, "eval": scores}) + "\n")
            log_file.flush()
        return numbers

    def finish(self, extra_metrics: dict[str, float] | None) -> tuple[dict[str, float], Path | None]:
        """The last checkpoint, the final evaluation, OUT/metrics.json and the model with its metrics."""
        if self.saved_at != self.trainer.steps_done or not list_checkpoints(self.checkpoints):
            self.checkpoint()
        model = self.trainer.ema.model
        quality = self.out / "quality"  # the teacher's samples for the teacher-feature FD, cached
        metrics, samples = evaluate_model(model, self.card, self.run, self.run.eval_samples, self.seed, quality)
        metrics["train_seconds"] = time.perf_counter() - self.started
        metrics["steps"] = float(self.trainer.steps_done)
        metrics.update({**(extra_metrics or {}), **self.extra()})
        images = len(self.card.sample_shape) == 3  # latent models decode to images too
        grid = save_grid(samples[:100], self.out / "samples" / "final.png", nrow=10) if images else None
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self.card.info["metrics"] = metrics
        save_model(self.out, model, self.card)
        return metrics, grid


def run_training(
    trainer: SteppingTrainer,
    card: ModelCard,
    spec: dict[str, Any],
    out: Path,
    total_steps: int,
    run: RunSpec,
    seed: int,
    resume: ResumePoint | None,
    extra_log: Callable[[], dict[str, float]] | None = None,
    extra_metrics: dict[str, float] | None = None,
    progress: bool = True,
) -> RunResult:
    """Train to ``total_steps`` from ``resume`` (see ``decide_resume``) or from scratch, then save and evaluate."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if resume is not None:
        trainer.load_state_dict(resume.state)
    state = _Run(trainer, card, out, total_steps, run, seed, extra_log, saved_at=trainer.steps_done)
    resumed = trainer.steps_done
    bar = tqdm(total=total_steps, initial=resumed, disable=not progress, desc="train", dynamic_ncols=True)
    with open(out / "log.jsonl", "a") as log_file:
        while trainer.steps_done < total_steps:
            logs = trainer.step()
            bar.update(1)
            numbers = state.after_step(logs, log_file)
            if numbers is not None:
                bar.set_postfix(loss=f"{numbers['loss']:.4f}", mse=f"{numbers['mse']:.4f}")
    bar.close()
    metrics, grid = state.finish(extra_metrics)
    return RunResult(out=out, steps=trainer.steps_done, metrics=metrics, grid=grid, resumed_from=resumed)
