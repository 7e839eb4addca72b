"""Class-conditional distillation: labelled pools, guided teacher steps, conditional students, plans."""

from __future__ import annotations

import pytest
import torch

from dkdm_core.checkpoint import ClassCard, ModelCard, build_from_card
from dkdm_core.guidance import Guidance, guided
from dkdm_core.models import build_model
from dkdm_core.plan import PlanError, make_plan
from dkdm_core.pool import NoisePool
from dkdm_core.sampling import class_labels, sampling_guidance
from dkdm_core.spec import DiffusionSpec, DistillSpec
from dkdm_core.training import KnowledgeBatch, student_loss, teacher_step

SHAPE = (1, 2, 2)
CLASSES = (2, 5, 7)


class LabelTeacher:
    """x_{t-1} = x_t + 1 and a record of the label each call saw per sample value."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        assert labels is not None and labels.shape == t.shape
        self.calls += x.shape[0]
        return x + 1


def labelled_pool(strategy: str = "dynamic", size: int = 300, chain: int = 10, seed: int = 0) -> NoisePool:
    return NoisePool(strategy, size, SHAPE, chain, torch.Generator().manual_seed(seed), classes=CLASSES)  # type: ignore[arg-type]


def test_pool_labels_are_drawn_from_the_job_classes_and_kept_through_lease_and_advance() -> None:
    pool = labelled_pool()
    assert pool.labels is not None and set(pool.labels.tolist()) == set(CLASSES)
    pool.shuffle_denoise(LabelTeacher(), 128)
    restarts = 0
    for _ in range(100):
        before_labels, before_t = pool.labels.clone(), pool.t.clone()
        lease = pool.take(32)
        assert lease.labels is not None and torch.equal(lease.labels, before_labels[lease.ids])
        pool.put(lease.lease_id, lease.x_t + 1)
        advanced = pool.t[lease.ids] == before_t[lease.ids] - 1
        # A sample that moved one step down keeps its label; one that restarted at T may draw another.
        assert torch.equal(pool.labels[lease.ids][advanced], before_labels[lease.ids][advanced])
        untouched = torch.ones(pool.size, dtype=torch.bool)
        untouched[lease.ids] = False
        assert torch.equal(pool.labels[untouched], before_labels[untouched])
        restarts += int((~advanced).sum())
        assert set(pool.labels.tolist()) <= set(CLASSES)
    assert restarts > 0  # restarts were exercised, and their new labels are classes of the job


def test_pool_labels_survive_a_snapshot_and_the_restored_pool_continues_identically() -> None:
    a = labelled_pool(seed=3)
    a.shuffle_denoise(LabelTeacher(), 64)
    for _ in range(20):
        lease = a.take(16)
        a.put(lease.lease_id, lease.x_t + 1)
    outstanding = a.take(16)  # a lease open at snapshot time comes back unadvanced
    state = a.state_dict()
    b = labelled_pool(seed=99)
    b.load_state_dict(state)
    assert b.labels is not None and a.labels is not None and torch.equal(b.labels, a.labels)
    a.release(outstanding.lease_id)
    for _ in range(30):  # the same leases, advances, restarts and new labels from here on
        la, lb = a.take(16), b.take(16)
        assert torch.equal(la.ids, lb.ids) and torch.equal(la.labels, lb.labels)  # type: ignore[arg-type]
        a.put(la.lease_id, la.x_t + 1)
        b.put(lb.lease_id, lb.x_t + 1)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.x, b.x)
    with pytest.raises(ValueError, match="class labels"):
        NoisePool("dynamic", 300, SHAPE, 10, torch.Generator()).load_state_dict(state)


def test_trajectory_init_gives_each_trajectory_one_label() -> None:
    pool = labelled_pool(size=400, chain=40)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def denoise(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        assert labels is not None
        seen.append((x[:, 0, 0, 0].clone(), labels.clone()))
        return x + 1

    pool.initialise(denoise, 512, method="trajectory", per_trajectory=8)
    assert pool.labels is not None
    trajectory = torch.arange(pool.size) // 8
    for j in range(int(trajectory[-1]) + 1):  # every slot of one trajectory carries its label
        assert pool.labels[trajectory == j].unique().numel() == 1


def test_an_unconditional_pool_has_no_labels_and_draws_as_before() -> None:
    pool = NoisePool("dynamic", 50, SHAPE, 10, torch.Generator().manual_seed(0))
    assert pool.labels is None and "labels" not in pool.state_dict()
    assert torch.equal(pool.x, torch.randn((50, *SHAPE), generator=torch.Generator().manual_seed(0)))
    assert pool.take(8).labels is None


@pytest.mark.parametrize("arch", ["unet-tiny", "vit-tiny"])
def test_a_conditional_students_loss_depends_on_every_label(arch: str) -> None:
    torch.manual_seed(0)
    student = build_model(arch, 1, 8, True, class_embeds=11)
    with torch.no_grad():  # a trained-looking network: DiT's adaLN-Zero output starts at exactly zero
        for name, p in student.named_parameters():
            p.add_(torch.randn_like(p), alpha=1.0 if "class_embedding" in name or "y_embed" in name else 0.05)
    chain = DiffusionSpec(num_timesteps=100).build(True)
    g = torch.Generator().manual_seed(1)
    x_t, t = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 100, (6,), generator=g)
    target = torch.randn(6, 2, 8, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 10])
    batch = KnowledgeBatch(x_t=x_t, t=t, teacher_output=target, x_prev=x_t, labels=labels)
    terms = student_loss(student, chain, batch, 0.001, "dkdm")
    for i in range(6):  # changing any one sample's label changes that sample's loss, and only it
        other = labels.clone()
        other[i] = (labels[i] + 3) % 11
        changed = student_loss(student, chain, KnowledgeBatch(x_t, t, target, x_t, other), 0.001, "dkdm")
        assert not torch.isclose(changed.mse[i], terms.mse[i])
        keep = torch.arange(6) != i
        torch.testing.assert_close(changed.mse[keep], terms.mse[keep])
    terms.loss.backward()
    embedding = next(p for n, p in student.named_parameters() if "class_embedding" in n or "y_embed" in n)
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0


def test_guidance_is_eq6_on_the_prediction_channels_and_keeps_the_conditional_variance() -> None:
    def model(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        eps = x * (labels.float() + 1).view(-1, 1, 1, 1)
        var = torch.full_like(x, 0.0) + labels.float().view(-1, 1, 1, 1)
        return torch.cat([eps, var], dim=1)

    x, t, labels = torch.ones(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2])
    out = guided(model, labels, Guidance(3, scale=2.5, null_label=3), channels=1)(x, t)
    eps_c, eps_u = (labels.float() + 1).view(-1, 1, 1, 1), 4.0
    torch.testing.assert_close(out[:, :1], (eps_u + 2.5 * (eps_c - eps_u)).expand(3, 1, 2, 2))
    torch.testing.assert_close(out[:, 1:], labels.float().view(-1, 1, 1, 1).expand(3, 1, 2, 2))
    with pytest.raises(ValueError, match="null class"):
        Guidance(3, scale=2.0, null_label=None)


def test_a_guided_teacher_step_moves_the_pool_with_guidance_and_teaches_the_null_share() -> None:
    torch.manual_seed(0)
    teacher = build_model("unet-tiny", 1, 8, True, class_embeds=11).eval()
    chain = DiffusionSpec(num_timesteps=100).build(True)
    x_t, t = torch.randn(64, 1, 8, 8), torch.randint(0, 100, (64,))
    labels = torch.arange(64) % 10
    guidance = Guidance(10, scale=3.0, null_label=10, null_fraction=0.25)
    batch = teacher_step(teacher, chain, x_t, t, torch.Generator().manual_seed(5), labels=labels, guidance=guidance)
    assert batch.labels is not None
    dropped = batch.labels == 10
    assert 0 < int(dropped.sum()) < 64 and torch.equal(batch.labels[~dropped], labels[~dropped])
    with torch.no_grad():
        cond = chain.eps_output(chain.run_model(lambda x, s: teacher(x, s, labels), x_t, t), x_t, t)
        null = torch.full_like(labels, 10)
        uncond = chain.eps_output(chain.run_model(lambda x, s: teacher(x, s, null), x_t, t), x_t, t)
        guided_out = chain.run_model(guided(teacher, labels, guidance, 1), x_t, t)
    torch.testing.assert_close(batch.teacher_output[~dropped], cond[~dropped])
    torch.testing.assert_close(batch.teacher_output[dropped], uncond[dropped])
    noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(batch.x_prev, chain.p_sample_step(guided_out, x_t, t, noise))


def conditional_card(null: bool = True, scale: float = 2.0) -> ModelCard:
    return ModelCard(
        arch="unet-tiny",
        channels=1,
        image_size=8,
        learn_sigma=True,
        diffusion=DiffusionSpec(),
        data="digits",
        classes=ClassCard(num=10, null=null, guidance_scale=scale if null else 1.0),
    )


def test_plan_resolves_classes_from_the_teacher_card() -> None:
    plan = make_plan(DistillSpec(), conditional_card())
    assert plan.classes == tuple(range(10)) and plan.guidance_scale == 2.0 and plan.null_fraction == 0.1
    assert plan.student_card.classes == ClassCard(num=10, null=True, guidance_scale=2.0)
    assert plan.student_card.info["classes"]["guidance_scale"] == 2.0
    assert build_from_card(plan.student_card)(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.tensor([3, 10])).shape
    spec = DistillSpec.model_validate({"classes": {"labels": [3, 4], "guidance_scale": 1.5, "null_fraction": 0}})
    plan = make_plan(spec, conditional_card())
    assert plan.pool_classes == (3, 4) and plan.guidance() == Guidance(10, 1.5, 10, 0.0)
    assert plan.student_card.classes == ClassCard(num=10, null=False, guidance_scale=1.0)


@pytest.mark.parametrize(
    ("teacher", "section", "field"),
    [
        (None, {"guidance_scale": 2.0}, "classes"),
        ("cond", {"labels": [10]}, "classes.labels"),
        ("no-null", {"guidance_scale": 2.0}, "classes.guidance_scale"),
        ("no-null", {"null_fraction": 0.2}, "classes.null_fraction"),
    ],
)
def test_plan_errors_name_the_classes_field(teacher: str | None, section: dict, field: str) -> None:
    card = conditional_card(null=teacher != "no-null")
    if teacher is None:
        card = card.model_copy(update={"classes": None})
    with pytest.raises(PlanError) as info:
        make_plan(DistillSpec.model_validate({"classes": section}), card)
    assert info.value.field == field


def test_an_unconditional_plan_is_unchanged_by_the_classes_section() -> None:
    card = conditional_card().model_copy(update={"classes": None})
    plan = make_plan(DistillSpec(), card)
    assert plan.classes == () and plan.pool_classes is None and plan.guidance() is None
    assert plan.student_card.classes is None and "classes" not in plan.student_card.info


def test_sampling_labels_default_to_every_class_in_turn_and_are_checked() -> None:
    classes = ClassCard(num=10, null=True, guidance_scale=2.0)
    assert class_labels(classes, 12, None).tolist() == [*range(10), 0, 1]
    assert class_labels(classes, 3, [4]).tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        class_labels(classes, 2, [3, 10])
    with pytest.raises(ValueError, match="not class-conditional"):
        class_labels(None, 2, [1])
    assert sampling_guidance(classes, None) == Guidance(10, 2.0, 10)
    with pytest.raises(ValueError, match="cannot be guided"):
        sampling_guidance(ClassCard(num=10), 3.0)
