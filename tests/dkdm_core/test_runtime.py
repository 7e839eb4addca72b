"""The device-speed training step: no host reads between log steps, precisions and compilation."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dkdm_core.diffusion import make_diffusion
from dkdm_core.models import build_model
from dkdm_core.pool import NoisePool, pool_size
from dkdm_core.runtime import Runtime, resolve_runtime
from dkdm_core.spec import OptimSpec
from dkdm_core.training import Distiller, read_logs

OPTIM = OptimSpec(batch_size=8, lr=1e-3, warmup_steps=0)
PROJECT = str(Path(__file__).resolve().parents[2])
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


def make_distiller(arch: str = "mlp-small", runtime: Runtime | None = None, sync_free: bool | None = None) -> Distiller:
    torch.manual_seed(0)
    shape = (2,) if arch.startswith("mlp") else (1, 8, 8)
    teacher = build_model(arch, shape[0], 8, True)
    student = build_model(arch, shape[0], 8, True)
    chain = make_diffusion("cosine", 1000, respacing=10)
    size = pool_size("dynamic", OPTIM.batch_size, chain.num_timesteps, 0.5)
    pool = NoisePool("dynamic", size, shape, chain.num_timesteps, torch.Generator().manual_seed(0), sync_free)
    return Distiller(student, teacher, chain, pool, OPTIM, torch.Generator().manual_seed(1), runtime=runtime)


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every read of a tensor's value back to the host made by the project's own code."""
    calls: list[str] = []
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: object, _name: str = name, _original=original, **kwargs: object):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(PROJECT) and not any(part in caller for part in ("/tests/", "site-packages")):
                calls.append(f"{_name} in {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield calls


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_training_step_reads_nothing_back_to_the_host(host_reads: list[str], sync_free: bool) -> None:
    d = make_distiller(sync_free=sync_free)
    d.init_pool(16)
    host_reads.clear()  # initialisation may read (it sizes its work); steps may not
    for _ in range(6):
        logs = d.step()
    assert host_reads == []
    # The log step reads them, once, and the patch sees it (so the zero above means something).
    numbers = read_logs(logs)
    assert set(numbers) >= {"loss", "mse", "vlb", "grad_norm", "lr"} and host_reads


def test_the_sync_free_pool_keeps_the_pools_invariants() -> None:
    shape, k = (2,), 5
    pool = NoisePool("dynamic", 12, shape, k, torch.Generator().manual_seed(0), sync_free=True)
    for _ in range(40):
        lease = pool.take(4)
        assert len(set(lease.ids.tolist())) == 4
        pool.put(lease.lease_id, lease.x_t * 0.5)
        assert pool.size == 12 and int(pool.t.min()) >= 0 and int(pool.t.max()) <= k - 1
        assert not pool.leased.any()
    assert pool.finished > 0
    state = pool.state_dict()
    again = NoisePool("dynamic", 12, shape, k, torch.Generator().manual_seed(9), sync_free=True)
    again.load_state_dict(state)
    assert torch.equal(again.x, pool.x) and again.finished == pool.finished


def test_a_cpu_run_defaults_to_fp32_uncompiled_and_bad_settings_say_the_choices() -> None:
    runtime = resolve_runtime("cpu")
    assert (runtime.precision, runtime.compile) == ("fp32", "off")
    with pytest.raises(ValueError, match="auto, fp32, tf32, bf16"):
        resolve_runtime("cpu", "fp16")
    with pytest.raises(ValueError, match="auto, cpu, cuda, cuda:N"):
        resolve_runtime("tpu")


def losses(distiller: Distiller, steps: int = 5) -> list[float]:
    distiller.init_pool(64)
    return [read_logs(distiller.step())["loss"] for _ in range(steps)]


def test_bf16_steps_give_losses_close_to_fp32() -> None:
    """bf16 autocast student + bf16 teacher on the digits shape: within 5% of fp32 for a few steps."""
    fp32 = losses(make_distiller("unet-tiny"))
    bf16 = losses(make_distiller("unet-tiny", resolve_runtime("cpu", "bf16", "off")))
    assert bf16 == pytest.approx(fp32, rel=5e-2)
    assert bf16 != fp32  # it did run in another precision


@pytest.mark.slow
def test_compiled_steps_give_losses_close_to_fp32() -> None:
    """torch.compile of teacher and student (inductor; CUDA graphs need a GPU): within 1e-4."""
    eager = losses(make_distiller())
    compiled = losses(make_distiller(runtime=resolve_runtime("cpu", "fp32", "default")))
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_a_recorded_step_does_what_an_eager_step_does() -> None:
    """``compile: step`` replays ``device_step`` with the learning rate and EMA weight in tensors and
    the counters kept outside: run that path without recording (CPU) and compare with ``step``."""
    eager, split = make_distiller(sync_free=True), make_distiller(sync_free=True)
    eager.init_pool(16)
    split.init_pool(16)
    for _ in range(5):
        expected = read_logs(eager.step())
        split.prepare_recorded()
        logs = split.device_step()
        got = read_logs({**logs, **split.count_recorded()})
        split.teaching.evaluations += OPTIM.batch_size
        assert got == pytest.approx(expected, rel=1e-5)
    for a, b in zip(eager.ema.model.parameters(), split.ema.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert (split.steps_done, split.teacher_calls, split.ema.updates, split.scheduler.last_epoch) == (
        eager.steps_done,
        eager.teacher_calls,
        eager.ema.updates,
        eager.scheduler.last_epoch,
    )
    assert torch.equal(split.pool.t, eager.pool.t) and split.pool.finished == eager.pool.finished


def test_where_no_whole_step_is_recorded_step_compiles_with_cuda_graphs() -> None:
    """``compile: step`` on a step that is not recorded (here: a pool on the CPU) falls back to
    ``cudagraphs`` for the networks, not to the slower ``default``; other modes are left alone."""
    step = Runtime(device=torch.device("cpu"), precision="fp32", compile="step")
    assert step.without_step().compile == "cudagraphs"
    assert resolve_runtime("cpu", "fp32", "default").without_step().compile == "default"
    distiller = make_distiller(runtime=step)
    assert not distiller.graphed and distiller.runtime.compile == "cudagraphs"
