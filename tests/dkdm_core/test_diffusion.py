"""The diffusion maths against diffusers' schedulers, an independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dkdm_core.diffusion import (
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    make_diffusion,
    normal_kl,
    space_timesteps,
)

DIFFUSERS_SCHEDULE = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


def in_float64(sched):
    """Recompute a scheduler's tables in float64 from its own betas.

    diffusers derives per-step betas as 1 - ᾱ_t / ᾱ_{t-1} in float32, which loses ~3 digits at
    small t where β ~ 1e-4; comparing in float64 leaves only the maths to disagree.
    """
    sched.betas = sched.betas.double()
    sched.alphas = 1.0 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, dim=0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


def ddpm_scheduler(schedule: str, T: int = 1000) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=DIFFUSERS_SCHEDULE[schedule],
        beta_start=1e-4 * 1000 / T,
        beta_end=0.02 * 1000 / T,
        variance_type="learned_range",
        clip_sample=True,
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_betas_match_diffusers(schedule: str) -> None:
    ours = get_named_beta_schedule(schedule, 1000)
    theirs = ddpm_scheduler(schedule).betas.double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_sample_matches_add_noise(schedule: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 1, 8, 8, generator=gen), torch.randn(8, 1, 8, 8, generator=gen)
    t = torch.randint(0, 1000, (8,), generator=gen)
    ours = make_diffusion(schedule, 1000).q_sample(x0, t, noise)
    theirs = ddpm_scheduler(schedule).add_noise(x0, noise, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def _ddpm_steps_agree(schedule: str, kept: list[int]) -> None:
    """Our respaced ancestral step against DDPMScheduler.step with the same timesteps and noise."""
    ours = make_diffusion(schedule, 1000, learn_sigma=True, respacing=kept)
    sched = in_float64(ddpm_scheduler(schedule))
    sched.set_timesteps(timesteps=sorted(kept, reverse=True))
    gen = torch.Generator().manual_seed(1)
    shape = (4, 1, 8, 8)
    for index in range(len(kept)):
        t_orig = int(ours.timestep_map[index])
        x_t = torch.randn(shape, generator=gen, dtype=torch.float64)
        eps = torch.randn(shape, generator=gen, dtype=torch.float64)
        v = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
        out = torch.cat([eps, v], 1)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
        t = torch.full((4,), index, dtype=torch.long)
        mine = ours.p_sample_step(out, x_t, t, noise)
        theirs = sched.step(out, t_orig, x_t, generator=torch.Generator().manual_seed(index)).prev_sample
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6, msg=f"step at t={t_orig}")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_learned_range_step_matches_ddpm_scheduler_full_chain(schedule: str) -> None:
    _ddpm_steps_agree(schedule, [0, 1, 2, 3, 500, 998, 999] if schedule == "linear" else list(range(1000)))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_learned_range_step_matches_ddpm_scheduler_respaced(schedule: str) -> None:
    _ddpm_steps_agree(schedule, space_timesteps(1000, "50"))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_step_matches_ddim_scheduler(schedule: str) -> None:
    kept = space_timesteps(1000, "ddim50")
    ours = make_diffusion(schedule, 1000, learn_sigma=True, respacing=kept)
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule=DIFFUSERS_SCHEDULE[schedule],
        clip_sample=True,
        set_alpha_to_one=True,
        timestep_spacing="leading",
    )
    in_float64(sched)
    sched.set_timesteps(50)
    assert sorted(sched.timesteps.tolist()) == kept
    gen = torch.Generator().manual_seed(2)
    for index in range(50):
        t_orig = int(ours.timestep_map[index])
        x_t = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
        eps = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
        out = torch.cat([eps, torch.zeros_like(eps)], 1)
        t = torch.full((4,), index, dtype=torch.long)
        mine = ours.ddim_step(out, x_t, t)
        theirs = sched.step(eps, t_orig, x_t, eta=0.0, use_clipped_model_output=True).prev_sample
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6, msg=f"DDIM step at t={t_orig}")


def test_space_timesteps_iddpm_and_ddim() -> None:
    kept = space_timesteps(1000, "50")
    assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, "10,20")) == 30
    with pytest.raises(ValueError):
        space_timesteps(100, "200")


def test_respacing_keeps_alphas_cumprod() -> None:
    base = make_diffusion("cosine", 1000)
    kept = space_timesteps(1000, "25")
    spaced = make_diffusion("cosine", 1000, respacing=kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-9)
    assert spaced.timestep_map.tolist() == kept


def test_posterior_matches_eqs_6_and_7() -> None:
    d = make_diffusion("linear", 1000)
    gen = torch.Generator().manual_seed(3)
    x0, xt = torch.randn(3, 1, 4, 4, generator=gen), torch.randn(3, 1, 4, 4, generator=gen)
    t = torch.tensor([1, 10, 999])
    mean, log_var = d.q_posterior_mean_variance(x0, xt, t)
    ab, ab_prev, beta = d.alphas_cumprod, d.alphas_cumprod_prev, d.betas
    for i, ti in enumerate(t.tolist()):
        coef0 = math.sqrt(ab_prev[ti]) * beta[ti] / (1 - ab[ti])
        coeft = math.sqrt(1 - beta[ti]) * (1 - ab_prev[ti]) / (1 - ab[ti])
        torch.testing.assert_close(mean[i], coef0 * x0[i] + coeft * xt[i])
        assert math.isclose(
            float(log_var[i].flatten()[0]), math.log((1 - ab_prev[ti]) / (1 - ab[ti]) * beta[ti]), rel_tol=1e-5
        )


def test_eps_mean_equals_eq_10_when_unclipped() -> None:
    d = make_diffusion("cosine", 1000)
    gen = torch.Generator().manual_seed(4)
    xt, eps = torch.randn(5, 1, 8, 8, generator=gen), torch.randn(5, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 3, 100, 500, 900])
    step = d.p_mean_variance(torch.cat([eps, torch.zeros_like(eps)], 1), xt, t, clip_denoised=False)
    beta = torch.tensor(d.betas)[t].float().view(-1, 1, 1, 1)
    ab = torch.tensor(d.alphas_cumprod)[t].float().view(-1, 1, 1, 1)
    expected = (xt - beta / torch.sqrt(1 - ab) * eps) / torch.sqrt(1 - beta)
    torch.testing.assert_close(step.mean, expected, rtol=1e-4, atol=1e-5)


def test_learned_variance_interpolates_between_beta_and_beta_tilde() -> None:
    d = make_diffusion("linear", 1000)
    t = torch.tensor([500])
    x = torch.zeros(1, 1, 2, 2)
    hi = d.p_mean_variance(torch.cat([x, torch.ones_like(x)], 1), x, t).log_variance
    lo = d.p_mean_variance(torch.cat([x, -torch.ones_like(x)], 1), x, t).log_variance
    assert torch.allclose(hi, torch.tensor(math.log(d.betas[500])).float())
    assert torch.allclose(lo, torch.tensor(math.log(d.posterior_variance[500])).float())


def test_normal_kl_is_zero_for_equal_and_positive_otherwise() -> None:
    m, lv = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(10), atol=1e-6, rtol=0)
    assert (normal_kl(m, lv, m + 0.1, lv - 0.2) > 0).all()  # differing means and variances


def test_discretized_likelihood_sums_to_one_over_bins() -> None:
    bins = torch.linspace(-1, 1, 256)
    logp = discretized_gaussian_log_likelihood(bins, torch.zeros(256), torch.full((256,), math.log(0.3)))
    assert abs(float(logp.exp().sum()) - 1.0) < 1e-3


def test_bad_output_channels_is_a_clear_error() -> None:
    d = make_diffusion("cosine", 10)
    with pytest.raises(ValueError, match="expected 2"):
        d.p_mean_variance(torch.zeros(1, 3, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([1]))
