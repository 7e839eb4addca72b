"""bench/quality.py --quick: every row of the comparison trains, evaluates and lands in the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_quality_bench_quick_mode_produces_table_plot_and_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/quality.py", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    methods = [r["method"] for r in result["rows"]]
    assert methods[0].startswith("teacher") and "data-free" in methods and "dynamic ρ=1.0" in methods
    assert all(r["digits_fd"] > 0 and r["wall_seconds"] >= 0 for r in result["rows"])
    by_name = {r["method"]: r for r in result["rows"]}
    assert by_name["data-based"]["teacher_calls"] == 0
    # The cheaper initialisation spends fewer teacher evaluations on the same pool.
    trajectory = by_name["dynamic ρ=0.4, trajectory init"]["pool_init_teacher_evaluations"]
    assert 0 < trajectory < by_name["dynamic ρ=0.4"]["pool_init_teacher_evaluations"]
    assert set(result["curves"]) == {"iterative", "shuffled", "dynamic ρ=0.4"}
    assert all(len(points) >= 2 for points in result["curves"].values())  # eval_every + the final score
    assert (tmp_path / "quality.md").read_text().count("\n") == len(methods) + 2
    assert (tmp_path / "fd_vs_steps.png").stat().st_size > 1000
