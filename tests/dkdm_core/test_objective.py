"""L_hybrid and L*_DKDM: where their gradients go, and their fixed points."""

from __future__ import annotations

import pytest
import torch

from dkdm_core.diffusion import make_diffusion
from dkdm_core.objective import dkdm_loss, hybrid_loss, resolve_objective


def _batch(seed: int = 0, b: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x_t = torch.randn(b, 1, 4, 4, generator=gen)
    t = torch.randint(0, 50, (b,), generator=gen)
    t[0] = 0  # the decoder / first step must be covered too
    teacher = torch.cat([torch.randn(b, 1, 4, 4, generator=gen), torch.rand(b, 1, 4, 4, generator=gen) * 2 - 1], 1)
    student = torch.cat([torch.randn(b, 1, 4, 4, generator=gen), torch.rand(b, 1, 4, 4, generator=gen) * 2 - 1], 1)
    return x_t, t, teacher, student


def test_vlb_gradient_reaches_only_the_variance_output() -> None:
    chain = make_diffusion("cosine", 1000, respacing=100)
    x_t, t, teacher, student = _batch()
    student.requires_grad_(True)
    terms = dkdm_loss(chain, student, teacher, x_t, t, vlb_weight=1.0)
    (grad_vlb,) = torch.autograd.grad(terms.vlb.sum(), student, retain_graph=True)
    assert grad_vlb[:, :1].abs().max() == 0, "L*_vlb must not move ε (stop-gradient on the mean)"
    assert grad_vlb[:, 1:].abs().max() > 0, "L*_vlb must train the variance output v"
    (grad_mse,) = torch.autograd.grad(terms.mse.sum(), student)
    assert grad_mse[:, 1:].abs().max() == 0, "L*_simple must not move v"
    assert grad_mse[:, :1].abs().max() > 0


def test_dkdm_loss_is_zero_and_stationary_when_student_equals_teacher() -> None:
    chain = make_diffusion("linear", 1000, respacing=50)
    x_t, t, teacher, _ = _batch(1)
    student = teacher.clone().requires_grad_(True)
    terms = dkdm_loss(chain, student, teacher, x_t, t)
    assert float(terms.loss.detach()) < 1e-7
    (grad,) = torch.autograd.grad(terms.loss, student)
    assert grad.abs().max() < 1e-5


def test_dkdm_loss_positive_when_they_differ_and_simple_mode_drops_vlb() -> None:
    chain = make_diffusion("cosine", 1000)
    x_t, t, teacher, student = _batch(2)
    full = dkdm_loss(chain, student, teacher, x_t, t, vlb_weight=0.001)
    simple = dkdm_loss(chain, student, teacher, x_t, t, mode="simple")
    assert (full.vlb > 0).all() and float(full.loss) > float(simple.loss) > 0
    assert torch.equal(simple.vlb, torch.zeros_like(simple.vlb))
    torch.testing.assert_close(full.mse, simple.mse)
    # Eq. (19) weighting: λ · T · L_t on top of the MSE.
    torch.testing.assert_close(full.loss, (full.mse + 0.001 * 1000 * full.vlb).mean())


def test_variance_only_mismatch_is_seen_only_by_vlb() -> None:
    chain = make_diffusion("cosine", 1000, respacing=100)
    x_t, t, teacher, _ = _batch(3)
    student = teacher.clone()
    student[:, 1:] = -student[:, 1:]
    terms = dkdm_loss(chain, student, teacher, x_t, t)
    assert float(terms.mse.max()) == 0 and float(terms.vlb.min()) >= 0 and float(terms.vlb.max()) > 0


def test_hybrid_loss_gradients_and_eps_only_models() -> None:
    d = make_diffusion("cosine", 1000)
    x_t, t, _, out = _batch(4)
    x_start, noise = torch.rand_like(x_t) * 2 - 1, torch.randn_like(x_t)
    out.requires_grad_(True)
    terms = hybrid_loss(d, out, x_start, x_t, t, noise)
    (g,) = torch.autograd.grad(terms.vlb.sum(), out)
    assert g[:, :1].abs().max() == 0 and g[:, 1:].abs().max() > 0
    eps_only = make_diffusion("cosine", 1000, learn_sigma=False)
    terms = hybrid_loss(eps_only, out[:, :1], x_start, x_t, t, noise)
    torch.testing.assert_close(terms.loss, ((noise - out[:, :1]) ** 2).mean())


def test_objective_auto_follows_the_teachers_variance() -> None:
    assert resolve_objective("auto", True) == "dkdm"
    assert resolve_objective("auto", False) == "simple"
    assert resolve_objective("simple", True) == "simple"
    with pytest.raises(ValueError, match="needs a teacher with learned variance"):
        resolve_objective("dkdm", False)
