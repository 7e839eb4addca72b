"""The maths of O2MKD's timestep routing, BOOT's bootstrap targets, and the model cards carrying them."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from pydantic import ValidationError

from dkdm_core.checkpoint import ROUTER_ARCH, ModelCard, load_model, save_model
from dkdm_core.diffusion import make_diffusion
from dkdm_core.methods.boot import BootDistiller, alpha_sigma, bootstrap_target, boundary_signal, noisy_point
from dkdm_core.methods.o2mkd import TimestepRouter, equal_edges, interval_edges
from dkdm_core.models import build_model
from dkdm_core.sampling import draw
from dkdm_core.spec import DiffusionSpec, DistillSpec, OptimSpec
from dkdm_core.students import build_student
from dkdm_core.training import Trainer

# O2MKD -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("students", "boundaries"), [(1, None), (2, None), (3, None), (4, None), (7, None), (3, [10, 900])]
)
def test_routing_gives_every_timestep_exactly_one_owner_in_contiguous_intervals(
    students: int, boundaries: list[int] | None
) -> None:
    t_max = 1000
    edges = interval_edges(t_max, students, boundaries)
    router = TimestepRouter([torch.nn.Identity() for _ in range(students)], edges)
    owner = router.owner(torch.arange(t_max))
    # One owner per t, owners in order (contiguous intervals), every student owns its whole interval.
    assert owner.shape == (t_max,)
    assert bool((owner[1:] >= owner[:-1]).all())
    counts = torch.bincount(owner, minlength=students)
    assert counts.tolist() == [b - a for a, b in itertools.pairwise(edges)]
    assert int(counts.sum()) == t_max and bool((counts > 0).all())
    for i in range(students):
        assert bool((owner[edges[i] : edges[i + 1]] == i).all())


def test_equal_edges_split_evenly_and_bad_boundaries_are_refused() -> None:
    assert equal_edges(1000, 4) == [0, 250, 500, 750, 1000]
    assert equal_edges(10, 3) == [0, 3, 7, 10]
    with pytest.raises(ValueError, match="cut points"):
        interval_edges(1000, 3, [500])
    with pytest.raises(ValueError, match="increase strictly"):
        interval_edges(1000, 3, [600, 600])
    with pytest.raises(ValueError, match="increase strictly"):
        interval_edges(1000, 2, [1000])


@pytest.mark.parametrize(
    ("o2mkd", "field"),
    [
        ({"students": 3, "boundaries": [500]}, "boundaries"),
        ({"students": 3, "boundaries": [600, 300]}, "increasing"),
        ({"students": 2, "archs": ["unet-tiny"]}, "archs"),
        ({"students": 2, "archs": ["unet-tiny", "nope"]}, "unknown model"),
    ],
)
def test_o2mkd_spec_errors_name_the_field(o2mkd: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        DistillSpec.model_validate({"method": "o2mkd", "o2mkd": o2mkd})


def test_router_sends_each_sample_to_its_owner_and_trains_every_student() -> None:
    torch.manual_seed(0)
    parts = [build_model(a, 1, 8, True) for a in ("unet-tiny", "vit-tiny", "unet-tiny")]
    router = TimestepRouter(parts, [0, 300, 600, 1000])
    x = torch.randn(6, 1, 8, 8)
    t = torch.tensor([0, 299, 300, 599, 600, 999])
    out = router(x, t)
    for i in range(6):
        owner = i // 2
        expect = parts[owner](x[i : i + 1], t[i : i + 1])[0]
        torch.testing.assert_close(out[i], expect, rtol=1e-5, atol=1e-5)
    # A batch where the last student owns nothing still keeps its parameters in the graph.
    router(x[:4], t[:4]).square().mean().backward()
    assert all(p.grad is not None for p in router.parameters())
    assert all(float(p.grad.abs().sum()) == 0 for p in parts[2].parameters())


def test_router_clips_each_student_on_its_own() -> None:
    router = TimestepRouter([build_model("mlp-small", 2, 0, True) for _ in range(2)], [0, 500, 1000])
    trainer = Trainer(router, OptimSpec(grad_clip=1.0))
    assert len(trainer.clip_groups) == 2
    assert sum(len(g) for g in trainer.clip_groups) == len(list(router.parameters()))


def test_router_card_round_trips_through_a_model_folder(tmp_path) -> None:
    teacher = ModelCard(arch="unet-tiny", channels=1, image_size=8, learn_sigma=True, diffusion=DiffusionSpec())
    spec = DistillSpec.model_validate(
        {
            "method": "o2mkd",
            "o2mkd": {"students": 3, "boundaries": [100, 400], "archs": ["unet-tiny", "vit-tiny", "unet-tiny"]},
        }
    )
    model, card = build_student(spec, teacher)
    assert card.arch == ROUTER_ARCH and card.router is not None
    assert card.router.edges == [0, 100, 400, 1000]
    save_model(tmp_path / "m", model, card)
    loaded, loaded_card = load_model(tmp_path / "m")
    assert isinstance(loaded, TimestepRouter) and loaded_card.router == card.router
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 150, 500, 999])
    torch.testing.assert_close(loaded(x, t), model.eval()(x, t))
    # Samples through the router: a full sampling run switches student by timestep.
    assert draw(loaded, loaded_card, 3, seed=0, steps=6).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="inside"):
        build_student(DistillSpec.model_validate({"method": "o2mkd", "o2mkd": {"boundaries": [1000]}}), teacher)


# BOOT --------------------------------------------------------------------------------------------


def _chain():
    return make_diffusion("cosine", 1000, True, respacing=10)


def _teacher():
    torch.manual_seed(1)
    return build_model("mlp-small", 2, 0, True).eval()


def test_boundary_signal_rebuilds_the_starting_noise_exactly() -> None:
    chain = _chain()
    eps = torch.randn(5, 2, dtype=torch.float64)
    top = torch.full((5,), chain.num_timesteps - 1)
    torch.testing.assert_close(noisy_point(chain, boundary_signal(chain, eps), eps, top), eps)


def test_target_at_the_boundary_is_the_teachers_prediction() -> None:
    chain, teacher = _chain(), _teacher()
    eps = torch.randn(64, 2)
    j = torch.full((64,), chain.num_timesteps - 1)
    with torch.no_grad():
        out = chain.run_model(teacher, eps, j)
        target = bootstrap_target(chain, out, boundary_signal(chain, eps), eps, j)
        # Exactly the teacher's DDIM step from ε, written as a signal...
        x_prev = chain.ddim_step(out, eps, j)
        alpha_prev = float(chain.alphas_cumprod_prev[-1]) ** 0.5
        sigma_prev = (1 - float(chain.alphas_cumprod_prev[-1])) ** 0.5
        torch.testing.assert_close(target, (x_prev - sigma_prev * eps) / alpha_prev, rtol=1e-4, atol=1e-4)
        # ...which, as ᾱ at the top of the chain is ~0, is the teacher's prediction x̂_0(ε).
        pred = chain.p_mean_variance(out, eps, j).pred_xstart
        alpha, _ = alpha_sigma(chain, j, eps)
        assert float(alpha.max()) < 1e-3
        torch.testing.assert_close(target, pred, rtol=0, atol=1e-3)


def test_bootstrap_targets_walk_the_teachers_ddim_trajectory() -> None:
    """A student equal to the teacher's trajectory in signal space is a fixed point of the targets."""
    chain, teacher = _chain(), _teacher()
    k = chain.num_timesteps
    eps = torch.randn(16, 2, dtype=torch.float64)
    teacher = teacher.double()
    with torch.no_grad():
        # The teacher's deterministic trajectory from x_{K-1} = ε, as points and as signals.
        x = {k - 1: eps}
        for j in range(k - 1, -1, -1):
            idx = torch.full((16,), j)
            x[j - 1] = chain.ddim_step(chain.run_model(teacher, x[j], idx), x[j], idx)
        signal = {k - 1: boundary_signal(chain, eps), -1: x[-1]}
        for j in range(k - 1):
            alpha, sigma = alpha_sigma(chain, torch.full((16,), j), eps)
            signal[j] = (x[j] - sigma * eps) / alpha
        for j in range(k):
            idx = torch.full((16,), j)
            torch.testing.assert_close(noisy_point(chain, signal[j], eps, idx), x[j])
            target = bootstrap_target(chain, chain.run_model(teacher, x[j], idx), signal[j], x[j], idx)
            torch.testing.assert_close(target, signal[j - 1], rtol=1e-6, atol=1e-6)


def test_boot_step_costs_one_teacher_call_per_sample_and_resumes_exactly() -> None:
    chain, teacher = _chain(), _teacher()
    optim = OptimSpec(batch_size=16, lr=1e-3, warmup_steps=0)

    def make() -> BootDistiller:
        torch.manual_seed(0)
        student = build_model("mlp-small", 2, 0, False)
        return BootDistiller(student, teacher, chain, (2,), optim, torch.Generator().manual_seed(0), 0.25)

    a = make()
    _eps, j, boundary = a.draw(16)
    assert int(boundary.sum()) == 4 and bool((j[boundary] == chain.num_timesteps - 1).all())
    assert bool((j[~boundary] < chain.num_timesteps - 1).all())
    logs = [a.step() for _ in range(3)]
    assert a.teacher_calls == 3 * 16
    assert {"boundary", "bootstrap", "loss"} <= logs[-1].keys()
    state = copy.deepcopy(a.state_dict())
    after = [a.step()["loss"] for _ in range(3)]
    b = make()
    b.load_state_dict(state)
    assert [b.step()["loss"] for _ in range(3)] == after


def test_every_bundled_config_is_a_valid_spec() -> None:
    from pathlib import Path

    from dkdm_core.spec import TeacherTrainSpec, load_yaml

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(configs) >= 6
    for path in configs:
        data = load_yaml(path)
        (TeacherTrainSpec if "data" in data else DistillSpec).model_validate(data)
