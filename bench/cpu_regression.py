"""The local digits step on this machine's CPU: this tree against an earlier revision, in one run.

    python bench/cpu_regression.py --rev a5572ae [--rounds 4] [--steps 100] [--out FILE]

The step is the local engine's (the bundled unet-small teacher -> unet-tiny, b = 64, a 100-step chain,
dynamic pool ρ = 0.4; the pool is not initialised: a step costs the same whatever it holds). Each round
times ``--steps`` steps in a fresh process of each tree, the revision checked out in a temporary git
worktree, the two taking turns so that a change in the machine's load hits both. One JSON object:
ms/step per round and tree, the medians, and this tree's median over the revision's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Run inside each tree: only what both the revision and this tree provide.
TIMING = """
import json, sys, tempfile, time
import torch
from dkdm_core.spec import DistillSpec
from services.local_engine import build_distiller
torch.manual_seed(0)
spec = DistillSpec.model_validate({
    "teacher": "assets/teachers/digits", "student": {"arch": "unet-tiny"},
    "pool": {"strategy": "dynamic", "rho": 0.4, "chain_steps": 100},
    "optim": {"batch_size": 64, "lr": 1e-3, "warmup_steps": 10}, "steps": 10**6, "seed": 0,
    "out": tempfile.mkdtemp(), "run": {"log_every": 50, "eval_samples": 16, "sample_steps": 5}})
distiller = build_distiller(spec, torch.device("cpu"))[0]
for _ in range(5):
    distiller.step()
steps = int(sys.argv[1])
start = time.perf_counter()
for _ in range(steps):
    distiller.step()
print(json.dumps({"ms_per_step": 1000 * (time.perf_counter() - start) / steps}))
"""


def time_tree(tree: Path, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-c", TIMING, str(steps)], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"timing in {tree} failed:\n{proc.stderr[-3000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["ms_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="dkdm-rev-") as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.rev], cwd=ROOT, check=True)
        try:
            rounds: list[dict[str, Any]] = []
            for _ in range(args.rounds):
                rounds.append({"rev": time_tree(old, args.steps), "this": time_tree(ROOT, args.steps)})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    rev_median = statistics.median(r["rev"] for r in rounds)
    this_median = statistics.median(r["this"] for r in rounds)
    result = {
        "device": f"cpu ({os.cpu_count()} cores)",
        "rev": args.rev,
        "this": head.strip() or "working tree",
        "steps_per_round": args.steps,
        "rounds_ms_per_step": rounds,
        "rev_median_ms": rev_median,
        "this_median_ms": this_median,
        "this_over_rev": this_median / rev_median,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
