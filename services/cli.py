"""The ``dkdm`` command: teacher | autoencoder train | distill | sample | eval | export | classifier train | serve
| jobs.

Errors a user can cause (missing files, bad configs, wrong shapes, unknown names) end in one line
``dkdm: error: ...`` and exit status 2, never a traceback. A service that fails under us (Redis, Ray)
ends in one line naming it, with exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ValidationError

from dkdm_core.checkpoint import CheckpointError, export_diffusers, load_model
from dkdm_core.data import from_uint8_nhwc, to_uint8_nhwc
from dkdm_core.runtime import pick_device
from dkdm_core.sampling import draw, sampling_steps
from dkdm_core.spec import DistillSpec, TeacherTrainSpec, load_yaml, set_dotted
from services.client import Client, ClientError, JobView

log = logging.getLogger("dkdm")


class UsageError(Exception):
    """A mistake in what the user asked for; reported in one line."""


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        parts.append(f"{where}: {err['msg']}")
    return "invalid config: " + "; ".join(parts)


def apply_sets(data: dict[str, Any], items: list[str] | None) -> dict[str, Any]:
    """``--set a.b=value`` overrides (values read as YAML), for ``dkdm`` and ``python -m services.engine``."""
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:  # a NUL byte, a stray tab or quote: name the key, not a traceback
            raise ValueError(f"--set {key}: the value is not valid YAML: {getattr(exc, 'problem', exc)}") from exc
        set_dotted(data, key, value)
    return data


def _load_spec(cls: type[BaseModel], args: argparse.Namespace) -> Any:
    data = apply_sets(load_yaml(args.config) if args.config else {}, args.set)
    for key in ("steps", "out", "engine"):
        value = getattr(args, key, None)
        if value is not None:
            data[key] = value
    if getattr(args, "device", None) is not None:
        set_dotted(data, "runtime.device", args.device)
    return cls.model_validate(data)


def _print_result(kind: str, result: Any) -> None:
    print(f"{kind} finished: {result.steps} steps in {result.out}")
    print(f"  model:    {result.out}/model.safetensors (+ config.json)")
    if result.grid:
        print(f"  samples:  {result.grid}")
    print(f"  metrics:  {result.out}/metrics.json")
    shown = {k: round(v, 4) for k, v in result.metrics.items() if k in ("digits_fd", "digits_is", "train_seconds")}
    print(f"  {json.dumps(shown)}")


def cmd_teacher_train(args: argparse.Namespace) -> None:
    from services.local_engine import train_teacher

    spec = _load_spec(TeacherTrainSpec, args)
    _print_result("teacher training", train_teacher(spec, progress=not args.quiet))


def cmd_autoencoder_train(args: argparse.Namespace) -> None:
    from services.local_engine import make_autoencoder

    if args.steps < 1:
        raise UsageError("--steps must be at least 1")
    info = make_autoencoder(args.out, args.steps, args.latent_channels, args.seed)
    print(f"autoencoder saved to {args.out} (diffusers AutoencoderKL): {json.dumps(info)}")


def cmd_distill(args: argparse.Namespace) -> None:
    spec = _load_spec(DistillSpec, args)
    if spec.engine == "ray":
        from services.engine import distill_ray

        _print_result("distillation", distill_ray(spec, progress=not args.quiet))
        return
    from services.local_engine import distill_local

    _print_result("distillation", distill_local(spec, progress=not args.quiet))


def _model_dir(path: str) -> Path:
    """``assets/...`` names the bundled models wherever the package is installed."""
    from services.evaluation import resolve_path

    return resolve_path(path)


def cmd_sample(args: argparse.Namespace) -> None:
    if args.num < 1:
        raise UsageError("--num must be at least 1")
    if not args.out.endswith(".npz"):
        raise UsageError("--out must name a .npz file")
    model, card = load_model(_model_dir(args.model), pick_device(args.device))
    if card.classes is None and (args.class_label is not None or args.guidance_scale is not None):
        raise UsageError(f"{args.model} is not class-conditional: --class and --guidance-scale do not apply")
    try:
        samples = draw(
            model,
            card,
            args.num,
            args.seed,
            args.steps,
            args.sampler,
            args.batch_size,
            labels=args.class_label,
            guidance_scale=args.guidance_scale,
        )
    except ValueError as exc:  # a class out of range, guidance for a model without a null class
        raise UsageError(str(exc)) from exc
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 4:
        np.savez(out, arr_0=to_uint8_nhwc(samples))
    else:
        np.savez(out, arr_0=samples.numpy())
    print(f"wrote {args.num} samples to {out}")
    if args.grid:
        from services.images import save_grid

        if samples.ndim != 4:
            raise UsageError("--grid needs image samples")
        print(f"wrote grid to {save_grid(samples[:100], args.grid)}")


def _read_npz_images(path: str) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"samples file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as data:
            if "arr_0" not in data:
                raise UsageError(f"{p} has no arr_0 array")
            arr = data["arr_0"]
    except (ValueError, OSError) as exc:
        raise UsageError(f"{p} is not a readable .npz file: {exc}") from exc
    images = from_uint8_nhwc(arr)
    if tuple(images.shape[1:]) != (1, 8, 8):
        raise UsageError(f"{p}: digits metrics need 8x8 grey images (N, 8, 8, 1), got {arr.shape}")
    return images


def cmd_eval(args: argparse.Namespace) -> None:
    from services.evaluation import digits_evaluator

    if bool(args.samples) == bool(args.model):
        raise UsageError("give exactly one of --samples FILE.npz or --model DIR")
    if args.samples:
        images = _read_npz_images(args.samples)
        metrics: dict[str, float] = {}
    else:
        model, card = load_model(_model_dir(args.model), pick_device(args.device))
        if card.data != "digits" and card.sample_shape != (1, 8, 8):
            raise UsageError(f"digits metrics need a model of 8x8 grey images, got shape {card.sample_shape}")
        images = draw(model, card, args.num, args.seed, args.steps, args.sampler)
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise UsageError(f"digits metrics need 8x8 grey images, the model draws {tuple(images.shape[1:])}")
        metrics = {"sample_steps": float(sampling_steps(card, args.steps))}
    metrics.update(digits_evaluator().evaluate(images))
    if args.inception:
        from services.inception import inception_fid

        metrics["inception_fid"] = inception_fid(images, args.inception)
    text = json.dumps(metrics, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def cmd_export(args: argparse.Namespace) -> None:
    model, card = load_model(_model_dir(args.model))
    out = export_diffusers(model, card, args.out)
    print(f"exported a diffusers DDPMPipeline to {out}")


def cmd_classifier_train(args: argparse.Namespace) -> None:
    from services.evaluation import CLASSIFIER_DIR, train_and_save_classifier

    out = Path(args.out) if args.out else CLASSIFIER_DIR
    info = train_and_save_classifier(out, seed=args.seed, epochs=args.epochs)
    print(f"classifier saved to {out}: {json.dumps(info)}")


def cmd_serve_api(args: argparse.Namespace) -> None:
    from services.control_plane.app import serve

    serve(args.host, args.port)


# The sampling settings a flag sets, named by their flag in errors.
SAMPLING_FLAGS = {"sampling_device": "--device", "sampling_gpus_per_replica": "--gpus-per-replica"}


def _sampling_settings(args: argparse.Namespace, **fields: Any) -> Any:
    """The sampling settings: ``DKDM_*`` variables, then the flags given; a bad value is one line naming
    its flag (or variable)."""
    from services.serving.settings import SamplingSettings

    given = {"sampling_device": args.device, "sampling_gpus_per_replica": args.gpus_per_replica}
    try:
        return SamplingSettings(**{k: v for k, v in given.items() if v is not None}, **fields)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            for field, flag in SAMPLING_FLAGS.items():
                msg = msg.replace(field, flag)
            if err["loc"]:  # a field's own check: name its flag and variable
                field = str(err["loc"][0])
                variable = f"DKDM_{field.upper()}"
                msg = (
                    f"{SAMPLING_FLAGS[field]} ({variable}): {msg}" if field in SAMPLING_FLAGS else f"{variable}: {msg}"
                )
            parts.append(msg)
        raise UsageError("; ".join(parts)) from None


def cmd_serve_sampling(args: argparse.Namespace) -> None:
    import ray

    from services.jobs.store import ModelRegistry, connect
    from services.serving.app import deploy

    settings = _sampling_settings(args)
    if not settings.redis_url:
        raise UsageError("the sampling service reads the model registry from Redis: set DKDM_REDIS_URL")
    ModelRegistry(connect(settings.redis_url)).all()  # fail here, in one line, if Redis is not there
    if settings.api_token is None:
        log.warning("DKDM_API_TOKEN is not set: every sampling request will be refused (401)")
    # WARNING: Ray's connection notes would otherwise come before (and around) a one-line error.
    ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), namespace="dkdm", logging_level=logging.WARNING)
    deploy(settings, args.host, args.port)
    print(f"sampling service deployed: http://{args.host}:{args.port}/v1/models/{{name}}/samples")


def cmd_up(args: argparse.Namespace) -> None:
    from services.up import StartError, UpOptions, run

    ports = {k: getattr(args, k) for k in ("api_port", "sampling_port", "redis_port", "dashboard_port")}
    if any(not 0 <= p < 65536 for p in ports.values()) or (args.num_cpus is not None and args.num_cpus < 1):
        raise UsageError("ports must be 0 (a free one) to 65535, --num-cpus at least 1")
    _sampling_settings(args, api_token=None)  # bad device flags: one line before anything starts
    options = UpOptions(
        Path(args.data),
        args.host,
        num_cpus=args.num_cpus,
        token=args.token,
        sampling_device=args.device,
        gpus_per_replica=args.gpus_per_replica,
        **ports,
    )
    try:
        run(options, announce=lambda line: print(line, flush=True))
    except StartError as exc:  # a part that could not start: a service failing under us, status 1
        print(f"dkdm: error: {_one_line(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML job spec")
    p.add_argument("--steps", type=int, help="override the number of optimiser steps")
    p.add_argument("--out", help="output folder (resumes from its checkpoints if present)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec field, e.g. pool.rho=1.0")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _device_arg(p, default=None)


def _device_arg(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    p.add_argument(
        "--device",
        default=default,
        help="auto (a GPU if there is one), cpu, cuda or cuda:N (sets runtime.device of a spec)",
    )


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--sampler", choices=["iddpm", "ddim"], default="iddpm", help="default: iddpm")
    p.add_argument("--seed", type=int, default=0)
    _device_arg(p)


def _add_training(sub: Any) -> None:
    """teacher train, autoencoder train, distill."""
    teacher = sub.add_parser("teacher", help="teacher models").add_subparsers(dest="teacher_command", required=True)
    p = teacher.add_parser("train", help="train a teacher on a bundled dataset with L_hybrid")
    _config_args(p)
    p.set_defaults(func=cmd_teacher_train)

    ae = sub.add_parser("autoencoder", help="latent space").add_subparsers(dest="ae_command", required=True)
    p = ae.add_parser("train", help="train a small diffusers AutoencoderKL on the bundled digits")
    p.add_argument("--out", required=True, help="output folder (diffusers format, safetensors)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--latent-channels", type=int, default=3, help="8x8 digits -> C x 4 x 4 latents")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_autoencoder_train)

    p = sub.add_parser("distill", help="distill a student from a teacher without data (DKDM, O2MKD, BOOT)")
    _config_args(p)
    p.add_argument("--engine", choices=["local", "ray"], help="override the engine")
    p.set_defaults(func=cmd_distill)


def _add_models(sub: Any) -> None:
    """sample, eval, export, classifier train."""
    p = sub.add_parser("sample", help="draw samples from a model folder into an .npz (uint8 NHWC, arr_0)")
    p.add_argument("--model", required=True, help="model folder (dkdm or diffusers format)")
    p.add_argument("--num", type=int, required=True, help="number of samples")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--grid", help="also write a PNG grid of the first 100")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--class",
        dest="class_label",
        type=int,
        help="class-conditional models: the class of every sample (default: each class in turn)",
    )
    p.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance scale w (default: the model card's; 1: none)"
    )
    _sampling_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="digits Fréchet distance and IS analogue of samples or a model")
    p.add_argument("--samples", help=".npz of uint8 NHWC images (arr_0)")
    p.add_argument("--model", help="model folder to sample from")
    p.add_argument("--num", type=int, default=1000, help="samples to draw with --model")
    p.add_argument("--inception", help="local TorchScript Inception feature extractor for FID")
    p.add_argument("--out", help="also write the metrics JSON here")
    _sampling_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a UNet model folder as a diffusers DDPMPipeline")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    clf = sub.add_parser("classifier", help="the digits metric classifier").add_subparsers(
        dest="clf_command", required=True
    )
    p = clf.add_parser("train", help="train the digits classifier used by `dkdm eval`")
    p.add_argument("--out", help="output folder (default: the bundled dkdm_core/assets/classifier/digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.set_defaults(func=cmd_classifier_train)


def _add_services(sub: Any) -> None:
    """serve api, serve sampling, up."""
    srv = sub.add_parser("serve", help="the control plane API and the sampling service").add_subparsers(
        dest="serve_command", required=True
    )
    for name, help_, port, func in (
        ("api", "run the control plane (FastAPI; settings from DKDM_* variables)", 8080, cmd_serve_api),
        ("sampling", "deploy the Ray Serve sampling app on RAY_ADDRESS's cluster", 8000, cmd_serve_sampling),
    ):
        p = srv.add_parser(name, help=help_)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=port)
        p.set_defaults(func=func)
        if name == "sampling":
            _sampling_device_args(p)

    p = sub.add_parser("up", help="the whole service on this machine: Redis, Ray, control plane, sampling")
    p.add_argument("--data", default="dkdm-data", help="folder of the job records (Redis) and runs")
    p.add_argument("--host", default="127.0.0.1", help="where the control plane and sampling listen")
    for flag, port in (("api", 8080), ("sampling", 8000), ("redis", 0), ("dashboard", 8265)):
        p.add_argument(f"--{flag}-port", type=int, default=port, help=f"default {port}; 0: a free port")
    p.add_argument("--num-cpus", type=int, help="Ray's logical CPUs (default: the cores, at least 4)")
    p.add_argument("--token", help="the API token (default: DKDM_API_TOKEN, else one saved in --data)")
    _sampling_device_args(p)
    p.set_defaults(func=cmd_up)


def _sampling_device_args(p: argparse.ArgumentParser) -> None:
    """Where sampler replicas run; the defaults are the DKDM_SAMPLING_* variables, else auto and 0."""
    p.add_argument(
        "--device",
        help="sampler replicas' device: auto (a GPU when Ray gives the replica one), cpu, cuda or cuda:N "
        "(default: DKDM_SAMPLING_DEVICE, else auto)",
    )
    p.add_argument(
        "--gpus-per-replica",
        type=float,
        help="GPUs Ray reserves per sampler replica, fractions allowed "
        "(default: DKDM_SAMPLING_GPUS_PER_REPLICA, else 1 for cuda, 0 otherwise)",
    )


# dkdm jobs: a thin front of services.client (DKDM_API_URL, DKDM_API_TOKEN, DKDM_SAMPLE_URL) --------


# Spec fields that describe a local run; over the API the service chooses them (runs_dir/<id>, ray).
SERVICE_CHOSEN = ("out", "engine")


def _client() -> Client:
    return Client.from_env()


def _job_line(view: JobView) -> str:
    done = f"{view.step}/{view.total_steps}"
    return f"{view.id}  {view.state:<9}  {done:>11}  {view.progress:>4.0%}  {view.error}".rstrip()


def _print_view(view: JobView, as_json: bool) -> None:
    if as_json:
        print(view.model_dump_json(indent=2))
        return
    print(_job_line(view))
    for name, value in sorted(view.metrics.items()):
        print(f"  {name}: {value:.6g}")


def cmd_jobs_submit(args: argparse.Namespace) -> None:
    data = load_yaml(args.config) if args.config else {}
    dropped = [k for k in SERVICE_CHOSEN if data.pop(k, None) is not None]
    if dropped:  # every bundled config names them for local runs: keep the file usable as it is
        log.warning("%s from %s left out: the service chooses them", " and ".join(dropped), args.config)
    created = _client().submit(apply_sets(data, args.set))
    print(created.id)  # alone on stdout: ID=$(dkdm jobs submit ...)
    print(f"submitted job {created.id}; follow it with: dkdm jobs status {created.id} --watch", file=sys.stderr)


def cmd_jobs_list(args: argparse.Namespace) -> None:
    views = _client().jobs()
    if args.json:
        print(json.dumps([v.model_dump() for v in views], indent=2))
        return
    for view in views:
        print(_job_line(view))


def cmd_jobs_status(args: argparse.Namespace) -> None:
    client = _client()
    if not args.watch:
        _print_view(client.job(args.id), args.json)
        return
    from tqdm import tqdm

    views = client.watch(args.id, args.every)
    last = next(views)
    # The bar's rate is steps/s since watching began: `initial` keeps earlier steps out of it.
    with tqdm(total=last.total_steps, initial=last.step, unit="step", desc=args.id) as bar:
        bar.set_postfix_str(last.state)
        for last in views:
            bar.total = last.total_steps
            bar.update(last.step - bar.n)
            bar.set_postfix_str(last.state)
    _print_view(last, args.json)
    if last.state != "SUCCEEDED":
        raise ClientError(f"job {last.id} ended {last.state}" + (f": {last.error}" if last.error else ""))


def cmd_jobs_cancel(args: argparse.Namespace) -> None:
    print(_job_line(_client().cancel(args.id)))


def cmd_jobs_scale(args: argparse.Namespace) -> None:
    print(_job_line(_client().scale(args.id, args.replicas)))


def cmd_jobs_resume(args: argparse.Namespace) -> None:
    print(_job_line(_client().resume(args.id)))


def cmd_jobs_sample(args: argparse.Namespace) -> None:
    if args.num < 1:
        raise UsageError("--num must be at least 1")
    if not args.out.endswith(".npz"):
        raise UsageError("--out must name a .npz file")
    labels = None if args.class_label is None else [args.class_label]
    guidance = args.guidance_scale
    arr = _client().sample(
        args.model, args.num, args.steps, args.sampler, args.seed, class_labels=labels, guidance_scale=guidance
    )
    if args.grid and arr.ndim != 4:
        raise UsageError("--grid needs image samples")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, arr_0=arr)  # what `dkdm sample` writes: arr_0, uint8 NHWC for images
    print(f"wrote {len(arr)} samples to {out}")
    if args.grid:
        from dkdm_core.data import from_uint8_nhwc
        from services.images import save_grid

        print(f"wrote grid to {save_grid(from_uint8_nhwc(arr)[:100], args.grid)}")


def _add_jobs(sub: Any) -> None:
    """jobs submit | list | status | cancel | scale | resume | sample: the REST API from the command line."""
    jobs = sub.add_parser(
        "jobs", help="submit and follow jobs on the control plane (DKDM_API_URL, DKDM_API_TOKEN, DKDM_SAMPLE_URL)"
    ).add_subparsers(dest="jobs_command", required=True)
    p = jobs.add_parser("submit", help="POST a job spec (the YAML of `dkdm distill`; out and engine are left out)")
    p.add_argument("--config", help="YAML job spec")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec field, e.g. steps=500")
    p.set_defaults(func=cmd_jobs_submit)
    p = jobs.add_parser("list", help="the newest jobs: id, state, steps, progress")
    p.add_argument("--json", action="store_true", help="the API's job views as JSON")
    p.set_defaults(func=cmd_jobs_list)
    p = jobs.add_parser("status", help="one job's state, progress and latest metrics")
    p.add_argument("id")
    p.add_argument(
        "--watch", action="store_true", help="a progress bar until the job ends (exit status 1 unless it SUCCEEDED)"
    )
    p.add_argument("--every", type=float, default=1.0, help="seconds between polls with --watch")
    p.add_argument("--json", action="store_true", help="the API's job view as JSON")
    p.set_defaults(func=cmd_jobs_status)
    for name, help_, func in (
        ("cancel", "stop a job at its next log step (it keeps its checkpoint)", cmd_jobs_cancel),
        ("resume", "start a stopped job again from its last checkpoint", cmd_jobs_resume),
    ):
        p = jobs.add_parser(name, help=help_)
        p.add_argument("id")
        p.set_defaults(func=func)
    p = jobs.add_parser("scale", help="set a running job's number of teacher replicas")
    p.add_argument("id")
    p.add_argument("replicas", type=int)
    p.set_defaults(func=cmd_jobs_scale)
    p = jobs.add_parser("sample", help="draw samples from a served student into an .npz (uint8 NHWC, arr_0)")
    p.add_argument("model", help="a registered student, e.g. job-<id> (GET /models lists them)")
    p.add_argument("--num", type=int, required=True, help="number of samples (at most 256 per request)")
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--grid", help="also write a PNG grid of the first 100")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    p.add_argument("--sampler", choices=["iddpm", "ddim"], default="iddpm", help="default: iddpm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class", dest="class_label", type=int, help="class-conditional students: every sample's class")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale w (default: the card's)")
    p.set_defaults(func=cmd_jobs_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dkdm", description="Data-free distillation of diffusion models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training(sub)
    _add_models(sub)
    _add_services(sub)
    _add_jobs(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: chained exceptions, Ray task causes, Ray Train worker failures."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 32:
        e = todo.pop(0)
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [c for c in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(c, BaseException)]
        todo += [getattr(e, "controller_failure", None)] if hasattr(e, "controller_failure") else []
        todo += list(getattr(e, "worker_failures", {}).values())
    return [e for e in seen if isinstance(e, BaseException)]


def _raised_by_ray(exc: BaseException) -> bool:
    """A plain exception (e.g. ``ray.init``'s ConnectionError) whose innermost frame is in Ray's code."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}ray{os.sep}" in tb.tb_frame.f_code.co_filename


def _error_line(exc: BaseException) -> tuple[str, int] | None:
    """The one line (and exit status) for an error the user or a service caused; None for a bug.

    Redis wins over Ray: a Ray task or Ray Train worker that died of a Redis error is a Redis failure,
    and a later Redis error in an error handler must not hide the first one.
    """
    import redis

    from services.jobs.client import RedisUnavailable

    user_errors = (UsageError, CheckpointError, FileNotFoundError, ValueError)
    ray_exceptions = sys.modules.get("ray.exceptions")  # loaded only by commands that use Ray
    ray_train = sys.modules.get("ray.train")
    ray_types: tuple[type, ...] = (ray_exceptions.RayError,) if ray_exceptions is not None else ()
    if ray_train is not None and hasattr(ray_train, "TrainingFailedError"):
        ray_types += (ray_train.TrainingFailedError,)
    if isinstance(exc, ClientError):  # the API's answer or the URL that did not answer, already one line
        return str(exc), exc.exit_status
    causes = _causes(exc)
    if isinstance(exc, user_errors) and not isinstance(exc, ray_types):
        return _one_line(exc), 2
    for e in causes:
        if isinstance(e, ray_types):
            continue  # a Ray task error that also is its cause's class: its text is a remote traceback
        if isinstance(e, RedisUnavailable):
            return _one_line(e), 1  # it names the server and how long it was waited for
        if isinstance(e, redis.RedisError) or (isinstance(e, ConnectionError) and "Redis" in str(e)):
            return f"Redis failed: {_one_line(e)}", 1
    if not any(isinstance(e, ray_types) or _raised_by_ray(e) for e in causes):
        return None
    inner = [e for e in causes if not isinstance(e, ray_types)]
    if inner and isinstance(inner[0], user_errors) and not _raised_by_ray(inner[0]):
        return _one_line(inner[0]), 2  # the user's mistake, raised inside a Ray task or worker
    return f"Ray failed: {_one_line(inner[0] if inner else exc)}", 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        args.func(args)
    except ValidationError as exc:
        print(f"dkdm: error: {_format_validation(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        found = _error_line(exc)
        if found is None:
            raise
        print(f"dkdm: error: {found[0]}", file=sys.stderr)
        return found[1]
    except KeyboardInterrupt:
        print("dkdm: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
