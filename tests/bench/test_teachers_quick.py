"""bench/teachers.py --quick: the conditional teacher and its student are scored class by class."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_teachers_bench_quick_mode_scores_every_class(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/teachers.py", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    teacher, student = result["rows"]
    assert teacher["model"] == "teacher" and student["model"] == "student"
    for row in (teacher, student):
        assert set(row["per_class_accuracy"]) == {str(c) for c in range(10)}
        assert 0 <= row["min_accuracy"] <= row["mean_accuracy"] <= 1 and row["digits_fd"] > 0
    assert student["teacher_fd_floor"] < student["teacher_fd_ceiling"] and teacher["teacher_fd"] > 0
