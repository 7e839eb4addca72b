"""bench/methods.py --quick: every method's row trains, is timed and lands in the JSON and the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_methods_bench_quick_mode_produces_every_row(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "bench/methods.py", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    rows = {r["method"]: r for r in result["rows"]}
    assert {"teacher (UNet)", "teacher (ViT)", "latent teacher", "DKDM", "O2MKD N=2", "O2MKD N=4", "BOOT"} <= set(rows)
    assert {"UNet T → ViT S", "ViT T → UNet S", "ViT T → ViT S", "latent DKDM (L*_simple)"} <= set(rows)
    assert all(r["digits_fd"] > 0 and r["seconds_per_image"] > 0 for r in rows.values())
    assert rows["BOOT"]["sampling_steps"] == 1 and rows["DKDM"]["sampling_steps"] == 5
    # O2MKD: N students in the model, one of them per sampling step.
    assert rows["O2MKD N=4"]["parameters"] == 4 * rows["O2MKD N=4"]["parameters_per_step"]
    assert rows["latent DKDM (L*_simple)"]["space"] == "latent"
    assert "reconstruction_digits_fd" in result["autoencoder"]
    assert (tmp_path / "methods.md").read_text().count("\n") == len(rows) + 2
