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

Any diffusers DDPM/DDIM scheduler config maps onto one ``GaussianDiffusion``, step for step:

* ``variance_type``: ``fixed_small`` (β̃_t), ``fixed_large`` (β_t), ``learned`` (the extra ``C``
  channels are σ² itself, as diffusers' ``DDPMScheduler`` reads them) or ``learned_range`` (Eq. 12).
* ``prediction_type``: the network predicts ε, ``v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x_0`` (Salimans & Ho) or
  x_0 (``sample``); all three give x̂_0 and ε̂ by an affine map of (output, x_t) at each t.
* x̂_0 is clipped to ``±clip_sample_range`` or dynamically thresholded (Imagen) before Eq. (7).

Students always learn in the ε-parameterisation (``eps_view``), with learned-range variance when the
teacher learns its variance and the teacher's own fixed variance otherwise; ``eps_output`` turns a
teacher's output into that parameterisation. Why the maths allows it: for fixed (x_t, t), ε̂, x̂_0 and
v̂ are affine images of each other (ε = sqrt(ᾱ) v + sqrt(1-ᾱ) x_t = (x_t - sqrt(ᾱ) x̂_0)/sqrt(1-ᾱ)),
so a student whose ε matches the teacher's converted ε has the teacher's x̂_0, the same clipped x̂_0
and so the same reverse mean; the parameterisations differ only by a per-t weight on the squared error
(|Δv|² = |Δε|²/ᾱ_t, |Δx̂_0|² = (1-ᾱ_t)/ᾱ_t·|Δε|²), and ε's weight of 1 is L_simple's (Eq. 11, 20),
bounded where 1/ᾱ_t explodes at the end of a cosine schedule. Learned-range v is an unbounded affine
function of log σ² (log β_t ≠ log β̃_t), so it represents any teacher variance exactly, including a
``learned`` teacher's; a fixed variance is copied as is, so the KL term of Eq. (21) is zero for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

# linear and cosine are improved-diffusion's (diffusers' linear and squaredcos_cap_v2); scaled_linear
# is latent diffusion's sqrt-linear schedule; trained: β's given one by one (diffusers' trained_betas).
Schedule = Literal["linear", "cosine", "scaled_linear", "trained"]
VarianceType = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
Sampler = Literal["iddpm", "ddim"]
LEARNED_VARIANCES = ("learned", "learned_range")
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


def beta_schedule(
    name: Schedule,
    num_timesteps: int,
    beta_start: float | None = None,
    beta_end: float | None = None,
    trained_betas: Iterable[float] | None = None,
) -> np.ndarray:
    """β_1..β_T as diffusers computes them (in float64); linear endpoints default to Ho et al.'s, rescaled."""
    if name == "trained":
        if trained_betas is None:
            raise ValueError("schedule 'trained' needs trained_betas")
        betas = np.asarray(list(trained_betas), dtype=np.float64)
        if betas.shape != (num_timesteps,):
            raise ValueError(f"trained_betas has {betas.size} values for {num_timesteps} timesteps")
        return betas
    if name in ("linear", "scaled_linear") and (beta_start is not None or beta_end is not None):
        start = 1e-4 * 1000 / num_timesteps if beta_start is None else beta_start
        end = 0.02 * 1000 / num_timesteps if beta_end is None else beta_end
        if name == "scaled_linear":  # latent diffusion: linear in sqrt(β)
            return np.linspace(start**0.5, end**0.5, num_timesteps, dtype=np.float64) ** 2
        return np.linspace(start, end, num_timesteps, dtype=np.float64)
    if name == "scaled_linear":
        betas = get_named_beta_schedule("linear", num_timesteps)
        return np.linspace(betas[0] ** 0.5, betas[-1] ** 0.5, num_timesteps, dtype=np.float64) ** 2
    return get_named_beta_schedule(name, num_timesteps)


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
class Thresholding:
    """Imagen's dynamic thresholding of x̂_0, with diffusers' parameters and defaults."""

    ratio: float = 0.995  # the percentile of |x̂_0| per sample that sets the threshold s
    max_value: float = 1.0  # s is clamped to [1, max_value]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)  # (B, C·H·W)
        # quantile needs float32/64; half precision is upcast as diffusers does.
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(work.abs(), self.ratio, dim=1).to(x.dtype)
        s = s.clamp(min=1, max=self.max_value).unsqueeze(1)  # (B, 1)
        return (torch.clamp(flat, -s, s) / s).reshape(x.shape)


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
    variance of Eq. (12), or ``C`` channels (ε only) with the fixed posterior variance β̃_t. The
    keyword options describe any diffusers DDPM/DDIM scheduler (module docstring); ``variance_type``
    overrides ``learn_sigma`` when given. ``clip_sample_range=None`` turns clipping of x̂_0 off;
    ``thresholding`` (which wins over clipping, as in diffusers) thresholds it dynamically.
    """

    def __init__(
        self,
        betas: np.ndarray,
        learn_sigma: bool = True,
        timestep_map: Iterable[int] | None = None,
        *,
        variance_type: VarianceType | None = None,
        prediction_type: PredictionType = "epsilon",
        clip_sample_range: float | None = 1.0,
        thresholding: Thresholding | None = None,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.variance_type: VarianceType = variance_type or ("learned_range" if learn_sigma else "fixed_small")
        self.learn_sigma = self.variance_type in LEARNED_VARIANCES
        self.prediction_type: PredictionType = prediction_type
        self.clip_sample_range = clip_sample_range
        self.thresholding = thresholding
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
        # fixed_large: Σ = β_t, with β̃_1 at t=0 as improved-diffusion has it; no noise is added at
        # t=0, so samples are diffusers' exactly, and the KL at t=0 stays inside the learned range.
        self.log_variance_large = np.log(np.append(first, betas[1:]))
        # Eq. (7): μ̃_t = coef1 · x_0 + coef2 · x_t.
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        self.sqrt_alphas_cumprod_prev = np.sqrt(self.alphas_cumprod_prev)
        self.sqrt_one_minus_alphas_cumprod_prev = np.sqrt(1.0 - self.alphas_cumprod_prev)
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._eps_view: GaussianDiffusion | None = None

    def options(self) -> dict[str, Any]:
        """The keyword options, to build a diffusion with the same parameterisation on other β's."""
        return {
            "variance_type": self.variance_type,
            "prediction_type": self.prediction_type,
            "clip_sample_range": self.clip_sample_range,
            "thresholding": self.thresholding,
        }

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

    def training_target(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network regresses on in data-based training: ε, v or x_0 (its parameterisation)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x_start
        return (
            self.gather("sqrt_alphas_cumprod", t, x_start) * noise
            - self.gather("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start
        )

    # Reverse process -------------------------------------------------------------------------

    def split_output(self, model_output: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 2C, H, W) -> prediction (B, C, H, W), variance output (B, C, H, W); fixed variance gives None."""
        if model_output.shape[1] == channels * self.out_channels_factor:
            if self.learn_sigma:
                pred, v = torch.split(model_output, channels, dim=1)
                return pred, v
            return model_output, None
        raise ValueError(
            f"model output has {model_output.shape[1]} channels; expected "
            f"{channels * self.out_channels_factor} for {channels}-channel data "
            f"({'learned' if self.learn_sigma else 'fixed'} variance)"
        )

    def xstart_and_eps(
        self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x̂_0 and ε̂ (both unclipped) from an ε, v or x_0 prediction: affine maps at fixed (x_t, t)."""
        if self.prediction_type == "epsilon":
            return self.predict_xstart_from_eps(x_t, t, prediction), prediction
        if self.prediction_type == "sample":
            return prediction, self.predict_eps_from_xstart(x_t, t, prediction)
        a = self.gather("sqrt_alphas_cumprod", t, x_t)
        s = self.gather("sqrt_one_minus_alphas_cumprod", t, x_t)
        # v = a ε - s x_0 and x_t = a x_0 + s ε, with a² + s² = 1.
        return a * x_t - s * prediction, a * prediction + s * x_t

    def process_xstart(self, x: torch.Tensor) -> torch.Tensor:
        """diffusers' step 3: dynamic thresholding if set, else clipping to ±clip_sample_range if set."""
        if self.thresholding is not None:
            return self.thresholding.apply(x)
        if self.clip_sample_range is not None:
            return x.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x

    def log_variance_from_v(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. (12): log Σ = frac · log β_t + (1 - frac) · log β̃_t, frac = (v + 1) / 2."""
        min_log = self.gather("posterior_log_variance_clipped", t, v)
        max_log = self.gather("log_betas", t, v)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def v_from_log_variance(self, log_variance: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. (12) inverted: the learned-range output that gives ``log_variance`` (any value, unbounded)."""
        min_log = self.gather("posterior_log_variance_clipped", t, log_variance)
        max_log = self.gather("log_betas", t, log_variance)
        return 2 * (log_variance - min_log) / (max_log - min_log) - 1

    def log_variance(self, variance_output: torch.Tensor | None, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log Σ_θ(x_t, t) for this diffusion's variance type."""
        if self.variance_type == "learned_range":
            assert variance_output is not None  # split_output gives it for learned variances
            return self.log_variance_from_v(variance_output, t)
        if self.variance_type == "learned":
            assert variance_output is not None
            # diffusers reads the channels as σ² (sqrt at sampling); its 1e-20 floor keeps the log finite.
            return torch.log(variance_output.clamp(min=1e-20))
        table = "log_variance_large" if self.variance_type == "fixed_large" else "posterior_log_variance_clipped"
        return self.gather(table, t, x_t).expand_as(x_t)

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
    ) -> ReverseStep:
        """Eqs. (8), (10), (12): the Gaussian reverse step a model output describes.

        ``clip_denoised`` applies the diffusion's clipping or thresholding of x̂_0 (``process_xstart``).
        """
        # 1. Split the prediction (ε, v or x_0) from the variance output.
        pred, var = self.split_output(model_output, x_t.shape[1])
        # 2. Eq. (12) for learned-range variance, σ² for learned, else β̃_t or β_t.
        log_variance = self.log_variance(var, x_t, t)
        # 3. Eq. (4) inverted: x̂_0 from the prediction, clipped to the data range.
        pred_xstart, eps = self.xstart_and_eps(pred, x_t, t)
        if clip_denoised:
            pred_xstart = self.process_xstart(pred_xstart)
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
        """DDIM (Song et al., Eq. 12); ε is re-derived from the clipped x̂_0 as improved-diffusion does
        (diffusers' ``use_clipped_model_output=True``)."""
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

    # The student's parameterisation -----------------------------------------------------------

    def eps_view(self) -> GaussianDiffusion:
        """This chain as an ε-predicting student sees it: same β's, timesteps and clipping; learned-range
        variance if this one learns its variance, else the same fixed variance (module docstring)."""
        if self.prediction_type == "epsilon" and self.variance_type != "learned":
            return self
        if self._eps_view is None:
            variance: VarianceType = "learned_range" if self.learn_sigma else self.variance_type
            options = {**self.options(), "variance_type": variance, "prediction_type": "epsilon"}
            self._eps_view = GaussianDiffusion(self.betas, timestep_map=self.timestep_map, **options)
        return self._eps_view

    def eps_output(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A model output turned into ``eps_view``'s terms: the same reverse step (up to rounding).

        ε from v or x_0 by the affine maps of ``xstart_and_eps``; a ``learned`` σ² becomes the
        learned-range v of the same log σ². An ε-predicting output of another variance type is returned
        as it is, so existing ε teachers give bit-identical targets.
        """
        if self.eps_view() is self:
            return model_output
        pred, var = self.split_output(model_output, x_t.shape[1])
        _, eps = self.xstart_and_eps(pred, x_t, t)
        if var is None:
            return eps
        if self.variance_type == "learned":
            var = self.v_from_log_variance(self.log_variance(var, x_t, t), t)
        return torch.cat([eps, var], dim=1)

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
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    trained_betas: Iterable[float] | None = None,
    **options: Any,
) -> GaussianDiffusion:
    """A diffusion for a schedule, optionally respaced to a subset of its timesteps.

    ``options`` are ``GaussianDiffusion``'s keyword options (variance and prediction type, clipping).
    """
    betas = beta_schedule(schedule, num_timesteps, beta_start, beta_end, trained_betas)
    base = GaussianDiffusion(betas, learn_sigma, **options)
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
    return GaussianDiffusion(np.array(betas), base.learn_sigma, timestep_map, **base.options())


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
