"""Model folders and training checkpoints. Nothing here unpickles arbitrary objects.

A *model folder* is what ``dkdm sample --model`` reads and what a teacher path points to:

* ``config.json``: the :class:`ModelCard` (architecture, diffusion, data, provenance, metrics);
* ``model.safetensors``: the weights (the EMA weights for trained models).

A diffusers ``DDPMPipeline`` folder (``model_index.json``, ``unet/``, ``scheduler/``) loads too, and a
UNet exports to one. Training checkpoints (``step_XXXXXXXX/``) add ``train_state.pt``: optimiser,
EMA, generators and pool snapshot, a dict of tensors and numbers read back with
``torch.load(weights_only=True)``. Every folder is written under a temporary name and renamed into
place, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dkdm_core.methods.o2mkd import TimestepRouter
from dkdm_core.models import VECTOR_MODELS, build_model
from dkdm_core.models.unet import UNet
from dkdm_core.spec import DiffusionSpec

FORMAT = "dkdm-model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
DIFFUSERS_ARCH = "diffusers-unet2d"
ROUTER_ARCH = "o2mkd-router"
AUTOENCODER_DIR = "autoencoder"


class RouterCard(BaseModel):
    """An O2MKD model: student i (architecture ``archs[i]``) owns timesteps [edges[i], edges[i+1])."""

    model_config = ConfigDict(extra="forbid")

    archs: list[str]
    edges: list[int]


class ModelCard(BaseModel):
    """What a model folder holds: enough to rebuild the network and its diffusion."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    arch: str  # a registry name, or DIFFUSERS_ARCH for an imported diffusers UNet
    channels: int
    image_size: int
    learn_sigma: bool
    diffusion: DiffusionSpec
    data: str | None = None  # the dataset the samples should resemble, e.g. "digits"
    router: RouterCard | None = None  # O2MKD students by timestep interval (arch ROUTER_ARCH)
    # "diffusion": an ε-predicting denoiser sampled over many steps; "one-step": a BOOT student
    # g(ε, t) mapping noise straight to a sample in one call.
    generator: Literal["diffusion", "one-step"] = "diffusion"
    # Latent models: the diffusers AutoencoderKL folder the samples are decoded with. Written files
    # hold it relative to the model folder (a copy travels with every model); loaded cards hold it
    # resolved to an absolute path.
    autoencoder: str | None = None
    info: dict[str, Any] = Field(default_factory=dict)  # provenance: command, steps, metrics

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape the network works in (latent shape for latent models)."""
        arch = self.router.archs[0] if self.router else self.arch
        if arch in VECTOR_MODELS:
            return (self.channels,)
        return (self.channels, self.image_size, self.image_size)


class CheckpointError(ValueError):
    """A model folder or checkpoint that cannot be read; the message names the file."""


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_model(directory: str | Path, model: nn.Module, card: ModelCard) -> Path:
    """Write config.json and model.safetensors into ``directory`` (files replaced atomically)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if card.autoencoder is not None:
        card = card.model_copy(update={"autoencoder": _copy_autoencoder(Path(card.autoencoder), out)})
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp_weights = out / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp_weights))
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    tmp_config = out / (CONFIG_FILE + ".tmp")
    tmp_config.write_text(card.model_dump_json(indent=2))
    os.replace(tmp_config, out / CONFIG_FILE)
    return out


def _copy_autoencoder(source: Path, out: Path) -> str:
    """Put the autoencoder a latent model decodes with into its folder; returns the relative name."""
    target = out / AUTOENCODER_DIR
    if source.resolve() != target.resolve():
        if not source.is_dir():
            raise CheckpointError(f"autoencoder folder not found: {source}")
        tmp = out / (AUTOENCODER_DIR + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        _replace_dir(tmp, target)
    return AUTOENCODER_DIR


def read_card(directory: str | Path) -> ModelCard:
    """The card of a model folder; a latent model's autoencoder path comes back absolute."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model folder: {CONFIG_FILE} is missing")
    try:
        card = ModelCard.model_validate_json(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path} is not a valid dkdm model config: {exc}") from exc
    if card.autoencoder is not None and not Path(card.autoencoder).is_absolute():
        card.autoencoder = str((Path(directory) / card.autoencoder).resolve())
    return card


def build_from_card(card: ModelCard) -> nn.Module:
    """The (untrained) network a card describes: one registry model, or an O2MKD router of several."""
    if card.router is not None:
        parts = [build_model(arch, card.channels, card.image_size, card.learn_sigma) for arch in card.router.archs]
        return TimestepRouter(parts, card.router.edges)
    return build_model(card.arch, card.channels, card.image_size, card.learn_sigma)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """A model in eval mode and its card, from a dkdm model folder or a diffusers pipeline folder."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return import_diffusers(path, device)
    card = read_card(path)
    model = build_from_card(card)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_FILE}")
    load_weights(model, read_weights(weights), str(weights))
    return model.to(device).eval(), card


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or malformed one is a CheckpointError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:  # header or data cut short, hostile offsets
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-save or re-export it") from exc


def count_parameters(directory: str | Path) -> int:
    """Numbers in a model folder's weights, read from the safetensors headers only (no tensor data).

    The sampling service prices a request by it; for a diffusers folder the UNet's weights count.
    """
    path = Path(directory)
    files = [path / WEIGHTS_FILE] if (path / WEIGHTS_FILE).is_file() else sorted((path / "unet").glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no safetensors weights")
    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    shape = f.get_slice(name).get_shape()
                    total += int(torch.Size(shape).numel())
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from exc
    return total


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a one-line error naming the file, the first tensor that disagrees and both shapes."""
    expected = model.state_dict()
    for name, wanted in expected.items():  # the model's order: the first layer that disagrees is named
        if name in state and tuple(state[name].shape) != tuple(wanted.shape):
            raise CheckpointError(
                f"{source} does not fit the model in its config: tensor {name!r} has shape "
                f"{tuple(state[name].shape)} in the file, {tuple(wanted.shape)} in the model"
            )
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing from the file, first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) in the file, first {unexpected[0]!r}")
        raise CheckpointError(f"{source} does not fit the model in its config: {'; '.join(parts)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # anything the checks above do not foresee (dtype, custom hooks)
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{source} does not fit the model in its config: {first}") from exc


# diffusers interop ---------------------------------------------------------------------------------

_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear"}


def export_diffusers(model: nn.Module, card: ModelCard, directory: str | Path) -> Path:
    """Write a diffusers DDPMPipeline folder (UNet models only): loadable by ``DDPMPipeline``."""
    from diffusers import DDPMPipeline, DDPMScheduler

    if not isinstance(model, UNet):
        raise CheckpointError(f"only UNet models export to diffusers format, not {card.arch}")
    t = card.diffusion.num_timesteps
    scheduler = DDPMScheduler(
        num_train_timesteps=t,
        beta_schedule=_SCHEDULES[card.diffusion.schedule],
        beta_start=1e-4 * 1000 / t,
        beta_end=0.02 * 1000 / t,
        variance_type="learned_range" if card.learn_sigma else "fixed_small",
        clip_sample=True,
    )
    out = Path(directory)
    pipeline = DDPMPipeline(unet=model.net, scheduler=scheduler)
    pipeline.save_pretrained(str(out), safe_serialization=True)  # type: ignore[attr-defined]
    if card.autoencoder is not None:  # a latent model: its AutoencoderKL goes along as vae/
        shutil.copytree(card.autoencoder, out / "vae", dirs_exist_ok=True)
    (out / "dkdm_card.json").write_text(card.model_dump_json(indent=2))
    return out


def import_diffusers(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """A diffusers UNet2DModel + DDPMScheduler folder as a dkdm model (safetensors weights only)."""
    from diffusers import UNet2DModel

    unet_dir = directory / "unet" if (directory / "unet").is_dir() else directory
    sched_path = directory / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise CheckpointError(f"{directory} has no scheduler/scheduler_config.json")
    sched = json.loads(sched_path.read_text())
    schedule = {v: k for k, v in _SCHEDULES.items()}.get(sched.get("beta_schedule", "linear"))
    if schedule is None:
        raise CheckpointError(f"{sched_path}: beta_schedule {sched.get('beta_schedule')!r} is not supported")
    t = int(sched.get("num_train_timesteps", 1000))
    if schedule == "linear" and (
        abs(sched.get("beta_start", 1e-4) - 1e-4 * 1000 / t) > 1e-9
        or abs(sched.get("beta_end", 0.02) - 0.02 * 1000 / t) > 1e-9
    ):
        raise CheckpointError(f"{sched_path}: only the standard linear schedule (1e-4..0.02 at T=1000) is supported")
    variance = sched.get("variance_type", "fixed_small")
    if variance not in ("learned_range", "fixed_small"):
        raise CheckpointError(f"{sched_path}: variance_type {variance!r} is not supported")
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise CheckpointError(f"{sched_path}: only epsilon-prediction models are supported")
    if not any(unet_dir.glob("*.safetensors")):
        raise CheckpointError(f"{unet_dir} has no .safetensors weights (pickled .bin files are not loaded)")
    try:
        net = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # truncated, hostile or mismatched files
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{unet_dir} could not be loaded as a diffusers UNet: {first}") from exc
    learn_sigma = variance == "learned_range"
    if net.config.out_channels != net.config.in_channels * (2 if learn_sigma else 1):
        raise CheckpointError(f"{unet_dir}: out_channels does not match variance_type {variance!r}")
    model = UNet.wrap(net)
    card = ModelCard(
        arch=DIFFUSERS_ARCH,
        channels=net.config.in_channels,
        image_size=int(net.config.sample_size),
        learn_sigma=learn_sigma,
        diffusion=DiffusionSpec(schedule=schedule, num_timesteps=t),
        info={"imported_from": str(directory)},
    )
    if (directory / "vae" / "config.json").is_file():  # a latent pipeline: samples decode through its vae
        card.autoencoder = str((directory / "vae").resolve())
    return model.to(device).eval(), card


# training checkpoints ------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (a folder counts once its state is written)."""
    base = Path(root)
    if not base.is_dir():
        return []
    found = [
        p
        for p in base.glob("step_*")
        if p.is_dir() and (p / TRAIN_STATE_FILE).is_file() and not p.name.endswith((".tmp", ".old"))
    ]
    return sorted(found)


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    card: ModelCard,
    train_state: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write ``root/step_XXXXXXXX`` atomically: model folder + train_state.pt; prune to ``keep``."""
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    final = base / checkpoint_name(step)
    tmp = base / (checkpoint_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, model, card)
    torch.save(train_state, tmp / TRAIN_STATE_FILE)
    _replace_dir(tmp, final)
    for old in list_checkpoints(base)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint) / TRAIN_STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} has no {TRAIN_STATE_FILE}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: report it, never unpickle it unsafely
        raise CheckpointError(f"{path} could not be read as a dkdm training state: {exc}") from exc
