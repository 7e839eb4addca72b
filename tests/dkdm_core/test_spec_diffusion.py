"""DiffusionSpec: today's cards load unchanged; new fields are checked; diffusers configs map onto it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from dkdm_core.checkpoint import CheckpointError, ModelCard, diffusion_from_scheduler, read_card, scheduler_config
from dkdm_core.diffusion import make_diffusion
from dkdm_core.spec import DiffusionSpec

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_teacher_card_loads_with_todays_diffusion() -> None:
    card = read_card(ROOT / "dkdm_core" / "assets" / "teachers" / "digits")
    built = card.diffusion.build(card.learn_sigma)
    reference = make_diffusion(card.diffusion.schedule, card.diffusion.num_timesteps, card.learn_sigma)
    assert (built.betas == reference.betas).all()
    assert built.options() == reference.options()


def test_student_diffusion_predicts_eps_and_keeps_fixed_variances() -> None:
    fixed_large = DiffusionSpec(variance_type="fixed_large", prediction_type="v_prediction")
    assert fixed_large.for_student(False) == DiffusionSpec(variance_type="fixed_large")
    learned = DiffusionSpec(variance_type="learned", prediction_type="sample")
    assert learned.for_student(True) == DiffusionSpec(variance_type="learned_range")
    assert DiffusionSpec().for_student(True) == DiffusionSpec()


def test_inconsistent_specs_are_refused() -> None:
    with pytest.raises(ValidationError, match="trained_betas"):
        DiffusionSpec(schedule="trained")
    with pytest.raises(ValidationError, match="beta_start/beta_end apply to linear"):
        DiffusionSpec(schedule="cosine", beta_start=1e-4)
    with pytest.raises(ValidationError, match="needs learn_sigma: True"):
        ModelCard(
            arch="unet-tiny",
            channels=1,
            image_size=8,
            learn_sigma=False,
            diffusion=DiffusionSpec(variance_type="learned"),
        )


@pytest.mark.parametrize(
    "spec",
    [
        DiffusionSpec(),
        DiffusionSpec(schedule="linear", num_timesteps=400),
        DiffusionSpec(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, variance_type="fixed_large"),
        DiffusionSpec(schedule="trained", num_timesteps=3, trained_betas=[0.1, 0.2, 0.3], prediction_type="sample"),
        DiffusionSpec(prediction_type="v_prediction", clip_sample=False, thresholding=True, sample_max_value=2.0),
    ],
)
def test_scheduler_config_round_trips(spec: DiffusionSpec) -> None:
    learn_sigma = spec.resolved_variance(True).startswith("learned")
    back = diffusion_from_scheduler(json.loads(json.dumps(scheduler_config(spec, learn_sigma))), "x")
    assert back == spec.model_copy(update={"variance_type": spec.resolved_variance(learn_sigma)})


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
        ({"beta_schedule": "laplace"}, "beta_schedule 'laplace'"),
        ({"variance_type": "fixed_large_log"}, "variance_type 'fixed_large_log'"),
        ({"prediction_type": "flow"}, "prediction_type 'flow'"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr True"),
        ({"_class_name": "PNDMScheduler"}, "_class_name 'PNDMScheduler'"),
        ({"_class_name": "EulerDiscreteScheduler"}, "_class_name 'EulerDiscreteScheduler'"),
    ],
)
def test_unsupported_scheduler_configs_name_the_key(config: dict, needle: str) -> None:
    with pytest.raises(CheckpointError, match="not supported") as info:
        diffusion_from_scheduler(config, "scheduler_config.json")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_fixed_small_log_reads_as_fixed_small() -> None:
    """diffusers' fixed_small_log is the same σ² = β̃ computed through a log."""
    read = diffusion_from_scheduler({"variance_type": "fixed_small_log"}, "scheduler_config.json")
    assert read == diffusion_from_scheduler({"variance_type": "fixed_small"}, "scheduler_config.json")
    assert read.variance_type == "fixed_small"


def test_teacher_training_spec_checks_the_variance_before_training() -> None:
    from dkdm_core.spec import TeacherTrainSpec

    with pytest.raises(ValidationError, match="needs learn_sigma: False"):
        TeacherTrainSpec(diffusion=DiffusionSpec(variance_type="fixed_large"))
    spec = TeacherTrainSpec(diffusion=DiffusionSpec(variance_type="fixed_large"), model={"learn_sigma": False})
    assert spec.diffusion.build(False).variance_type == "fixed_large"
