"""Gaussian diffusion maths (DKDM paper Sec. 2, Eqs. 1-13; Nichol & Dhariwal's improved DDPM).

Conventions, shared with improved-diffusion and diffusers:

* A timestep is an integer index ``t`` in ``[0, T-1]``; index ``t`` is the paper's step ``t+1``.
* Schedules are computed in float64 numpy and gathered into the dtype of the tensor they scale. The
  gathers read float64 torch copies kept per device (made on first use), so a training step on a GPU
  never copies a table from the host.
* The maths takes *model outputs*, not models: ``p_mean_variance(model_output, x_t, t)``. A teacher's
  output is computed once and reused for the pool update and for the student's target.
* A respaced diffusion (``respace``) keeps a subset of the original timesteps; ``timestep_map``
  turns its indices back into the original ``t`` the network was trained on.
* Learned-range variance (Eq. 12): the network returns ``2C`` channels, ε and ``v ∈ [-1, 1]``, and
  ``log Σ = frac·log β_t + (1-frac)·log β̃_t`` with ``frac = (v + 1) / 2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

Schedule = Literal["linear", "cosine"]
Sampler = Literal["iddpm", "ddim"]
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def get_named_beta_schedule(name: Schedule, num_timesteps: int) -> np.ndarray:
    """β_1..β_T for a named schedule; linear is Ho et al.'s, rescaled so any T spans the same range."""
    if name == "linear":
        if num_timesteps < 20:
            raise ValueError("the linear schedule needs T >= 20 (its last beta is 0.02 * 1000 / T)")
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {name!r}; expected 'linear' or 'cosine'")


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous ᾱ(s), s ∈ [0, 1]; β is capped so the last steps stay invertible."""
    betas = []
    for i in range(num_timesteps):
        s1, s2 = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1 - alpha_bar(s2) / alpha_bar(s1), max_beta))
    return np.array(betas, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int) -> list[int]:
    """Timesteps kept by improved-diffusion's respacing.

    ``"50"`` keeps 50 evenly strided steps (first and last included); ``"10,15,20"`` splits ``[0, T)``
    into three sections with that many steps each; ``"ddim50"`` keeps ``range(0, T, T // 50)``, the
    stride DDIM and diffusers' "leading" spacing use.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        count = int(section_counts[len("ddim") :])
        if not 1 <= count <= num_timesteps:
            raise ValueError(f"cannot keep {count} of {num_timesteps} timesteps")
        return list(range(0, num_timesteps, num_timesteps // count))[:count]
    counts = [int(c) for c in str(section_counts).split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(f"cannot keep {count} timesteps of a section of {size}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept += [start + round(stride * j) for j in range(count)]
        start += size
    return kept


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(means, e^{2 log_scales}) (Ho et al.)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )


@dataclass(frozen=True)
class ReverseStep:
    """The Gaussian p(x_{t-1} | x_t) a model predicts, plus the quantities it came from."""

    mean: torch.Tensor  # (B, C, H, W)
    log_variance: torch.Tensor  # (B, C, H, W) or broadcastable (B, 1, 1, 1)
    pred_xstart: torch.Tensor  # (B, C, H, W)
    eps: torch.Tensor  # (B, C, H, W)


class GaussianDiffusion:
    """The forward process, its posterior and the model's reverse steps for one β schedule.

    ``learn_sigma`` says whether the network outputs ``2C`` channels (ε, v) with the learned-range
    variance of Eq. (12), or ``C`` channels (ε only) with the fixed posterior variance β̃_t.
    """

    def __init__(
        self,
        betas: np.ndarray,
        learn_sigma: bool = True,
        timestep_map: Iterable[int] | None = None,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.learn_sigma = learn_sigma
        self.num_timesteps = len(betas)
        self.timestep_map = np.asarray(
            list(timestep_map) if timestep_map is not None else range(self.num_timesteps),
            dtype=np.int64,
        )
        if len(self.timestep_map) != self.num_timesteps:
            raise ValueError("timestep_map must have one entry per timestep")

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Eq. (6): β̃_t; its log is clipped at t=0 where β̃_0 = 0 (improved-diffusion's choice).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        first = self.posterior_variance[1] if self.num_timesteps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        # Eq. (7): μ̃_t = coef1 · x_0 + coef2 · x_t.
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        self.sqrt_alphas_cumprod_prev = np.sqrt(self.alphas_cumprod_prev)
        self.sqrt_one_minus_alphas_cumprod_prev = np.sqrt(1.0 - self.alphas_cumprod_prev)
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    def __getstate__(self) -> dict[str, object]:
        # Device copies are a cache: a pickled diffusion (sent to another process) rebuilds its own.
        return {**self.__dict__, "_tables": {}}

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """The numpy table ``name`` as a tensor on ``device`` (float64; int64 for ``timestep_map``), cached."""
        key = (name, device)
        found = self._tables.get(key)
        if found is None:
            found = self._tables[key] = torch.from_numpy(getattr(self, name)).to(device)
        return found

    def gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] in ``like``'s dtype, broadcast to its shape: (B,) -> (B, 1, ..., 1)."""
        out = self.table(name, t.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    @property
    def out_channels_factor(self) -> int:
        return 2 if self.learn_sigma else 1

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of this (possibly respaced) diffusion -> the original t the network expects."""
        return self.table("timestep_map", t.device)[t]

    def run_model(self, model: ModelFn, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x_t, self.model_timesteps(t))

    # Forward process -------------------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. (4): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
        return (
            self.gather("sqrt_alphas_cumprod", t, x_start) * x_start
            + self.gather("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eqs. (5)-(7): mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self.gather("posterior_mean_coef1", t, x_t) * x_start + self.gather("posterior_mean_coef2", t, x_t) * x_t
        return mean, self.gather("posterior_log_variance_clipped", t, x_t)

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self.gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self.gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return (self.gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self.gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # Reverse process -------------------------------------------------------------------------

    def split_output(self, model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 2C, H, W) -> ε (B, C, H, W), v (B, C, H, W); an ε-only output gives v = None."""
        if model_output.shape[1] == channels * self.out_channels_factor:
            if self.learn_sigma:
                eps, v = torch.split(model_output, channels, dim=1)
                return eps, v
            return model_output, None
        raise ValueError(
            f"model output has {model_output.shape[1]} channels; expected "
            f"{channels * self.out_channels_factor} for {channels}-channel data "
            f"({'learned' if self.learn_sigma else 'fixed'} variance)"
        )

    def log_variance_from_v(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. (12): log Σ = frac · log β_t + (1 - frac) · log β̃_t, frac = (v + 1) / 2."""
        min_log = self.gather("posterior_log_variance_clipped", t, v)
        max_log = self.gather("log_betas", t, v)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
    ) -> ReverseStep:
        """Eqs. (8), (10), (12): the Gaussian reverse step a model output describes."""
        # 1. Split ε from the variance interpolation v.
        eps, v = self.split_output(model_output, x_t.shape[1])
        # 2. Eq. (12) for learned variance, else the fixed posterior variance β̃_t.
        if v is not None:
            log_variance = self.log_variance_from_v(v, t)
        else:
            log_variance = self.gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        # 3. Eq. (4) inverted: x̂_0 from ε, clipped to the data range.
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        # 4. Eq. (7) with x̂_0 in place of x_0 (equivalent to Eq. (10) when unclipped).
        mean, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return ReverseStep(mean=mean, log_variance=log_variance, pred_xstart=pred_xstart, eps=eps)

    def p_sample_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise is added at t = 0."""
        step = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return step.mean + nonzero * torch.exp(0.5 * step.log_variance) * noise

    def ddim_step(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        eta: float = 0.0,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """DDIM (Song et al., Eq. 12); ε is re-derived from the clipped x̂_0 as improved-diffusion does."""
        step = self.p_mean_variance(model_output, x_t, t, clip_denoised)
        eps = self.predict_eps_from_xstart(x_t, t, step.pred_xstart)
        alpha_bar = self.gather("alphas_cumprod", t, x_t)
        alpha_bar_prev = self.gather("alphas_cumprod_prev", t, x_t)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        x_prev = step.pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if eta > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs noise")
            nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
            x_prev = x_prev + nonzero * sigma * noise
        return x_prev

    # Likelihood terms ------------------------------------------------------------------------

    def vb_terms_bpd(
        self,
        step: ReverseStep,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
    ) -> torch.Tensor:
        """Eq. (9) per sample in bits/dim: KL(q ‖ p) for t > 0, the decoder NLL at t = 0. (B,)"""
        true_mean, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, step.mean, step.log_variance)) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=step.mean, log_scales=0.5 * step.log_variance)
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)


def make_diffusion(
    schedule: Schedule,
    num_timesteps: int,
    learn_sigma: bool = True,
    respacing: str | int | Iterable[int] | None = None,
) -> GaussianDiffusion:
    """A diffusion for a schedule, optionally respaced to a subset of its timesteps."""
    base = GaussianDiffusion(get_named_beta_schedule(schedule, num_timesteps), learn_sigma)
    if respacing is None:
        return base
    kept = space_timesteps(num_timesteps, respacing) if isinstance(respacing, (str, int)) else list(respacing)
    return respace(base, kept)


def respace(base: GaussianDiffusion, use_timesteps: Iterable[int]) -> GaussianDiffusion:
    """Keep a subset of ``base``'s timesteps; β's are re-derived so ᾱ at the kept steps is unchanged."""
    kept = sorted(set(int(t) for t in use_timesteps))
    if not kept or kept[0] < 0 or kept[-1] >= base.num_timesteps:
        raise ValueError(f"respaced timesteps must lie in [0, {base.num_timesteps - 1}]")
    last_alpha_cumprod = 1.0
    betas = []
    for t in kept:
        alpha_cumprod = base.alphas_cumprod[t]
        betas.append(1 - alpha_cumprod / last_alpha_cumprod)
        last_alpha_cumprod = alpha_cumprod
    timestep_map = base.timestep_map[kept]
    return GaussianDiffusion(np.array(betas), base.learn_sigma, timestep_map)


@torch.no_grad()
def sample_loop(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    shape: tuple[int, ...],
    generator: torch.Generator,
    sampler: Sampler = "iddpm",
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Draw samples by running every step of ``diffusion`` (respace it first for fewer steps).

    Noise is drawn on the CPU from ``generator`` so a seed gives the same images on any device.
    """
    x = torch.randn(shape, generator=generator).to(device)  # (B, C, H, W)
    for i in reversed(range(diffusion.num_timesteps)):
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        model_output = diffusion.run_model(model, x, t)
        noise = torch.randn(shape, generator=generator).to(device)
        if sampler == "ddim":
            x = diffusion.ddim_step(model_output, x, t, noise, eta=eta)
        else:
            x = diffusion.p_sample_step(model_output, x, t, noise)
        if progress is not None:
            progress(diffusion.num_timesteps - i)
    return x
