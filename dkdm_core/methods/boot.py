"""BOOT (Gu et al., "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping").

The student g(ε, j) reads only pure noise ε and a chain index j, and predicts the *signal* y of the
point the teacher's deterministic (DDIM) trajectory from x_{K-1} = ε reaches after its step from
index j: x_{j-1} = α_{j-1}·y + σ_{j-1}·ε, with α = sqrt(ᾱ), σ = sqrt(1 - ᾱ). At j = 0 that point is
the image, so sampling is one call: g(ε, 0).

Training bootstraps between consecutive indices with one teacher call: the student's own (stop-
gradient) signal at j + 1 rebuilds x_j = α_j·y_j + σ_j·ε, the teacher denoises it one DDIM step, and
that step, written in signal space (the Signal-ODE), is the target for g(ε, j):

    y_{j-1} = f + (σ_{j-1}·α_j) / (α_{j-1}·σ_j) · (y_j - f),    f = the teacher's x̂_0(x_j, j)

The coefficient is below 1 (the SNR grows as j falls), so the target never divides by a tiny α. At
the boundary j = K-1 the trajectory starts from ε itself: y_{K-1} = α/(1+σ)·ε (so that α·y + σ·ε = ε
exactly), and the target is the teacher's first step, essentially its prediction f(ε) since α ≈ 0.

Each error is weighted by ᾱ_{j-1}: the squared error of the trajectory *point* α_{j-1}·y, the part of
y that the next bootstrap step (and the sample) actually sees. Unweighted, the loss is dominated by
the top of the chain, where the teacher's x̂_0 from almost pure noise is clipped noise that no later
step depends on much.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dkdm_core.diffusion import GaussianDiffusion, mean_flat
from dkdm_core.objective import LossTerms
from dkdm_core.spec import OptimSpec
from dkdm_core.training import StepLogs, Trainer


def alpha_sigma(chain: GaussianDiffusion, j: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_j, σ_j) of chain index j, shaped to broadcast over ``like``."""
    return chain.gather("sqrt_alphas_cumprod", j, like), chain.gather("sqrt_one_minus_alphas_cumprod", j, like)


def boundary_signal(chain: GaussianDiffusion, eps: torch.Tensor) -> torch.Tensor:
    """The signal of x_{K-1} = ε: α/(1+σ)·ε, which gives α·y + σ·ε = ε exactly."""
    top = torch.full((eps.shape[0],), chain.num_timesteps - 1, dtype=torch.long, device=eps.device)
    alpha, sigma = alpha_sigma(chain, top, eps)
    return alpha / (1 + sigma) * eps


def noisy_point(chain: GaussianDiffusion, y: torch.Tensor, eps: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """x_j = α_j·y + σ_j·ε."""
    alpha, sigma = alpha_sigma(chain, j, eps)
    return alpha * y + sigma * eps


def bootstrap_target(
    chain: GaussianDiffusion, teacher_output: torch.Tensor, y: torch.Tensor, x_t: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """The signal after the teacher's DDIM step from (x_j, j), given x_j's signal y (Signal-ODE form)."""
    f = chain.p_mean_variance(teacher_output, x_t, j, clip_denoised=True).pred_xstart
    alpha, sigma = alpha_sigma(chain, j, x_t)
    alpha_prev = chain.gather("sqrt_alphas_cumprod_prev", j, x_t)
    sigma_prev = chain.gather("sqrt_one_minus_alphas_cumprod_prev", j, x_t)
    return f + (sigma_prev * alpha) / (alpha_prev * sigma) * (y - f)


class BootDistiller(Trainer):
    """One BOOT step: bootstrap targets from one teacher call, plus the boundary loss at j = K-1."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        chain: GaussianDiffusion,
        sample_shape: tuple[int, ...],
        optim: OptimSpec,
        generator: torch.Generator,
        boundary_fraction: float = 0.125,
        boundary_weight: float = 1.0,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(student, optim, device)
        if chain.num_timesteps < 2:
            raise ValueError("BOOT needs a chain of at least 2 steps")
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.chain = chain
        self.sample_shape = sample_shape
        self.generator = generator
        self.boundary_fraction = boundary_fraction
        self.boundary_weight = boundary_weight
        self.teacher_calls = 0

    def draw(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise, chain indices (the first rows at the boundary K-1) and the boundary mask."""
        k = self.chain.num_timesteps
        n_boundary = max(1, round(b * self.boundary_fraction))
        eps = torch.randn((b, *self.sample_shape), generator=self.generator)
        j = torch.cat(
            [torch.full((n_boundary,), k - 1), torch.randint(0, k - 1, (b - n_boundary,), generator=self.generator)]
        )
        return eps.to(self.device), j.to(self.device), (j == k - 1).to(self.device)

    @torch.no_grad()
    def targets(self, eps: torch.Tensor, j: torch.Tensor, boundary: torch.Tensor) -> torch.Tensor:
        """Stop-gradient targets: the student's own signal at j + 1 stepped once by the teacher."""
        y = boundary_signal(self.chain, eps)
        inner = ~boundary
        if bool(inner.any()):
            y[inner] = self.chain.run_model(self.model, eps[inner], j[inner] + 1)
        x_t = noisy_point(self.chain, y, eps, j)
        x_t[boundary] = eps[boundary]  # exactly the noise the trajectory starts from
        teacher_output = self.chain.run_model(self.teacher, x_t, j)
        self.teacher_calls += eps.shape[0]
        return bootstrap_target(self.chain, teacher_output, y, x_t, j)

    def step(self) -> StepLogs:
        eps, j, boundary = self.draw(self.optim.batch_size)
        target = self.targets(eps, j, boundary)
        pred = self.chain.run_model(self.model, eps, j)
        mse = mean_flat((pred - target) ** 2)  # (B,) signal-space error
        weighted = self.chain.gather("alphas_cumprod_prev", j, mse) * mse  # the error of the point x_{j-1}
        inner = ~boundary
        bootstrap = weighted[inner].mean() if bool(inner.any()) else mse.new_zeros(())
        loss = bootstrap + self.boundary_weight * weighted[boundary].mean()
        logs = self.optimizer_step(LossTerms(loss=loss, mse=mse, vlb=torch.zeros_like(mse)))
        return {
            **logs,
            "boundary": weighted[boundary].mean().detach(),
            "bootstrap": bootstrap.detach(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state(), "teacher_calls": self.teacher_calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        self.teacher_calls = int(state["teacher_calls"])


@torch.no_grad()
def one_step_sample(model: nn.Module, noise: torch.Tensor) -> torch.Tensor:
    """A BOOT student's samples: g(ε, 0) in one call, clipped to the data range.

    Chain index 0 is timestep 0 on every chain (IDDPM spacing always keeps it).
    """
    t = torch.zeros(noise.shape[0], dtype=torch.long, device=noise.device)
    return model(noise, t).clamp(-1, 1)
