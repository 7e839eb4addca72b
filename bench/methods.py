"""The methods side by side on digits: DKDM, O2MKD (N=2, 4), BOOT, cross-architecture, latent space.

Every student row trains from a teacher with the same optimiser, batch (b = 64) and number of student
steps, then is scored on 1000 samples with the digits Fréchet distance. Rows:

* the bundled unet-small teacher and DKDM into unet-tiny (the reference pair);
* O2MKD with N = 2 and N = 4 unet-tiny students sharing one pool (the batch of 64 is routed by t, so
  teacher cost and student compute per step equal DKDM's);
* BOOT: a one-step student (unet-small, the teacher's size) bootstrapped along a 20-step chain;
* cross-architecture (DKDM Table 5): UNet teacher -> ViT student, a ViT teacher trained here (vit-small,
  10k steps) -> UNet and -> ViT students;
* latent space: a small AutoencoderKL trained on the digits (8x8 -> 3x4x4), a latent unet-small teacher
  trained on its latents with L_simple, and a latent unet-tiny student distilled with L*_simple only.

Sampling time per image is measured at the end for every model in one pass (same process, same
threads, 512 images each), so the times compare side by side. Finished rows and teachers are reused
when the bench is run again. Prints one JSON object; writes OUT/methods.md.

    python bench/methods.py [--steps 1200] [--out runs/methods]
    python bench/methods.py --quick          # a CI-size smoke run (tiny budget, numbers meaningless)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dkdm_core.checkpoint import load_model
from dkdm_core.models import count_parameters
from dkdm_core.sampling import draw, sampling_steps
from dkdm_core.spec import DistillSpec, TeacherTrainSpec, load_yaml
from services.evaluation import resolve_path
from services.local_engine import distill_local, make_autoencoder, train_teacher

PIXEL_TEACHER = "assets/teachers/digits"


def teacher_spec(args: argparse.Namespace, arch: str, out: Path, latent: Path | None) -> TeacherTrainSpec:
    data = load_yaml("configs/digits-teacher.yaml")
    data["model"] = {**data["model"], "arch": arch}
    data["steps"] = args.teacher_steps
    data["out"] = str(out)
    data["run"] = {**data["run"], "eval_samples": args.eval_samples, "sample_steps": args.sample_steps}
    data["run"]["sample_every"] = 10**9
    if latent is not None:  # 3x4x4 latents, ε-only like latent diffusion's teachers (trained with L_simple)
        data["autoencoder"] = str(latent)
        data["model"].update(channels=args.latent_channels, image_size=4, learn_sigma=False)
    if args.quick:
        data["diffusion"] = {**data["diffusion"], "num_timesteps": 100}
        data["optim"] = {**data["optim"], "batch_size": 32}
    return TeacherTrainSpec.model_validate(data)


def ensure_teacher(spec: TeacherTrainSpec) -> Path:
    out = Path(spec.out)
    if not (out / "metrics.json").is_file():
        train_teacher(spec, progress=False)
    return out


def ensure_autoencoder(args: argparse.Namespace) -> Path:
    out = args.out / "teachers" / "autoencoder"
    if not (out / "metrics.json").is_file():
        make_autoencoder(out, args.ae_steps, args.latent_channels)
    return out


def student_spec(args: argparse.Namespace, slug: str, teacher: Path, overrides: dict[str, Any]) -> DistillSpec:
    data = load_yaml("configs/digits-dkdm.yaml")
    data.update(teacher=str(teacher), steps=args.steps, seed=0, out=str(args.out / slug))
    data["run"] = {
        **data["run"],
        "eval_samples": args.eval_samples,
        "sample_steps": args.sample_steps,
        "checkpoint_every": args.steps,
        "sample_every": 10**9,
    }
    data["optim"] = {**data["optim"], "ema_decay": args.ema_decay}
    if args.quick:
        data["run"]["quality_samples"] = 16
        data["pool"] = {**data["pool"], "chain_steps": 10}
    for dotted, value in overrides.items():
        section, _, leaf = dotted.rpartition(".")
        (data.setdefault(section, {}) if section else data)[leaf] = value
    return DistillSpec.model_validate(data)


def train_row(spec: DistillSpec) -> Path:
    out = Path(spec.out)
    if not (out / "metrics.json").is_file():
        start = time.perf_counter()
        distill_local(spec, progress=False)
        (out / "wall_seconds").write_text(str(time.perf_counter() - start))
    return out


def describe(name: str, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A table row from a trained model folder: size, sampling steps and time per image, digits FD."""
    model, card = load_model(model_dir)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    parts = list(model.parts) if card.router is not None else [model]  # type: ignore[union-attr]
    row = {
        "method": name,
        "arch": "+".join(card.router.archs) if card.router else card.arch,
        "parameters": count_parameters(model),
        "parameters_per_step": max(count_parameters(p) for p in parts),
        "space": "latent" if card.autoencoder else "pixel",
        "sampling_steps": sampling_steps(card, args.sample_steps),
        "digits_fd": metrics["digits_fd"],
        "digits_is": metrics["digits_is"],
        "teacher_calls": metrics.get("teacher_calls", 0.0),
        "train_seconds": metrics.get("train_seconds", 0.0),
    }
    draw(model, card, 16, seed=1, steps=args.sample_steps)  # warm-up: allocations, autoencoder load
    start = time.perf_counter()
    draw(model, card, args.timing_samples, seed=1, steps=args.sample_steps, batch_size=args.timing_samples)
    row["seconds_per_image"] = (time.perf_counter() - start) / args.timing_samples
    return row


def markdown(table: list[dict[str, Any]]) -> str:
    lines = [
        "| method | student | parameters (per step) | space | sampling steps | ms / image | digits FD ↓ |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        size = f"{r['parameters'] / 1e6:.2f}M"
        if r["parameters_per_step"] != r["parameters"]:
            size += f" ({r['parameters_per_step'] / 1e6:.2f}M)"
        lines.append(
            f"| {r['method']} | {r['arch']} | {size} | {r['space']} | {r['sampling_steps']} "
            f"| {1000 * r['seconds_per_image']:.2f} | {r['digits_fd']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="student steps of every distilled row")
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--timing-samples", type=int, default=512)
    parser.add_argument("--teacher-steps", type=int, default=5000, help="the latent teacher's training steps")
    parser.add_argument("--vit-teacher-steps", type=int, default=10000)
    parser.add_argument("--ae-steps", type=int, default=2000)
    parser.add_argument("--latent-channels", type=int, default=3)
    parser.add_argument("--boot-chain", type=int, default=20, help="BOOT's chain: bootstrap hops noise -> image")
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument("--quick", action="store_true", help="CI-size smoke run: tiny budget, numbers meaningless")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_samples, args.sample_steps, args.timing_samples = 10, 64, 5, 32
        args.teacher_steps, args.vit_teacher_steps, args.ae_steps, args.boot_chain = 20, 20, 20, 5
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    pixel = resolve_path(PIXEL_TEACHER)
    if args.quick:  # a T=100 unet-tiny stand-in for the bundled teacher
        pixel = ensure_teacher(teacher_spec(args, "unet-tiny", args.out / "teachers" / "unet", None))
    autoencoder = ensure_autoencoder(args)
    latent = ensure_teacher(
        teacher_spec(args, "unet-tiny" if args.quick else "unet-small", args.out / "teachers" / "latent", autoencoder)
    )
    # The ViT teacher trains last (only the rows that need it wait for it).
    vit_spec = teacher_spec(args, "vit-tiny" if args.quick else "vit-small", args.out / "teachers" / "vit", None)
    vit_spec = vit_spec.model_copy(update={"steps": args.vit_teacher_steps})

    o2mkd = {"method": "o2mkd", "student.arch": "unet-tiny"}
    students: list[tuple[str, str, Callable[[], Path], dict[str, Any]]] = [
        ("DKDM", "dkdm", lambda: pixel, {}),
        ("O2MKD N=2", "o2mkd-2", lambda: pixel, {**o2mkd, "o2mkd.students": 2}),
        ("O2MKD N=4", "o2mkd-4", lambda: pixel, {**o2mkd, "o2mkd.students": 4}),
        (
            "BOOT",
            "boot",
            lambda: pixel,
            {"method": "boot", "student.arch": "unet-small", "pool.chain_steps": args.boot_chain},
        ),
        ("UNet T → ViT S", "unet-to-vit", lambda: pixel, {"student.arch": "vit-tiny"}),
        (
            "latent DKDM (L*_simple)",
            "latent-dkdm",
            lambda: latent,
            {"objective": "simple", "student.arch": "unet-tiny"},
        ),
        ("ViT T → UNet S", "vit-to-unet", lambda: ensure_teacher(vit_spec), {"student.arch": "unet-tiny"}),
        ("ViT T → ViT S", "vit-to-vit", lambda: ensure_teacher(vit_spec), {"student.arch": "vit-tiny"}),
    ]
    trained = [(name, train_row(student_spec(args, slug, teacher(), o))) for name, slug, teacher, o in students]
    vit = ensure_teacher(vit_spec)

    # Every model is timed here, one after the other in one process: times compare side by side.
    table = [
        describe("teacher (UNet)", pixel, args),
        describe("teacher (ViT)", vit, args),
        describe("latent teacher", latent, args),
        *(describe(name, path, args) for name, path in trained),
    ]
    ae_metrics = json.loads((autoencoder / "metrics.json").read_text())
    (args.out / "methods.md").write_text(markdown(table))
    budget = {
        "student_steps": args.steps,
        "batch_size": 64,
        "ema_decay": args.ema_decay,
        "eval_samples": args.eval_samples,
        "sample_steps": args.sample_steps,
        "latent_teacher_steps": args.teacher_steps,
        "vit_teacher_steps": args.vit_teacher_steps,
        "boot_chain": args.boot_chain,
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    print(json.dumps({"budget": budget, "autoencoder": ae_metrics, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
