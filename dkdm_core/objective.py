"""Training objectives: L_hybrid (Eq. 13) for data-based training, L*_DKDM (Eqs. 19-21) for distillation.

Both weight the variational term as improved-diffusion does: ``λ · T · L_t`` with a single sampled
``t``, i.e. λ times an unbiased estimate of the full bound ``Σ_t L_t``. With λ = 0.001 and T = 1000
this is improved-diffusion's ``mse + vb`` (its RESCALED_MSE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from dkdm_core.diffusion import GaussianDiffusion, mean_flat, normal_kl

ObjectiveMode = Literal["dkdm", "simple"]
# What a job asks for: "auto" resolves against the teacher (resolve_objective).
ObjectiveChoice = Literal["auto", "dkdm", "simple"]


def resolve_objective(requested: ObjectiveChoice, teacher_learns_variance: bool) -> ObjectiveMode:
    """The objective a job trains with, decided once from its spec and its teacher's card.

    auto: the full L*_DKDM (Eq. 19) when the teacher learns its variance; L*_simple alone otherwise,
    since a fixed-variance teacher's student keeps that fixed variance and its L*_vlb is then zero
    whenever ε matches (diffusion.py). Asking for "dkdm" from a fixed-variance teacher is an error.
    """
    if requested == "auto":
        return "dkdm" if teacher_learns_variance else "simple"
    if requested == "dkdm" and not teacher_learns_variance:
        raise ValueError("objective 'dkdm' needs a teacher with learned variance; use objective: auto or simple")
    return requested


@dataclass(frozen=True)
class LossTerms:
    """A scalar loss to minimise and its per-sample parts, for logging and histograms."""

    loss: torch.Tensor  # ()
    mse: torch.Tensor  # (B,)
    vlb: torch.Tensor  # (B,) bits/dim; zeros when the variance is not learned

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The logged means, still on the device: reading them is left to the steps that log."""
        return {"loss": self.loss.detach(), "mse": self.mse.detach().mean(), "vlb": self.vlb.detach().mean()}


def _freeze_mean(diffusion: GaussianDiffusion, model_output: torch.Tensor, channels: int) -> torch.Tensor:
    """Stop the gradient through ε so the variational term trains only the variance output v."""
    eps, v = diffusion.split_output(model_output, channels)
    assert v is not None  # callers check learn_sigma first
    return torch.cat([eps.detach(), v], dim=1)


def hybrid_loss(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    vlb_weight: float = 0.001,
) -> LossTerms:
    """Eq. (13): L_simple + λ L_vlb with the data's true noise and posterior; ε-only models get L_simple."""
    channels = x_t.shape[1]
    # 1. Eq. (11): L_simple, in the network's parameterisation (ε, or v / x_0 for such models).
    pred, v = diffusion.split_output(model_output, channels)
    mse = mean_flat((diffusion.training_target(x_start, t, noise) - pred) ** 2)
    if v is None:
        return LossTerms(loss=mse.mean(), mse=mse, vlb=torch.zeros_like(mse))
    # 2. Eq. (9) with a stop-gradient on the mean: only Σ_θ learns from it.
    step = diffusion.p_mean_variance(_freeze_mean(diffusion, model_output, channels), x_t, t, clip_denoised=False)
    vlb = diffusion.vb_terms_bpd(step, x_start, x_t, t)
    # 3. Eq. (13).
    loss = (mse + vlb_weight * diffusion.num_timesteps * vlb).mean()
    return LossTerms(loss=loss, mse=mse, vlb=vlb)


def dkdm_loss(
    diffusion: GaussianDiffusion,
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    vlb_weight: float = 0.001,
    mode: ObjectiveMode = "dkdm",
) -> LossTerms:
    """Eqs. (19)-(21): match the teacher's ε and its Gaussian reverse step on the teacher's own x̂_t.

    ``mode="simple"`` keeps only L*_simple: the setting for ε-only teachers (no variance to match)
    and the paper's latent-space experiments. ``diffusion`` is the chain the pool moves along.
    """
    channels = x_t.shape[1]
    teacher_output = teacher_output.detach()
    eps_s, v_s = diffusion.split_output(student_output, channels)
    eps_t, v_t = diffusion.split_output(teacher_output, channels)
    # 1. Eq. (20): L*_simple, the teacher's ε in place of the true noise.
    mse = mean_flat((eps_t - eps_s) ** 2)
    if mode == "simple" or v_s is None or v_t is None:
        return LossTerms(loss=mse.mean(), mse=mse, vlb=torch.zeros_like(mse))
    # 2. Eq. (21): KL(p_T(x̂_{t-1} | x̂_t) ‖ p_S(x̂_{t-1} | x̂_t)), student mean frozen, bits/dim.
    with torch.no_grad():
        teacher_step = diffusion.p_mean_variance(teacher_output, x_t, t, clip_denoised=False)
    student_step = diffusion.p_mean_variance(
        _freeze_mean(diffusion, student_output, channels), x_t, t, clip_denoised=False
    )
    kl = normal_kl(teacher_step.mean, teacher_step.log_variance, student_step.mean, student_step.log_variance)
    vlb = mean_flat(kl) / math.log(2.0)
    # 3. Eq. (19).
    loss = (mse + vlb_weight * diffusion.num_timesteps * vlb).mean()
    return LossTerms(loss=loss, mse=mse, vlb=vlb)
