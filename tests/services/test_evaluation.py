"""The bundled assets are package data: found wherever the package is, from any working folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.control_plane.settings import Settings
from services.evaluation import CLASSIFIER_DIR, bundled_assets, load_classifier, resolve_path


def test_assets_names_resolve_to_the_package_data_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no checkout here
    teacher = resolve_path("assets/teachers/digits")
    assert teacher == bundled_assets() / "teachers" / "digits" and (teacher / "model.safetensors").is_file()
    assert CLASSIFIER_DIR.is_relative_to(bundled_assets()) and load_classifier() is not None
    assert resolve_path("assets/teachers/none") == Path("assets/teachers/none")  # the error names what was given
    assert resolve_path("elsewhere/digits") == Path("elsewhere/digits")  # only assets/... is looked up
    own = tmp_path / "assets" / "teachers" / "digits"
    own.mkdir(parents=True)
    assert resolve_path("assets/teachers/digits") == Path("assets/teachers/digits")  # a real path wins


def test_control_plane_defaults_do_not_assume_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("DKDM_MODEL_ROOTS", "DKDM_RUNS_DIR"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    assert settings.model_roots == [bundled_assets(), tmp_path.resolve() / "runs"]
    assert settings.runs_dir == tmp_path.resolve() / "runs" / "jobs"
