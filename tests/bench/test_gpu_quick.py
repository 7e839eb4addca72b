"""bench/gpu.py --quick on the CPU: a local row and a Ray row of the same setting, compared."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_gpu_bench_quick_mode_compares_a_ray_row_with_its_local_row(tmp_path: Path) -> None:
    args = ["--quick", "--ray", "--local", "ray", "--ray-replicas", "1", "--ray-settings", "digits:fp32+off:bf16"]
    proc = subprocess.run(
        [sys.executable, "bench/gpu.py", *args, "--out", str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert [(r["pair"], r["engine"], r["precision"], r["compile"]) for r in rows] == [
        ("digits", "local", "fp32", "off"),
        ("digits", "ray", "fp32", "off"),
    ]
    local, ray = rows
    assert local["teacher_ms"] > 0 and local["student_ms"] > 0 and local["flops_per_step"] > 0
    assert ray["ship_dtype"] == "bf16" and ray["teacher_replicas"] == 1 and ray["samples_per_s"] > 0
    assert ray["pipeline_efficiency"] > 0 and ray["speedup_vs_local"] > 0 and ray["pipeline_efficiency_same_share"] > 0
    assert ray["slower_side"] in ("teacher", "student") and 0 <= ray["student_idle_fraction"] <= 1
