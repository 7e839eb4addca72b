"""The training step objects: Algorithm 1's bookkeeping and exact resumption."""

from __future__ import annotations

import copy

import torch

from dkdm_core.diffusion import make_diffusion
from dkdm_core.models import build_model
from dkdm_core.pool import NoisePool, pool_size
from dkdm_core.spec import OptimSpec
from dkdm_core.training import DataTrainer, Distiller

OPTIM = OptimSpec(batch_size=8, lr=1e-3, warmup_steps=0)


def make_distiller(student=None, seed: int = 0, strategy="dynamic") -> Distiller:
    torch.manual_seed(123)
    teacher = build_model("mlp-small", 2, 0, True)
    chain = make_diffusion("cosine", 1000, respacing=10)
    size = pool_size(strategy, OPTIM.batch_size, chain.num_timesteps, 0.5)
    pool = NoisePool(strategy, size, (2,), chain.num_timesteps, torch.Generator().manual_seed(seed))
    student = student if student is not None else build_model("mlp-small", 2, 0, True)
    return Distiller(student, teacher, chain, pool, OPTIM, torch.Generator().manual_seed(seed + 1))


def test_student_identical_to_teacher_has_zero_loss() -> None:
    d = make_distiller()
    d.model.load_state_dict(d.teacher.state_dict())
    d.init_pool(16)
    assert d.step()["loss"] < 1e-10


def test_each_step_costs_one_teacher_call_per_sample_and_keeps_the_pool() -> None:
    d = make_distiller()
    spent = d.init_pool(16)
    assert d.teacher_calls == spent > 0
    for _ in range(30):
        d.step()
    assert d.teacher_calls == spent + 30 * OPTIM.batch_size
    assert d.pool.size == 40 and int(d.pool.t.max()) <= 9 and int(d.pool.t.min()) >= 0
    assert not d.pool.leased.any()


def test_resume_from_state_dict_continues_exactly() -> None:
    a = make_distiller()
    a.init_pool(16)
    for _ in range(5):
        a.step()
    state = copy.deepcopy(a.state_dict())
    expected = [a.step()["loss"] for _ in range(5)]
    b = make_distiller(seed=7)
    b.load_state_dict(state)
    assert [b.step()["loss"] for _ in range(5)] == expected
    assert b.steps_done == 10


def test_data_trainer_reduces_the_hybrid_loss_on_toy_data() -> None:
    torch.manual_seed(0)
    from dkdm_core.data import toy_2d

    gen = torch.Generator().manual_seed(0)
    trainer = DataTrainer(
        build_model("mlp-small", 2, 0, True),
        make_diffusion("cosine", 100),
        toy_2d(2048, gen),
        OptimSpec(batch_size=256, lr=2e-3, warmup_steps=0),
        gen,
    )
    losses = [trainer.step()["mse"] for _ in range(300)]
    assert sum(losses[-30:]) / 30 < 0.6 * sum(losses[:30]) / 30


def test_mix_real_replaces_the_stated_share_by_real_samples() -> None:
    from dkdm_core.data import mix_real

    synthetic, real = torch.zeros(100, 1, 2, 2), torch.ones(30, 1, 2, 2)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(mix_real(synthetic, real, 0.0, gen), synthetic)
    mixed = mix_real(synthetic, real, 0.2, gen)
    assert mixed.shape == synthetic.shape and int(mixed[:, 0, 0, 0].sum()) == 20
    assert int(mix_real(synthetic, real, 1.0, gen)[:, 0, 0, 0].sum()) == 100  # more than the real set: resampled


def test_ema_warms_up_and_its_count_is_checkpointed() -> None:
    from dkdm_core.training import EMA

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, 0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # update 0: decay min(0.999, 1/10) = 0.1, so 90% of the new weights
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), 0.9))
    for _ in range(199):
        ema.update(model)
    # After 200 updates the initial weights' share is prod (1+n)/(10+n) ~ 1e-13, not 0.999^200 = 82%.
    torch.testing.assert_close(ema.model.weight, torch.ones(1, 2))
    ema.updates = 100_000
    assert ema.current_decay() == 0.999
    again = EMA(model, 0.999)
    again.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert again.updates == 100_000
    legacy = EMA(model, 0.999)  # a state saved before the warm-up: continue at the full decay
    legacy.load_state_dict(ema.model.state_dict())
    assert legacy.current_decay() == 0.999
