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
from typing import Any, Protocol

import torch
import yaml
from torch import nn
from tqdm import tqdm

from dkdm_core.checkpoint import ModelCard, list_checkpoints, load_train_state, save_checkpoint, save_model
from dkdm_core.sampling import draw, sampling_steps
from dkdm_core.spec import RunSpec
from dkdm_core.training import read_logs
from services.evaluation import digits_evaluator
from services.images import save_grid

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


def check_resumable(out: Path, spec: dict[str, Any], has_checkpoints: bool | None = None) -> None:
    """Refuse to resume a checkpoint made by a different job (another student, pool, seed...).

    ``has_checkpoints`` defaults to whether OUT/checkpoints holds any (the local layout).
    """
    previous_path = out / "spec.yaml"
    if has_checkpoints is None:
        has_checkpoints = bool(list_checkpoints(out / "checkpoints"))
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


def resume_latest(trainer: SteppingTrainer, checkpoints: Path) -> int:
    """Load the newest complete checkpoint, if any; returns the step it continues from."""
    found = list_checkpoints(checkpoints)
    if not found:
        return 0
    trainer.load_state_dict(load_train_state(found[-1]))
    log.info("resumed from %s", found[-1])
    return trainer.steps_done


def evaluate_model(
    model: nn.Module, card: ModelCard, run: RunSpec, num: int, seed: int
) -> tuple[dict[str, float], torch.Tensor]:
    """Samples from ``model`` and, for digits models, their digits FD and IS analogue."""
    start = time.perf_counter()
    samples = draw(model, card, num, seed, run.sample_steps, run.sampler)
    metrics: dict[str, float] = {
        "sample_seconds_per_image": (time.perf_counter() - start) / num,
        "sample_steps": float(sampling_steps(card, run.sample_steps)),
    }
    if card.data == "digits":
        metrics.update(digits_evaluator().evaluate(samples))
    return metrics, samples


def run_training(
    trainer: SteppingTrainer,
    card: ModelCard,
    spec: dict[str, Any],
    out: Path,
    total_steps: int,
    run: RunSpec,
    seed: int,
    extra_log: Callable[[], dict[str, float]] | None = None,
    extra_metrics: dict[str, float] | None = None,
    progress: bool = True,
) -> RunResult:
    """Train to ``total_steps`` (resuming from OUT/checkpoints), then save and evaluate.

    Callers run ``check_resumable`` first, before any costly set-up of their own.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    checkpoints = out / "checkpoints"
    resumed = resume_latest(trainer, checkpoints)

    saved_at = resumed
    images = len(card.sample_shape) == 3  # latent models decode to images too

    def checkpoint() -> None:
        nonlocal saved_at
        saved_at = trainer.steps_done
        save_checkpoint(checkpoints, saved_at, trainer.ema.model, card, trainer.state_dict())
        save_model(out, trainer.ema.model, card)

    bar = tqdm(total=total_steps, initial=resumed, disable=not progress, desc="train", dynamic_ncols=True)
    started = time.perf_counter()
    with open(out / "log.jsonl", "a") as log_file:
        while trainer.steps_done < total_steps:
            logs = trainer.step()
            step = trainer.steps_done
            bar.update(1)
            if step % run.log_every == 0 or step == total_steps:
                logs = read_logs(logs)  # the one host read of a step's numbers, on log steps only
                record = {"step": step, **logs, **(extra_log() if extra_log else {})}
                record["elapsed_s"] = time.perf_counter() - started
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{logs['loss']:.4f}", mse=f"{logs['mse']:.4f}")
            if step % run.checkpoint_every == 0:
                checkpoint()
            if step % run.sample_every == 0 and step < total_steps and images:
                _, samples = evaluate_model(trainer.ema.model, card, run, 64, seed)
                save_grid(samples, out / "samples" / f"step_{step:08d}.png")
            if run.eval_every and step % run.eval_every == 0 and step < total_steps:
                scores, _ = evaluate_model(trainer.ema.model, card, run, run.eval_samples, seed)
                log_file.write(json.dumps({"step": step, "eval": scores}) + "\n")
                log_file.flush()
    bar.close()
    if saved_at != trainer.steps_done or not list_checkpoints(checkpoints):
        checkpoint()
    metrics, samples = evaluate_model(trainer.ema.model, card, run, run.eval_samples, seed)
    metrics["train_seconds"] = time.perf_counter() - started
    metrics["steps"] = float(trainer.steps_done)
    metrics.update(extra_metrics or {})
    metrics.update(extra_log() if extra_log else {})
    grid = save_grid(samples[:100], out / "samples" / "final.png", nrow=10) if images else None
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    card.info["metrics"] = metrics
    save_model(out, trainer.ema.model, card)
    return RunResult(out=out, steps=trainer.steps_done, metrics=metrics, grid=grid, resumed_from=resumed)
