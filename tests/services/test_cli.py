"""The dkdm command: help everywhere, one-line errors on bad input, and the sample/eval formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_dkdm

COMMANDS = [
    [],
    ["teacher"],
    ["teacher", "train"],
    ["distill"],
    ["sample"],
    ["eval"],
    ["export"],
    ["classifier", "train"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "dkdm")
def test_every_command_has_help(cmd: list[str]) -> None:
    proc = run_dkdm(*cmd, "--help", subprocess_=not cmd)  # the real entry point once
    assert proc.stdout.startswith("usage: dkdm")


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dkdm: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_config_file(tmp_path: Path) -> None:
    proc = run_dkdm("distill", "--config", str(tmp_path / "no.yaml"), check=False, subprocess_=True)
    assert_one_line_error(proc, "config file not found")


def test_invalid_yaml_and_non_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    assert_one_line_error(run_dkdm("distill", "--config", str(bad), check=False), "not valid YAML")
    bad.write_text("- a\n- b\n")
    assert_one_line_error(run_dkdm("distill", "--config", str(bad), check=False), "must hold a mapping")


def test_unknown_model_name_and_fields_are_named(tmp_path: Path) -> None:
    assert_one_line_error(
        run_dkdm("distill", "--set", "student.arch=unet-huge", "--out", str(tmp_path), check=False),
        "student.arch",
        "unknown model 'unet-huge'",
    )
    assert_one_line_error(run_dkdm("distill", "--set", "pool.rhoo=1", check=False), "pool.rhoo")
    assert_one_line_error(run_dkdm("distill", "--set", "pool.strategy=greedy", check=False), "pool.strategy")
    assert_one_line_error(run_dkdm("distill", "--set", "ray.ship_dtype=fp16", check=False), "ray.ship_dtype")
    assert_one_line_error(run_dkdm("teacher", "train", "--set", "model.arch=nope", check=False), "model.arch")


def test_missing_teacher_folder(tmp_path: Path) -> None:
    proc = run_dkdm("distill", "--set", f"teacher={tmp_path / 'nope'}", "--out", str(tmp_path / "o"), check=False)
    assert_one_line_error(proc, "model folder not found")


def test_teacher_shape_mismatch_is_reported(tmp_path: Path) -> None:
    proc = run_dkdm("teacher", "train", "--set", "model.image_size=16", "--out", str(tmp_path), check=False)
    assert_one_line_error(proc, "(1, 16, 16)", "(1, 8, 8)")


def test_chain_longer_than_teacher(tiny_teacher: Path, tmp_path: Path) -> None:
    proc = run_dkdm(
        "distill",
        "--set",
        f"teacher={tiny_teacher}",
        "--set",
        "pool.chain_steps=500",
        "--out",
        str(tmp_path),
        check=False,
    )
    assert_one_line_error(proc, "exceeds the teacher's T=100")


def test_sample_writes_uint8_nhwc_and_grid(tiny_teacher: Path, tmp_path: Path) -> None:
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    run_dkdm(
        "sample", "--model", str(tiny_teacher), "--num", "20", "--steps", "5", "--out", str(out), "--grid", str(grid)
    )
    with np.load(out) as data:
        arr = data["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (20, 8, 8, 1)
    assert grid.stat().st_size > 0
    run_dkdm(
        "sample", "--model", str(tiny_teacher), "--num", "4", "--steps", "5", "--sampler", "ddim", "--out", str(out)
    )


def test_sample_and_eval_bad_inputs(tiny_teacher: Path, tmp_path: Path) -> None:
    assert_one_line_error(
        run_dkdm("sample", "--model", str(tmp_path), "--num", "2", "--out", str(tmp_path / "x.npz"), check=False),
        "config.json is missing",
    )
    assert_one_line_error(
        run_dkdm("sample", "--model", str(tiny_teacher), "--num", "0", "--out", "x.npz", check=False), "--num"
    )
    assert_one_line_error(
        run_dkdm(
            "sample",
            "--model",
            str(tiny_teacher),
            "--num",
            "2",
            "--steps",
            "5000",
            "--out",
            str(tmp_path / "x.npz"),
            check=False,
        ),
        "sampling steps",
    )
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, arr_0=np.zeros((4, 16, 16, 3), dtype=np.uint8))
    assert_one_line_error(run_dkdm("eval", "--samples", str(wrong), check=False), "8x8 grey")
    np.savez(wrong, arr_0=np.zeros((4, 8, 8), dtype=np.float32))
    assert_one_line_error(run_dkdm("eval", "--samples", str(wrong), check=False), "uint8")
    assert_one_line_error(run_dkdm("eval", "--samples", str(tmp_path / "none.npz"), check=False), "not found")
    (tmp_path / "junk.npz").write_text("junk")
    assert_one_line_error(run_dkdm("eval", "--samples", str(tmp_path / "junk.npz"), check=False), "not a readable")
    assert_one_line_error(run_dkdm("eval", check=False), "exactly one of")


def test_eval_of_real_digits_scores_near_zero(tmp_path: Path) -> None:
    from dkdm_core.data import load_digits_tensor, to_uint8_nhwc

    real = tmp_path / "real.npz"
    np.savez(real, arr_0=to_uint8_nhwc(load_digits_tensor()[0]))
    noise = tmp_path / "noise.npz"
    np.savez(noise, arr_0=np.random.default_rng(0).integers(0, 256, (1797, 8, 8, 1), dtype=np.uint8))
    import json

    good = json.loads(run_dkdm("eval", "--samples", str(real)).stdout)
    bad = json.loads(run_dkdm("eval", "--samples", str(noise)).stdout)
    assert good["digits_fd"] < 1.0 < 100 < bad["digits_fd"]
    assert good["digits_is"] > 8 > bad["digits_is"]


def test_export_and_sample_from_diffusers_folder(tiny_teacher: Path, tmp_path: Path) -> None:
    run_dkdm("export", "--model", str(tiny_teacher), "--out", str(tmp_path / "pipe"))
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    run_dkdm(
        "sample", "--model", str(tmp_path / "pipe"), "--num", "4", "--steps", "5", "--out", str(tmp_path / "p.npz")
    )


class _TinyExtractor(torch.nn.Module):
    """A stand-in feature extractor with the Inception detector's calling convention."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x / 255.0)), 2).flatten(1)


def test_eval_with_a_local_torchscript_extractor(tmp_path: Path) -> None:
    import json

    from dkdm_core.data import load_digits_tensor, to_uint8_nhwc

    torch.manual_seed(0)
    path = tmp_path / "extractor.pt"
    torch.jit.script(_TinyExtractor()).save(str(path))
    real = tmp_path / "real.npz"
    np.savez(real, arr_0=to_uint8_nhwc(load_digits_tensor()[0][:300]))
    metrics = json.loads(run_dkdm("eval", "--samples", str(real), "--inception", str(path)).stdout)
    assert 0 <= metrics["inception_fid"] < metrics["digits_fd"] + 50
    (tmp_path / "junk.pt").write_text("junk")
    assert_one_line_error(
        run_dkdm("eval", "--samples", str(real), "--inception", str(tmp_path / "junk.pt"), check=False),
        "not a TorchScript archive",
    )


DEVICE_COMMANDS = [
    ["teacher", "train", "--steps", "1"],
    ["distill", "--steps", "1"],
    ["sample", "--model", "assets/teachers/digits", "--num", "2", "--out", "x.npz"],
    ["eval", "--model", "assets/teachers/digits", "--num", "2"],
    ["serve", "sampling"],  # checked before Redis or Ray is looked for
    ["up", "--data", "data"],  # checked before anything starts
]


@pytest.mark.parametrize("cmd", DEVICE_COMMANDS, ids=lambda c: " ".join(c[:2]))
@pytest.mark.parametrize(("device", "message"), [("gpu", "auto, cpu, cuda, cuda:N"), ("cuda:7", "cuda:7")])
def test_every_command_takes_a_device_and_refuses_bad_ones_in_one_line(
    cmd: list[str], device: str, message: str, tmp_path: Path
) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    args = [str(tmp_path / a) if a in ("x.npz", "data") else a for a in cmd]
    if cmd[0] in ("teacher", "distill"):
        args += ["--out", str(tmp_path / "out")]
    assert_one_line_error(run_dkdm(*args, "--device", device, check=False), message)


def test_sample_loads_the_model_onto_the_device_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "s.npz"
    run_dkdm(
        "sample",
        "--model",
        "assets/teachers/digits",
        "--num",
        "3",
        "--steps",
        "2",
        "--out",
        str(out),
        "--device",
        "cpu",
    )
    assert np.load(out)["arr_0"].shape == (3, 8, 8, 1)


def test_a_corrupt_weights_file_is_one_line_naming_it(tiny_teacher: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_teacher, model, ignore=shutil.ignore_patterns("step_*", "samples*"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # a copy cut short
    proc = run_dkdm("sample", "--model", str(model), "--num", "2", "--out", str(tmp_path / "s.npz"), check=False)
    assert_one_line_error(proc, str(weights), "not a readable safetensors file")


def test_nul_bytes_in_paths_are_one_line_naming_the_field(tmp_path: Path) -> None:
    proc = run_dkdm("distill", "--set", "teacher=assets/teachers/digits\x00", "--out", str(tmp_path), check=False)
    assert_one_line_error(proc, "--set teacher", "special characters are not allowed")
    proc = run_dkdm("distill", "--set", 'teacher="assets\\0x"', "--out", str(tmp_path), check=False)
    assert_one_line_error(proc, "teacher", "control characters")  # a YAML escape that reaches the spec
    proc = run_dkdm("distill", "--out", "runs/a\x00b", check=False)
    assert_one_line_error(proc, "out", "control characters")


def test_an_unreachable_redis_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.jobs.client import get_redis_settings
    from tests.services.conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    monkeypatch.setenv("DKDM_REDIS_URL", url)
    monkeypatch.setenv("DKDM_REDIS_RIDE_OUT_S", "0.5")  # how long a restart is waited for; nothing restarts here
    get_redis_settings.cache_clear()  # settings are read once per process
    try:
        proc = run_dkdm("serve", "sampling", check=False)
    finally:
        get_redis_settings.cache_clear()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.strip().splitlines() if x.startswith("dkdm:")]
    assert line.startswith(f"dkdm: error: redis at {url}: no answer for 0.5 s"), proc.stderr


def test_ray_and_redis_failures_inside_ray_errors_are_one_line() -> None:
    """The CLI's mapping, on the exceptions Ray really raises (a task error carrying its cause, a Ray
    Train worker-group failure): the service is named and the remote traceback is not printed."""
    import ray.exceptions
    import redis
    from ray.train import WorkerGroupError

    from services.cli import _error_line

    refused = redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    task_error = ray.exceptions.RayTaskError("step", "Traceback (most recent call last):\n ...", refused)
    assert _error_line(task_error.as_instanceof_cause()) == (f"Redis failed: {refused}", 1)
    assert _error_line(WorkerGroupError("rank 0 failed", {0: refused})) == (f"Redis failed: {refused}", 1)
    assert _error_line(WorkerGroupError("rank 1 failed", {1: RuntimeError("out of\nmemory")})) == (
        "Ray failed: out of memory",
        1,
    )
    user = ray.exceptions.RayTaskError("plan", "tb", ValueError("pool.chain_steps exceeds T")).as_instanceof_cause()
    assert _error_line(user) == ("pool.chain_steps exceeds T", 2)
    assert _error_line(RuntimeError("a bug")) is None  # bugs keep their traceback
