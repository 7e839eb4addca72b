"""Every DDPM/DDIM scheduler config against diffusers' DDPMScheduler and DDIMScheduler, step by step.

The step maths is compared in float64 on the same β's (diffusers' float32 β's are replaced by ours,
so only the maths can disagree); the β schedules themselves are compared at float32 precision.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dkdm_core.diffusion import (
    GaussianDiffusion,
    PredictionType,
    Schedule,
    Thresholding,
    VarianceType,
    beta_schedule,
    make_diffusion,
    space_timesteps,
)
from tests.dkdm_core.test_diffusion import in_float64

T = 100
SHAPE = (3, 2, 4, 4)
VARIANCES: list[VarianceType] = ["fixed_small", "fixed_large", "learned", "learned_range"]
PREDICTIONS: list[PredictionType] = ["epsilon", "v_prediction", "sample"]
SCHEDULES: list[Schedule] = ["linear", "scaled_linear", "cosine", "trained"]
TRAINED = np.linspace(1e-3, 0.15, T) ** 1.5  # any positive β's, as a trained_betas list would hold
# (diffusers scheduler kwargs, ours) per schedule: non-default endpoints so the endpoints are really read.
SCHEDULE_ARGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": (
        {"beta_schedule": "linear", "beta_start": 2e-4, "beta_end": 0.05},
        {"beta_start": 2e-4, "beta_end": 0.05},
    ),
    "scaled_linear": (
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.12},
        {"beta_start": 0.00085, "beta_end": 0.12},
    ),
    "cosine": ({"beta_schedule": "squaredcos_cap_v2"}, {}),
    "trained": ({"trained_betas": TRAINED.tolist()}, {"trained_betas": TRAINED.tolist()}),
}
# (diffusers kwargs, ours): clipping and thresholding as diffusers applies them.
CLIPS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "clip1": ({"clip_sample": True}, {}),
    "clip2": ({"clip_sample": True, "clip_sample_range": 2.0}, {"clip_sample_range": 2.0}),
    "none": ({"clip_sample": False}, {"clip_sample_range": None}),
    "threshold": (
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        {"thresholding": Thresholding(0.9, 1.5)},
    ),
}


def ours(schedule: str, respacing: list[int] | None = None, **options: Any) -> GaussianDiffusion:
    return make_diffusion(schedule, T, respacing=respacing, **SCHEDULE_ARGS[schedule][1], **options)  # type: ignore[arg-type]


def on_our_betas(sched: Any, schedule: str) -> Any:
    """diffusers' tables recomputed in float64 from our β's for ``schedule`` (all T of them)."""
    sched.betas = torch.from_numpy(beta_schedule(schedule, T, **SCHEDULE_ARGS[schedule][1]))  # type: ignore[arg-type]
    return in_float64(sched)


def model_output(variance: str, gen: torch.Generator) -> torch.Tensor:
    pred = torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 1.5  # wide enough to be clipped
    if variance == "learned_range":
        return torch.cat([pred, torch.rand(SHAPE, generator=gen, dtype=torch.float64) * 2 - 1], 1)
    if variance == "learned":  # σ² itself; positive, around the schedule's β's
        return torch.cat([pred, torch.rand(SHAPE, generator=gen, dtype=torch.float64) * 0.05 + 1e-4], 1)
    return pred


def ddpm_steps_agree(diffusion: GaussianDiffusion, sched: DDPMScheduler, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for index in reversed(range(diffusion.num_timesteps)):
        t_orig = int(diffusion.timestep_map[index])
        x_t = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        out = model_output(diffusion.variance_type, gen)
        # diffusers draws its noise with randn(shape, generator) on the CPU: the same noise as ours.
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        t = torch.full((SHAPE[0],), index, dtype=torch.long)
        mine = diffusion.p_sample_step(out, x_t, t, noise)
        step = sched.step(out, t_orig, x_t, generator=torch.Generator().manual_seed(index))
        torch.testing.assert_close(mine, step.prev_sample, rtol=1e-10, atol=1e-10, msg=f"step at t={t_orig}")
        got = diffusion.p_mean_variance(out, x_t, t).pred_xstart
        torch.testing.assert_close(got, step.pred_original_sample, rtol=1e-10, atol=1e-10)


def test_schedules_match_diffusers_for_any_num_train_timesteps() -> None:
    for schedule, steps in itertools.product(["linear", "scaled_linear", "cosine"], [10, 100, 1000, 4000]):
        args, mine = SCHEDULE_ARGS[schedule]
        theirs = DDPMScheduler(num_train_timesteps=steps, **args).betas.double().numpy()
        np.testing.assert_allclose(beta_schedule(schedule, steps, **mine), theirs, rtol=2e-6, atol=1e-9)  # type: ignore[arg-type]
    theirs = DDPMScheduler(num_train_timesteps=T, trained_betas=TRAINED.tolist()).betas.double().numpy()
    np.testing.assert_allclose(beta_schedule("trained", T, trained_betas=TRAINED), theirs, rtol=1e-7)


def test_default_linear_and_scaled_linear_rescale_with_T() -> None:
    # The project's linear schedule spans Ho et al.'s range at any T (β_T = 0.02 · 1000 / T).
    assert beta_schedule("linear", 500)[-1] == pytest.approx(0.04)
    assert beta_schedule("scaled_linear", 1000)[0] == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="trained_betas has 3 values"):
        beta_schedule("trained", 4, trained_betas=[0.1, 0.2, 0.3])


@pytest.mark.parametrize(
    ("variance", "prediction", "schedule"), list(itertools.product(VARIANCES, PREDICTIONS, SCHEDULES))
)
def test_ddpm_step_matches_ddpm_scheduler(variance: VarianceType, prediction: PredictionType, schedule: str) -> None:
    args = {**SCHEDULE_ARGS[schedule][0], "variance_type": variance, "prediction_type": prediction}
    full = ours(schedule, variance_type=variance, prediction_type=prediction)
    ddpm_steps_agree(full, on_our_betas(DDPMScheduler(num_train_timesteps=T, **args), schedule), seed=1)
    # A respaced chain (the pool's chain_steps) against diffusers with the same custom timesteps.
    kept = space_timesteps(T, "10")
    chain = ours(schedule, respacing=kept, variance_type=variance, prediction_type=prediction)
    sched = on_our_betas(DDPMScheduler(num_train_timesteps=T, **args), schedule)
    sched.set_timesteps(timesteps=sorted(kept, reverse=True))
    ddpm_steps_agree(chain, sched, seed=2)


@pytest.mark.parametrize(("prediction", "clip"), list(itertools.product(PREDICTIONS, CLIPS)))
def test_clipping_and_thresholding_match_ddpm_scheduler(prediction: PredictionType, clip: str) -> None:
    theirs, mine = CLIPS[clip]
    diffusion = ours("linear", variance_type="fixed_large", prediction_type=prediction, **mine)
    args = {**SCHEDULE_ARGS["linear"][0], **theirs, "variance_type": "fixed_large", "prediction_type": prediction}
    sched = DDPMScheduler(num_train_timesteps=T, **args)
    ddpm_steps_agree(diffusion, on_our_betas(sched, "linear"), seed=3)


@pytest.mark.parametrize(
    ("prediction", "schedule", "clip", "eta"),
    list(itertools.product(PREDICTIONS, SCHEDULES, ["clip1", "none", "threshold"], [0.0, 0.5])),
)
def test_ddim_step_matches_ddim_scheduler(prediction: PredictionType, schedule: str, clip: str, eta: float) -> None:
    theirs, mine = CLIPS[clip]
    kept = space_timesteps(T, "ddim10")
    diffusion = ours(schedule, respacing=kept, learn_sigma=False, prediction_type=prediction, **mine)
    args = {**SCHEDULE_ARGS[schedule][0], **theirs}
    sched = on_our_betas(DDIMScheduler(num_train_timesteps=T, prediction_type=prediction, **args), schedule)
    sched.set_timesteps(10)
    assert sorted(sched.timesteps.tolist()) == kept
    gen = torch.Generator().manual_seed(4)
    for index in reversed(range(10)):
        x_t = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        out = torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 1.5
        noise = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        t = torch.full((SHAPE[0],), index, dtype=torch.long)
        mine_x = diffusion.ddim_step(out, x_t, t, noise, eta=eta)
        step = sched.step(out, kept[index], x_t, eta=eta, use_clipped_model_output=True, variance_noise=noise)
        torch.testing.assert_close(mine_x, step.prev_sample, rtol=1e-10, atol=1e-10, msg=f"t={kept[index]}")


@pytest.mark.parametrize(("variance", "prediction"), list(itertools.product(VARIANCES, PREDICTIONS)))
def test_eps_output_gives_the_same_reverse_step_in_the_students_terms(
    variance: VarianceType, prediction: PredictionType
) -> None:
    """The student's parameterisation (ε, learned-range or the same fixed variance) loses nothing."""
    teacher = ours("cosine", respacing=space_timesteps(T, "20"), variance_type=variance, prediction_type=prediction)
    student = teacher.eps_view()
    assert student.prediction_type == "epsilon"
    assert student.variance_type == ("learned_range" if variance.startswith("learned") else variance)
    gen = torch.Generator().manual_seed(5)
    x_t = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    out = model_output(variance, gen)
    for index in range(teacher.num_timesteps):
        t = torch.full((SHAPE[0],), index, dtype=torch.long)
        converted = teacher.eps_output(out, x_t, t)
        assert converted.shape[1] == SHAPE[1] * student.out_channels_factor
        for clip in (False, True):
            a = teacher.p_mean_variance(out, x_t, t, clip_denoised=clip)
            b = student.p_mean_variance(converted, x_t, t, clip_denoised=clip)
            torch.testing.assert_close(b.mean, a.mean, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(b.log_variance, a.log_variance, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(b.pred_xstart, a.pred_xstart, rtol=1e-9, atol=1e-9)


def test_eps_teachers_are_passed_through_untouched() -> None:
    for variance in ("fixed_small", "fixed_large", "learned_range"):
        d = make_diffusion("cosine", T, variance_type=variance)
        assert d.eps_view() is d
        out = torch.randn(2, 2 * d.out_channels_factor, 4, 4)
        assert d.eps_output(out, out[:, :2], torch.zeros(2, dtype=torch.long)) is out


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_training_target_matches_diffusers(prediction: PredictionType) -> None:
    d = ours("linear", prediction_type=prediction)
    sched = on_our_betas(DDPMScheduler(num_train_timesteps=T, **SCHEDULE_ARGS["linear"][0]), "linear")
    gen = torch.Generator().manual_seed(6)
    x0, noise = (torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(2))
    t = torch.randint(0, T, (SHAPE[0],), generator=gen)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": sched.get_velocity(x0, noise, t)}[prediction]
    torch.testing.assert_close(d.training_target(x0, t, noise), expected, rtol=1e-10, atol=1e-10)


def test_make_diffusion_defaults_are_unchanged() -> None:
    """Existing callers (schedule, T, learn_sigma, respacing) get improved-diffusion's diffusion."""
    d = make_diffusion("cosine", 1000, True, respacing="50")
    assert (d.variance_type, d.prediction_type, d.clip_sample_range, d.thresholding) == (
        "learned_range",
        "epsilon",
        1.0,
        None,
    )
    assert make_diffusion("linear", 1000, False).variance_type == "fixed_small"
