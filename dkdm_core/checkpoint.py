"""Model folders and training checkpoints. Nothing here unpickles arbitrary objects.

A *model folder* is what ``dkdm sample --model`` reads and what a teacher path points to:

* ``config.json``: the :class:`ModelCard` (architecture, diffusion, data, provenance, metrics);
* ``model.safetensors``: the weights (the EMA weights for trained models).

A diffusers pipeline folder loads too: ``DDPMPipeline``/``DDIMPipeline`` (``model_index.json``,
``unet/``, ``scheduler/``), ``LDMPipeline`` (+ ``vqvae/``) and ``DiTPipeline`` (``transformer/``,
``vae/``); a UNet exports to one. Training checkpoints (``step_XXXXXXXX/``) add ``train_state.pt``: optimiser,
EMA, generators and pool snapshot, a dict of tensors and numbers read back with
``torch.load(weights_only=True)``. Every folder is written under a temporary name and renamed into
place, so a crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dkdm_core.imports import DIFFUSERS
from dkdm_core.methods.o2mkd import TimestepRouter
from dkdm_core.models import VECTOR_MODELS, build_model
from dkdm_core.models.unet import UNet
from dkdm_core.spec import DiffusionSpec

FORMAT = "dkdm-model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAIN_STATE_FILE = "train_state.pt"
DIFFUSERS_ARCH = "diffusers-unet2d"
DIFFUSERS_DIT_ARCH = "diffusers-dit"
DIFFUSERS_ARCHS = (DIFFUSERS_ARCH, DIFFUSERS_DIT_ARCH)  # imported networks, rebuilt from their own configs
# The w an imported DiT samples with unless told otherwise: DiTPipeline's default guidance_scale.
DIT_GUIDANCE_SCALE = 4.0
ROUTER_ARCH = "o2mkd-router"
AUTOENCODER_DIR = "autoencoder"


class RouterCard(BaseModel):
    """An O2MKD model: student i (architecture ``archs[i]``) owns timesteps [edges[i], edges[i+1])."""

    model_config = ConfigDict(extra="forbid")

    archs: list[str]
    edges: list[int]


class ClassCard(BaseModel):
    """A class-conditional model: labels 0..num-1, and whether it knows the null class of guidance."""

    model_config = ConfigDict(extra="forbid")

    num: int = Field(ge=1)  # class labels 0..num-1 (digits: 10)
    # True: label ``num`` means "no label" (trained with label dropout), so classifier-free guidance
    # works. A diffusers UNet with num_class_embeds imports without one unless dkdm exported it.
    null: bool = False
    # w of ε_u + w(ε_c − ε_u) that samples are drawn with unless a request says otherwise; 1: none.
    guidance_scale: float = Field(1.0, ge=0.0, le=100.0)

    @property
    def embeds(self) -> int:
        """Rows of the network's label embedding: the classes and the null class."""
        return self.num + (1 if self.null else 0)

    @property
    def null_label(self) -> int | None:
        return self.num if self.null else None

    @model_validator(mode="after")
    def _guidance_needs_null(self) -> ClassCard:
        if self.guidance_scale != 1.0 and not self.null:
            raise ValueError("classes.guidance_scale other than 1 needs a model with a null class (null: true)")
        return self


class ModelCard(BaseModel):
    """What a model folder holds: enough to rebuild the network and its diffusion."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    arch: str  # a registry name, or one of DIFFUSERS_ARCHS for an imported diffusers UNet or DiT
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
    classes: ClassCard | None = None  # class-conditional models; None: unconditional
    info: dict[str, Any] = Field(default_factory=dict)  # provenance: command, steps, metrics

    @model_validator(mode="after")
    def _variance_fits_the_network(self) -> ModelCard:
        self.diffusion.check_variance(self.learn_sigma)
        return self

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
    """The card of a model folder (or of a diffusers pipeline folder, from its configs); a latent
    model's autoencoder path comes back absolute."""
    if is_diffusers_folder(Path(directory)):
        return diffusers_card(Path(directory))
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
    embeds = card.classes.embeds if card.classes is not None else 0
    if card.router is not None:
        if embeds:
            raise ValueError("O2MKD routers are not class-conditional")
        parts = [build_model(arch, card.channels, card.image_size, card.learn_sigma) for arch in card.router.archs]
        return TimestepRouter(parts, card.router.edges)
    return build_model(card.arch, card.channels, card.image_size, card.learn_sigma, embeds)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """A model in eval mode and its card, from a dkdm model folder or a diffusers pipeline folder."""
    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"model folder not found: {path}")
    if is_diffusers_folder(path):
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

    The sampling service prices a request by it; for a diffusers folder the denoiser's weights count.
    """
    path = Path(directory)
    denoiser = path / "transformer" if (path / "transformer").is_dir() else path / "unet"
    files = [path / WEIGHTS_FILE] if (path / WEIGHTS_FILE).is_file() else sorted(denoiser.glob("*.safetensors"))
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

_SCHEDULES = {"cosine": "squaredcos_cap_v2", "linear": "linear", "scaled_linear": "scaled_linear"}
# Scheduler classes whose config describes a DDPM-trained network (DDIM only samples it differently).
_SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
# fixed_small_log is fixed_small computed through a log; fixed_large_log has diffusers take the square
# root of log β (NaN), so it is refused.
_VARIANCE_ALIASES = {"fixed_small_log": "fixed_small"}


def scheduler_config(diffusion: DiffusionSpec, learn_sigma: bool) -> dict[str, Any]:
    """The diffusers DDPMScheduler config of a card's diffusion: the same β's, variance and parameterisation."""
    t = diffusion.num_timesteps
    config: dict[str, Any] = {
        "num_train_timesteps": t,
        "variance_type": diffusion.resolved_variance(learn_sigma),
        "prediction_type": diffusion.prediction_type,
        "clip_sample": diffusion.clip_sample,
        "clip_sample_range": diffusion.clip_sample_range,
        "thresholding": diffusion.thresholding,
        "dynamic_thresholding_ratio": diffusion.dynamic_thresholding_ratio,
        "sample_max_value": diffusion.sample_max_value,
    }
    if diffusion.schedule == "trained":
        return {**config, "trained_betas": list(diffusion.trained_betas or [])}
    config["beta_schedule"] = _SCHEDULES[diffusion.schedule]
    # diffusers ignores the end points for squaredcos_cap_v2; for linear ones they are the project's default.
    config["beta_start"] = diffusion.beta_start if diffusion.beta_start is not None else 1e-4 * 1000 / t
    config["beta_end"] = diffusion.beta_end if diffusion.beta_end is not None else 0.02 * 1000 / t
    return config


def diffusion_from_scheduler(sched: dict[str, Any], source: str) -> DiffusionSpec:
    """A DDPM/DDIM scheduler config as a card's DiffusionSpec; what is not supported is one clear error.

    Keys that only shape diffusers' own sampling grid (timestep_spacing, steps_offset, set_alpha_to_one)
    are not read: the pool walks the project's chain (``pool.chain_steps``) over the same β's.
    """

    def refuse(key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: {key} {sched.get(key)!r} is not supported ({why})")

    if sched.get("_class_name", "DDPMScheduler") not in _SCHEDULER_CLASSES:
        raise refuse("_class_name", "a DDPMScheduler or DDIMScheduler config is needed")
    if sched.get("rescale_betas_zero_snr"):
        raise refuse("rescale_betas_zero_snr", "zero terminal SNR makes x_0 unrecoverable at t = T")
    t = int(sched.get("num_train_timesteps", 1000))
    fields: dict[str, Any] = {"num_timesteps": t}
    if sched.get("trained_betas") is not None:
        fields.update(schedule="trained", trained_betas=[float(b) for b in sched["trained_betas"]])
    else:
        name = sched.get("beta_schedule", "linear")
        schedule = {v: k for k, v in _SCHEDULES.items()}.get(name)
        if schedule is None:
            raise refuse("beta_schedule", "use linear, scaled_linear, squaredcos_cap_v2 or trained_betas")
        fields["schedule"] = schedule
        if schedule != "cosine":
            start, end = float(sched.get("beta_start", 1e-4)), float(sched.get("beta_end", 0.02))
            if not (start == 1e-4 * 1000 / t and end == 0.02 * 1000 / t and schedule == "linear"):
                fields.update(beta_start=start, beta_end=end)  # the project's default needs no mention
    variance = sched.get("variance_type", "fixed_small")  # DDIM configs have none: a DDPM's β̃
    variance = _VARIANCE_ALIASES.get(variance, variance)
    if variance not in ("fixed_small", "fixed_large", "learned", "learned_range"):
        raise refuse("variance_type", "use fixed_small, fixed_large, learned or learned_range")
    prediction = sched.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise refuse("prediction_type", "use epsilon, v_prediction or sample")
    fields.update(variance_type=variance, prediction_type=prediction)
    for key in ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value"):
        if key in sched:
            fields[key] = sched[key]
    try:
        return DiffusionSpec(**fields)
    except ValueError as exc:
        first = str(exc).splitlines()[-1].strip()
        raise CheckpointError(f"{source}: {first}") from exc


def export_diffusers(model: nn.Module, card: ModelCard, directory: str | Path) -> Path:
    """Write a diffusers pipeline folder (UNet models only): loadable by ``DDPMPipeline``, or by
    ``LDMPipeline`` for a student of a VQ-latent teacher (its VQModel goes along as ``vqvae/``).

    A class-conditional UNet exports as a ``UNet2DModel`` with ``num_class_embeds`` (the null class
    is its last row); ``dkdm_card.json`` says which row that is, so it imports back with guidance.
    ``DDPMPipeline`` itself passes no labels: call the UNet with ``class_labels`` to sample by class.
    """
    with DIFFUSERS:
        from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, LDMPipeline

    from dkdm_core.latent import autoencoder_class, load_autoencoder

    if not isinstance(model, UNet):
        raise CheckpointError(f"only UNet models export to diffusers format, not {card.arch}")
    config = scheduler_config(card.diffusion, card.learn_sigma)
    scheduler: DDPMScheduler | DDIMScheduler = DDPMScheduler(**config)
    out = Path(directory)
    if card.autoencoder is not None and autoencoder_class(card.autoencoder) == "VQModel":
        vqvae = load_autoencoder(card.autoencoder)
        if not card.learn_sigma:
            # LDMPipeline samples with DDIM (η = 0 by default), as the LDM teachers it comes from: the
            # same β's make the same x̂_0, and a pipeline that draws exactly what `dkdm sample --sampler
            # ddim` draws. A learned variance needs DDPM's step, which reads it.
            scheduler = DDIMScheduler(**{k: v for k, v in config.items() if k != "variance_type"})
        ldm = LDMPipeline(vqvae=vqvae, unet=model.net, scheduler=scheduler)
        ldm.save_pretrained(str(out), safe_serialization=True)  # type: ignore[attr-defined]
    else:
        pipeline = DDPMPipeline(unet=model.net, scheduler=scheduler)
        pipeline.save_pretrained(str(out), safe_serialization=True)  # type: ignore[attr-defined]
        if card.autoencoder is not None:  # a KL-latent model: its AutoencoderKL goes along as vae/
            shutil.copytree(card.autoencoder, out / "vae", dirs_exist_ok=True)
    (out / "dkdm_card.json").write_text(card.model_dump_json(indent=2))
    return out


# The diffusers pipelines a teacher folder may hold: the denoiser's and the autoencoder's subfolders.
# DDPM/DDIM pipelines carry no autoencoder, but a dkdm export of a latent model adds ``vae/``.
_PIPELINE_PARTS: dict[str | None, tuple[str, str]] = {
    None: ("unet", "vae"),
    "DDPMPipeline": ("unet", "vae"),
    "DDIMPipeline": ("unet", "vae"),
    "LDMPipeline": ("unet", "vqvae"),
    "DiTPipeline": ("transformer", "vae"),
}


def is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file()


def _pipeline_class(directory: Path) -> str | None:
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        return None
    name = _read_json(index_path).get("_class_name")
    if name not in _PIPELINE_PARTS:
        supported = ", ".join(str(p) for p in _PIPELINE_PARTS if p)
        raise CheckpointError(f"{index_path}: {name} folders are not supported ({supported})")
    return name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _net_config(cls: type, folder: Path) -> dict[str, Any]:
    """A diffusers model's config.json over its class's defaults (saved configs omit none, hand-written may)."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    params = inspect.signature(cls).parameters.values()
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    return defaults | _read_json(path)


def _denoiser_folder(directory: Path, pipeline: str | None) -> Path:
    name = _PIPELINE_PARTS[pipeline][0]
    folder = directory / name if (directory / name).is_dir() else directory
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder} has no .safetensors weights (pickled .bin files are not loaded)")
    return folder


def diffusers_card(directory: Path) -> ModelCard:
    """The card of a diffusers pipeline folder, from its JSON configs alone (no weights are read).

    DDPM/DDIM and LDM pipelines: a ``UNet2DModel``; DiT: a ``DiTTransformer2DModel``, class-conditional
    with a null class. The scheduler config goes through ``diffusion_from_scheduler`` (other scheduler
    classes are refused naming theirs); the autoencoder (``vae/`` AutoencoderKL, ``vqvae/`` VQModel) is
    what samples decode with.
    """
    with DIFFUSERS:
        from diffusers import DiTTransformer2DModel, UNet2DModel

    pipeline = _pipeline_class(directory)
    sched_path = directory / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise CheckpointError(f"{directory} has no scheduler/scheduler_config.json")
    sched = _read_json(sched_path)
    diffusion = diffusion_from_scheduler(sched, str(sched_path))
    folder = _denoiser_folder(directory, pipeline)
    if pipeline == "DiTPipeline":
        config = _net_config(DiTTransformer2DModel, folder)
        channels = int(config["in_channels"])
        out = int(config["out_channels"] or channels)
        if "variance_type" not in sched and out == 2 * channels:
            # A scheduler config that names no variance (DDIM's) over a 2C-output DiT: the network was
            # trained with Nichol & Dhariwal's learned-range Σ (DiT Sec. 3.1), which the pool's
            # ancestral steps then use, and the student learns with the full DKDM objective.
            diffusion = diffusion.model_copy(update={"variance_type": "learned_range"})
        classes: ClassCard | None = ClassCard(
            num=int(config["num_embeds_ada_norm"]), null=True, guidance_scale=DIT_GUIDANCE_SCALE
        )
        arch, size = DIFFUSERS_DIT_ARCH, int(config["sample_size"])
    else:
        config = _net_config(UNet2DModel, folder)
        channels, out = int(config["in_channels"]), int(config["out_channels"])
        classes = _diffusers_classes(config, directory, folder)
        arch, size = DIFFUSERS_ARCH, int(config["sample_size"])
    variance = diffusion.resolved_variance(False)
    learn_sigma = variance in ("learned", "learned_range")
    # DiTPipeline drops a 2C network's variance half when its scheduler fixes the variance; a UNet must fit.
    fits = out == channels * (2 if learn_sigma else 1) or (arch == DIFFUSERS_DIT_ARCH and out == 2 * channels)
    if not fits:
        raise CheckpointError(f"{folder}: out_channels {out} does not match variance_type {variance!r}")
    info: dict[str, Any] = {"imported_from": str(directory)}
    names = _read_json(directory / "model_index.json").get("id2label") if pipeline == "DiTPipeline" else None
    if isinstance(names, dict):  # DiTPipeline's class names (ImageNet's for facebook/DiT-*)
        info["class_names"] = {str(k): str(v) for k, v in names.items()}
    card = ModelCard(
        arch=arch,
        channels=channels,
        image_size=size,
        learn_sigma=learn_sigma,
        diffusion=diffusion,
        classes=classes,
        info=info,
    )
    ae_dir = directory / _PIPELINE_PARTS[pipeline][1]
    if pipeline in ("LDMPipeline", "DiTPipeline") and not (ae_dir / "config.json").is_file():
        raise CheckpointError(f"{directory}: a {pipeline} folder needs its autoencoder in {ae_dir.name}/")
    if (ae_dir / "config.json").is_file():  # a latent pipeline: samples decode through its autoencoder
        card.autoencoder = str(ae_dir.resolve())
    return card


def import_diffusers(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """A diffusers pipeline folder (DDPM, DDIM, LDM, DiT) as a dkdm model (safetensors weights only)."""
    with DIFFUSERS:
        from diffusers import DiTTransformer2DModel, UNet2DModel

        from dkdm_core.models.diffusers_dit import DiffusersDiT

    card = diffusers_card(directory)
    pipeline = _pipeline_class(directory)
    folder = _denoiser_folder(directory, pipeline)
    cls = DiTTransformer2DModel if card.arch == DIFFUSERS_DIT_ARCH else UNet2DModel
    try:
        net = cls.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:  # truncated, hostile or mismatched files
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{folder} could not be loaded as a diffusers {cls.__name__}: {first}") from exc
    model: nn.Module
    if card.arch == DIFFUSERS_DIT_ARCH:
        model = DiffusersDiT(net, card.channels * (2 if card.learn_sigma else 1))
    else:
        model = UNet.wrap(net)
    return model.to(device).eval(), card


def _diffusers_classes(config: dict[str, Any], directory: Path, unet_dir: Path) -> ClassCard | None:
    """The classes of a diffusers UNet: ``num_class_embeds`` labels, no null class unless dkdm exported it."""
    if config.get("class_embed_type") is not None:
        raise CheckpointError(
            f"{unet_dir}: class_embed_type {config['class_embed_type']!r} is not supported (use num_class_embeds)"
        )
    embeds = config.get("num_class_embeds")
    if embeds is None:
        return None
    exported = directory / "dkdm_card.json"
    if exported.is_file():  # a dkdm export: its card says whether the last row is the null class
        try:
            card = json.loads(exported.read_text()).get("classes")
            if card is not None:
                classes = ClassCard.model_validate(card)
                if classes.embeds == embeds:
                    return classes
        except ValueError as exc:
            raise CheckpointError(f"{exported} is not a valid dkdm card: {exc}") from exc
    return ClassCard(num=int(embeds))


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
