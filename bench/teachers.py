"""Class-conditional distillation at digits scale: does the student draw the digit it is asked for?

The bundled class-conditional digits teacher (``assets/teachers/digits-cond``) is distilled into a
conditional student with ``configs/digits-cond-dkdm.yaml`` (data-free DKDM, guided pool). Teacher
and student then draw ``--per-class`` samples of every class (50 IDDPM steps, the cards' guidance
scale) and the project's digits classifier reads them: per-class accuracy (target ≥ 95% for every
class), the digits Fréchet distance of the balanced set, and the data-free teacher-feature FD (for
the teacher its floor: the teacher against itself with other seeds).

Prints one JSON object. A finished student in ``--out`` is reused when the bench is run again.

    python bench/teachers.py [--steps 1500] [--per-class 100] [--out runs/teachers]
    python bench/teachers.py --quick     # a CI-size smoke run (tiny budget, meaningless numbers)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from dkdm_core.checkpoint import load_model
from dkdm_core.sampling import draw
from dkdm_core.spec import DistillSpec, load_yaml, set_dotted
from services.evaluation import digits_evaluator, load_classifier, resolve_path
from services.local_engine import distill_local

TARGET = 0.95


def class_scores(model_dir: Path, per_class: int, steps: int, seed: int) -> dict[str, Any]:
    """Per-class accuracy of the digits classifier on ``per_class`` samples of each class, and the digits FD."""
    model, card = load_model(model_dir)
    assert card.classes is not None, f"{model_dir} is not class-conditional"
    labels = torch.arange(card.classes.num).repeat_interleave(per_class)  # (K·n,)
    start = time.perf_counter()
    images = draw(model, card, labels.numel(), seed, steps, labels=labels)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        predicted = load_classifier()(images.clamp(-1, 1)).argmax(dim=1)
    accuracy = {str(c): float((predicted[labels == c] == c).float().mean()) for c in range(card.classes.num)}
    return {
        "guidance_scale": card.classes.guidance_scale,
        "per_class_accuracy": accuracy,
        "min_accuracy": min(accuracy.values()),
        "mean_accuracy": float((predicted == labels).float().mean()),
        "meets_target": min(accuracy.values()) >= TARGET,
        "digits_fd": digits_evaluator().evaluate(images)["digits_fd"],
        "sample_seconds_per_image": seconds / labels.numel(),
    }


def student_spec(args: argparse.Namespace) -> DistillSpec:
    data = load_yaml("configs/digits-cond-dkdm.yaml")
    data.update(steps=args.steps, out=str(args.out / "student"), seed=args.seed)
    # The job's own final evaluation only needs the teacher-feature FD's samples: the bench scores classes itself.
    data["run"] = {**data["run"], "eval_samples": args.quality_samples, "quality_samples": args.quality_samples}
    data["run"]["sample_steps"] = args.sample_steps
    if args.quick:
        for key, value in {
            "pool.chain_steps": 10,
            "pool.rho": 0.2,
            "optim.batch_size": 16,
            "teacher_batch_size": 64,
            "run.checkpoint_every": 1000,
            "run.sample_every": 1000,
        }.items():
            set_dotted(data, key, value)
    return DistillSpec.model_validate(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="student steps")
    parser.add_argument("--per-class", type=int, default=100, help="samples of each class scored")
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--quality-samples", type=int, default=300, help="samples per teacher-feature FD set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/teachers"))
    parser.add_argument("--quick", action="store_true", help="CI-size smoke run: tiny budget, numbers meaningless")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.per_class, args.sample_steps, args.quality_samples = 4, 4, 5, 16
    spec = student_spec(args)
    student_dir = Path(spec.out)
    start = time.perf_counter()
    if not (student_dir / "metrics.json").is_file():
        distill_local(spec, progress=False)
    train_seconds = time.perf_counter() - start
    metrics = json.loads((student_dir / "metrics.json").read_text())
    teacher = class_scores(resolve_path(spec.teacher), args.per_class, args.sample_steps, args.seed)
    teacher["teacher_fd"] = metrics.get("teacher_fd_floor")  # the teacher against itself: the floor
    student = class_scores(student_dir, args.per_class, args.sample_steps, args.seed)
    quality = ("teacher_fd", "teacher_fd_floor", "teacher_fd_ceiling", "teacher_fd_score")
    student.update({k: metrics[k] for k in quality if k in metrics})
    student["train_seconds"] = train_seconds
    card = json.loads((student_dir / "config.json").read_text())
    result = {
        "teacher": spec.teacher,
        "student": spec.student.arch,
        "student_parameters": card["info"].get("parameters"),
        "teacher_parameters": card["info"].get("teacher_parameters"),
        "steps": spec.steps,
        "per_class": args.per_class,
        "sample_steps": args.sample_steps,
        "target_accuracy": TARGET,
        "rows": [{"model": "teacher", **teacher}, {"model": "student", **student}],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
