"""The job plan: made once from (spec, teacher card), pure, serialisable, every teacher check with its field."""

from __future__ import annotations

import pytest

from dkdm_core.checkpoint import ModelCard
from dkdm_core.plan import JobPlan, PlanError, make_plan
from dkdm_core.spec import DiffusionSpec, DistillSpec


def teacher(learn_sigma: bool = True, data: str | None = "digits", t: int = 100) -> ModelCard:
    diffusion = DiffusionSpec(num_timesteps=t)
    return ModelCard(
        arch="unet-tiny", channels=1, image_size=8, learn_sigma=learn_sigma, diffusion=diffusion, data=data
    )


def spec(**data: object) -> DistillSpec:
    return DistillSpec.model_validate({"pool": {"chain_steps": 10}, "optim": {"batch_size": 16}, **data})


def test_the_plan_holds_chain_pool_seeds_and_the_student_card() -> None:
    plan = make_plan(spec(engine="ray", ray={"shards": 2, "students": 2}, seed=3), teacher())
    assert plan.chain_length == 10 and plan.build_chain().num_timesteps == 10
    assert plan.pool_size == 64 and plan.shard_sizes == (32, 32) and plan.rank_batch == 8
    assert (plan.pool_seed(0), plan.teacher_seed(0, 0), plan.student_seed) == (3, 4, 3)
    assert (
        len({plan.pool_seed(k) for k in range(4)} | {plan.teacher_seed(i, g) for i in range(4) for g in range(4)}) == 20
    )
    info = plan.student_card.info
    assert info["kind"] == "student" and info["engine"] == "ray" and info["pool_size"] == 64
    assert (
        info["chain_steps"] == 10 and info["parameters"] > 0 and info["teacher_parameters"] == info["parameters"]
    )  # both unet-tiny


def test_the_plan_travels_as_its_serialised_form_and_is_frozen() -> None:
    plan = make_plan(spec(method="o2mkd"), teacher())
    again = JobPlan.model_validate_json(plan.model_dump_json())
    assert again == plan and JobPlan.model_validate(plan.model_dump()) == plan
    with pytest.raises(ValueError):
        plan.chain_length = 5  # type: ignore[misc]


def test_baselines_train_on_the_full_chain_and_keep_no_pool() -> None:
    plan = make_plan(spec(method="data-free"), teacher())
    assert plan.respacing is None and plan.chain_length == 100 and plan.pool_size == 0
    assert "pool_size" not in plan.student_card.info


@pytest.mark.parametrize(
    ("job", "card", "field"),
    [
        (spec(pool={"chain_steps": 500}), teacher(), "pool.chain_steps"),
        (spec(objective="dkdm"), teacher(learn_sigma=False), "objective"),
        (spec(method="o2mkd", o2mkd={"students": 2, "boundaries": [150]}), teacher(), "o2mkd.boundaries"),
        (spec(method="data-based"), teacher(data=None), "method"),
        (spec(engine="ray", ray={"shards": 16}), teacher(), "ray.shards"),
    ],
)
def test_each_teacher_check_names_its_field(job: DistillSpec, card: ModelCard, field: str) -> None:
    with pytest.raises(PlanError) as caught:
        make_plan(job, card)
    assert caught.value.field == field
