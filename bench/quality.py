"""The paper's Table 2 / Fig. 4 claims at digits scale: baselines, the DKDM ablation, pool initialisation.

Every row trains the same student architecture (unet-tiny) from the bundled digits teacher with the
same optimiser, batch (b = 64) and number of student steps, then samples 1000 images with 50 IDDPM
steps and scores them with the digits classifier (``dkdm eval``'s Fréchet distance and IS analogue).
Rows: the teacher itself; data-based (real digits), data-limited (20%, 5% real), data-free (a teacher-
made set of 1797, Fig. 2b); DKDM iterative, shuffled iterative and dynamic (ρ = 0.1, 0.4, 1.0) over
``--seeds``; dynamic ρ = 0.4 with the cheaper trajectory pool initialisation.

Prints one JSON object; writes OUT/quality.md (the table) and OUT/fd_vs_steps.png (digits FD against
student steps for the three DKDM variants). Finished rows are reused when the bench is run again.

    python bench/quality.py [--steps 1500] [--seeds 0 1] [--out runs/quality]
    python bench/quality.py --quick          # a CI-size smoke run (tiny budget, meaningless numbers)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dkdm_core.checkpoint import load_model
from dkdm_core.spec import DistillSpec, RunSpec, load_yaml
from services.evaluation import resolve_path
from services.local_engine import distill_local
from services.runner import evaluate_model

CURVES = ("iterative", "shuffled", "dynamic ρ=0.4")


def rows(seeds: list[int]) -> list[tuple[str, dict[str, Any], list[int]]]:
    """(row name, spec overrides, seeds) for every trained row."""
    dkdm = {"method": "dkdm"}
    return [
        ("data-based", {"method": "data-based"}, seeds[:1]),
        ("data-limited 20%", {"method": "data-limited", "baseline.real_fraction": 0.2}, seeds[:1]),
        ("data-limited 5%", {"method": "data-limited", "baseline.real_fraction": 0.05}, seeds[:1]),
        ("data-free", {"method": "data-free"}, seeds[:1]),
        ("iterative", {**dkdm, "pool.strategy": "iterative"}, seeds),
        ("shuffled", {**dkdm, "pool.strategy": "shuffled"}, seeds),
        ("dynamic ρ=0.1", {**dkdm, "pool.rho": 0.1}, seeds),
        ("dynamic ρ=0.4", {**dkdm, "pool.rho": 0.4}, seeds),
        ("dynamic ρ=1.0", {**dkdm, "pool.rho": 1.0}, seeds),
        ("dynamic ρ=0.4, trajectory init", {**dkdm, "pool.rho": 0.4, "pool.init": "trajectory"}, seeds[:1]),
    ]


def make_spec(args: argparse.Namespace, name: str, overrides: dict[str, Any], seed: int) -> DistillSpec:
    data = load_yaml("configs/digits-dkdm.yaml")
    slug = name.replace(" ", "-").replace("=", "").replace(",", "").replace("%", "pct").replace("ρ", "rho")
    data.update(steps=args.steps, seed=seed, out=str(args.out / f"{slug}-s{seed}"))
    data["run"] = {
        **data["run"],
        "eval_samples": args.eval_samples,
        "sample_steps": args.sample_steps,
        "checkpoint_every": args.steps,
        "sample_every": 10**9,
        # FD-vs-steps curves for the three DKDM variants (first seed only: evaluation costs time).
        "eval_every": args.eval_every if name in CURVES and seed == args.seeds[0] else 0,
    }
    # A short run's EMA must forget the random initialisation: 0.999^1200 still weighs it by 30%.
    data["optim"] = {**data["optim"], "ema_decay": args.ema_decay}
    data["baseline"] = {"synthetic_path": str(args.out / "synthetic.npy")}
    if args.quick:
        data["run"]["quality_samples"] = 16
        data["pool"] = {**data["pool"], "chain_steps": 10}
        data["baseline"].update(synthetic_size=64, synthetic_steps=5)
    for dotted, value in overrides.items():
        section, _, leaf = dotted.rpartition(".")
        (data.setdefault(section, {}) if section else data)[leaf] = value
    return DistillSpec.model_validate(data)


def run_row(spec: DistillSpec) -> dict[str, Any]:
    out = Path(spec.out)
    if not (out / "metrics.json").is_file():
        start = time.perf_counter()
        distill_local(spec, progress=False)
        (out / "wall_seconds").write_text(str(time.perf_counter() - start))
    metrics = json.loads((out / "metrics.json").read_text())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval"]["digits_fd"]) for r in log if "eval" in r] + [(spec.steps, metrics["digits_fd"])]
    return {
        "digits_fd": metrics["digits_fd"],
        "digits_is": metrics["digits_is"],
        "wall_seconds": float((out / "wall_seconds").read_text()),
        "teacher_calls": metrics.get("teacher_calls", 0.0),
        "pool_init_teacher_evaluations": metrics.get("pool_init_teacher_evaluations", 0.0),
        "curve": curve,
    }


def teacher_row(args: argparse.Namespace) -> dict[str, Any]:
    model, card = load_model(resolve_path("assets/teachers/digits"))
    run = RunSpec(sample_steps=args.sample_steps, eval_samples=args.eval_samples)
    start = time.perf_counter()
    metrics, _ = evaluate_model(model, card, run, args.eval_samples, args.seeds[0])
    return {
        "method": "teacher (unet-small)",
        "digits_fd": metrics["digits_fd"],
        "digits_is": metrics["digits_is"],
        "wall_seconds": time.perf_counter() - start,
        "teacher_calls": 0.0,
        "seeds": [args.seeds[0]],
    }


def summarise(name: str, runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    fds = [r["digits_fd"] for r in runs]
    row = {
        "method": name,
        "digits_fd": statistics.mean(fds),
        "digits_is": statistics.mean(r["digits_is"] for r in runs),
        "wall_seconds": statistics.mean(r["wall_seconds"] for r in runs),
        "teacher_calls": runs[0]["teacher_calls"],
        "pool_init_teacher_evaluations": runs[0]["pool_init_teacher_evaluations"],
        "seeds": seeds,
    }
    if len(runs) > 1:
        row["digits_fd_per_seed"] = fds
        row["digits_fd_spread"] = max(fds) - min(fds)
    return row


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| method | digits FD ↓ | IS analogue ↑ | wall time (s) | teacher calls | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        fd = f"{r['digits_fd']:.2f}"
        if "digits_fd_spread" in r:
            fd += f" ({', '.join(f'{v:.2f}' for v in r['digits_fd_per_seed'])})"
        calls = f"{r['teacher_calls']:,.0f}"
        lines.append(
            f"| {r['method']} | {fd} | {r['digits_is']:.2f} | {r['wall_seconds']:.0f} | {calls} | {len(r['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    fig = Figure(figsize=(6, 4), dpi=120)  # no pyplot: no GUI backend, no global state
    ax = fig.subplots()
    for name, points in curves.items():
        steps, fds = zip(*sorted(points), strict=True)
        ax.plot(steps, fds, marker="o", label=name)
    ax.set_xlabel("student steps")
    ax.set_ylabel("digits Fréchet distance")
    ax.set_yscale("log")
    ax.set_title("DKDM variants on digits (unet-small → unet-tiny)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--quick", action="store_true", help="CI-size smoke run: tiny budget, numbers meaningless")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds, args.eval_every, args.eval_samples, args.sample_steps = 20, [0], 10, 64, 5
    args.out.mkdir(parents=True, exist_ok=True)

    table = [teacher_row(args)]
    curves: dict[str, list[tuple[int, float]]] = {}
    for name, overrides, seeds in rows(args.seeds):
        runs = [run_row(make_spec(args, name, overrides, seed)) for seed in seeds]
        table.append(summarise(name, runs, seeds))
        if name in CURVES:
            curves[name] = runs[0]["curve"]
    (args.out / "quality.md").write_text(markdown(table))
    plot(curves, args.out / "fd_vs_steps.png")
    budget = {
        "student_steps": args.steps,
        "batch_size": 64,
        "ema_decay": args.ema_decay,
        "student": "unet-tiny",
        "teacher": "unet-small",
        "eval_samples": args.eval_samples,
        "sample_steps": args.sample_steps,
        "quick": args.quick,
    }
    print(json.dumps({"budget": budget, "rows": table, "curves": curves}, indent=2))


if __name__ == "__main__":
    main()
