"""Model folders, diffusers export/import and training checkpoints round-trip exactly."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline
from safetensors.torch import save_file

from dkdm_core.checkpoint import (
    CheckpointError,
    ModelCard,
    count_parameters,
    export_diffusers,
    list_checkpoints,
    load_model,
    load_train_state,
    save_checkpoint,
    save_model,
)
from dkdm_core.models import build_model
from dkdm_core.spec import DiffusionSpec


def card(arch: str = "unet-tiny", learn_sigma: bool = True) -> ModelCard:
    return ModelCard(
        arch=arch, channels=1, image_size=8, learn_sigma=learn_sigma, diffusion=DiffusionSpec(), data="digits"
    )


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x, t), b.eval()(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["unet-tiny", "vit-tiny"])
def test_model_folder_round_trip(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 1, 8, True)
    save_model(tmp_path / "m", model, card(arch))
    loaded, loaded_card = load_model(tmp_path / "m")
    assert loaded_card == card(arch)
    _same_outputs(model, loaded)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_diffusers_export_loads_in_diffusers_and_back(tmp_path: Path, learn_sigma: bool) -> None:
    torch.manual_seed(1)
    model = build_model("unet-tiny", 1, 8, learn_sigma)
    export_diffusers(model, card(learn_sigma=learn_sigma), tmp_path / "pipe")
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    assert pipe.scheduler.config.variance_type == ("learned_range" if learn_sigma else "fixed_small")
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    back, back_card = load_model(tmp_path / "pipe")
    assert back_card.learn_sigma == learn_sigma
    assert back_card.diffusion == DiffusionSpec(variance_type="learned_range" if learn_sigma else "fixed_small")
    _same_outputs(model, back)


def test_vit_export_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="only UNet"):
        export_diffusers(build_model("vit-tiny", 1, 8, True), card("vit-tiny"), tmp_path / "x")


def test_diffusers_folder_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    export_diffusers(build_model("unet-tiny", 1, 8, True), card(), tmp_path / "pipe")
    for f in (tmp_path / "pipe" / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(tmp_path / "pipe")


def test_missing_and_mismatched_folders_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_model(tmp_path / "empty")
    save_model(tmp_path / "m", build_model("unet-tiny", 1, 8, True), card())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["arch"] = "vit-tiny"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid"):
        load_model(tmp_path / "m")


def test_training_checkpoints_are_atomic_pruned_and_weights_only(tmp_path: Path) -> None:
    model = build_model("mlp-small", 2, 0, True)
    c = ModelCard(arch="mlp-small", channels=2, image_size=0, learn_sigma=True, diffusion=DiffusionSpec())
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, c, {"step": step, "gen": torch.Generator().get_state()}, keep=2)
    (tmp_path / "step_00000050.tmp").mkdir()  # a crash mid-save leaves only a .tmp folder
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000030", "step_00000040"]
    assert load_train_state(list_checkpoints(tmp_path)[-1])["step"] == 40


def test_train_state_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "ck" / "train_state.pt")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_train_state(tmp_path / "ck")


def test_safetensors_with_wrong_shapes_is_a_clear_error(tmp_path: Path) -> None:
    save_model(tmp_path / "m", build_model("unet-tiny", 1, 8, True), card())
    save_file({"net.conv_in.weight": torch.zeros(3, 3)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit"):
        load_model(tmp_path / "m")


def test_a_config_weights_mismatch_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    save_model(tmp_path / "m", build_model("unet-tiny", 1, 8, True), card())
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["learn_sigma"] = False  # the output layer then has half the channels of the saved one
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "m")
    message = str(info.value)
    expected = dict(build_model("unet-tiny", 1, 8, False).state_dict())
    saved = dict(build_model("unet-tiny", 1, 8, True).state_dict())
    name = next(k for k in saved if saved[k].shape != expected[k].shape)
    assert f"tensor {name!r}" in message and "model.safetensors" in message
    assert str(tuple(saved[name].shape)) in message and str(tuple(expected[name].shape)) in message


def _corrupt(weights: Path, how: str) -> None:
    data = weights.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    if how == "truncated header":
        weights.write_bytes(data[: 8 + header_len // 2])
    elif how == "truncated data":
        weights.write_bytes(data[: len(data) - 100])
    elif how == "huge header length":
        weights.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    elif how == "offsets past the end":
        header = json.dumps({"w": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}}).encode()
        weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    elif how == "not json":
        weights.write_bytes(struct.pack("<Q", 12) + b"{'not json'}" + data[8 + header_len :])
    else:
        weights.write_bytes(b"")


CORRUPTIONS = ["truncated header", "truncated data", "huge header length", "offsets past the end", "not json", "empty"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_a_corrupt_or_hostile_safetensors_file_is_a_clear_error_naming_it(tmp_path: Path, how: str) -> None:
    save_model(tmp_path / "m", build_model("unet-tiny", 1, 8, True), card())
    weights = tmp_path / "m" / "model.safetensors"
    _corrupt(weights, how)
    with pytest.raises(CheckpointError, match=re.escape(f"{weights} is not a readable safetensors file")):
        load_model(tmp_path / "m")
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        count_parameters(tmp_path / "m")


def test_a_corrupt_diffusers_unet_is_a_clear_error_naming_its_folder(tmp_path: Path) -> None:
    export_diffusers(build_model("unet-tiny", 1, 8, True), card(), tmp_path / "pipe")
    (weights,) = (tmp_path / "pipe" / "unet").glob("*.safetensors")
    _corrupt(weights, "truncated data")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "pipe" / "unet"))):
        load_model(tmp_path / "pipe")


def test_count_parameters_reads_only_the_headers(tmp_path: Path) -> None:
    model = build_model("unet-tiny", 1, 8, True)
    save_model(tmp_path / "m", model, card())
    assert count_parameters(tmp_path / "m") == sum(t.numel() for t in model.state_dict().values())
