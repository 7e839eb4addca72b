"""The distillation step at device speed: every precision x compile setting, side by side in one run.

Two teacher -> student pairs (weights may be random: speed does not depend on them):

* ``digits``: the bundled unet-small digits teacher -> unet-tiny, b = 64, a 100-step chain;
* ``cifar``: a DDPM-CIFAR10-shaped UNet (35.7M, learned variance) -> its half width (9.0M), b = 128,
  the full T = 1000 chain, pool ρ = 0.4 (51,200 samples of 3x32x32 on the device).

For each setting the local engine's whole step (lease, teacher call, pool return, student loss,
backward, optimiser, EMA) is timed, and its halves alone: the teacher call (what replicas do) and
the student update on a ready-made batch (what student ranks do). One JSON object is printed:
ms/step, samples/s, FLOPs per step (torch's ``FlopCounterMode``, counted once per pair in fp32),
TFLOP/s and its share of the device's bf16 matmul rate measured in the same run, peak memory.
``--ray`` adds Ray-engine rows (``--ray-settings``: pair, precision, compile mode and
``ray.ship_dtype`` per row; 1 and 2 teacher replicas sharing half the device, a student rank on the
other half) with their pipeline efficiency, samples/s over the slower half's rate when it runs alone
(the teacher call or the student update of the local row with the same pair and setting), and their
speed-up over that local row's whole step. On a CPU the halves are also timed on one core each, the
share a Ray row gives them (the replicas one core between them, the student rank the other), for
``pipeline_efficiency_same_share``.

    python bench/gpu.py                        # on a GPU: every local row
    python bench/gpu.py --ray --local ray      # on a GPU: the Ray rows and the local rows they compare with
    python bench/gpu.py --quick [--ray]        # CPU smoke run (CI): tiny steps, fp32 only
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dkdm_core.checkpoint import ModelCard, load_model, save_model
from dkdm_core.diffusion import make_diffusion
from dkdm_core.models import build_model, count_parameters
from dkdm_core.pool import NoisePool, pool_size
from dkdm_core.runtime import Runtime, resolve_runtime
from dkdm_core.spec import DiffusionSpec, DistillSpec, OptimSpec
from dkdm_core.training import Distiller, KnowledgeBatch, read_logs, student_loss

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Pair:
    name: str
    teacher: str  # a model folder, or a registry name built with random weights
    student: str
    channels: int
    image_size: int
    batch: int
    chain_steps: int | None
    schedule: str = "cosine"


PAIRS = {
    "digits": Pair("digits", str(ROOT / "dkdm_core/assets/teachers/digits"), "unet-tiny", 1, 8, 64, 100),
    "cifar": Pair("cifar", "ddpm-cifar10", "ddpm-cifar10-half", 3, 32, 128, None, "linear"),
    # The CPU smoke run's stand-in for the CIFAR pair: same code path, a size two cores can step.
    "cifar-quarter": Pair("cifar-quarter", "ddpm-cifar10-quarter", "ddpm-cifar10-quarter", 3, 32, 8, 20, "linear"),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(pair: Pair, runtime: Runtime, rho: float) -> Distiller:
    """Teacher, student, chain and a pool spread uniformly over the chain (no shuffle denoise: the
    pool's content does not change the step's cost, and initialising 51,200 samples would)."""
    torch.manual_seed(0)
    if Path(pair.teacher).is_dir():
        teacher, card = load_model(pair.teacher)
        chain = make_diffusion(card.diffusion.schedule, card.diffusion.num_timesteps, True, pair.chain_steps)
    else:
        teacher = build_model(pair.teacher, pair.channels, pair.image_size, True)
        chain = make_diffusion(pair.schedule, 1000, True, pair.chain_steps)  # type: ignore[arg-type]
    student = build_model(pair.student, pair.channels, pair.image_size, True)
    k = chain.num_timesteps
    size = pool_size("dynamic", pair.batch, k, rho)
    pool = NoisePool("dynamic", size, (pair.channels, pair.image_size, pair.image_size), k, runtime.generator(0))
    pool.t = torch.randint(0, k, (size,), generator=runtime.generator(1), device=runtime.device)
    optim = OptimSpec(batch_size=pair.batch, lr=1e-4, warmup_steps=10)
    return Distiller(student, teacher, chain, pool, optim, runtime.generator(2), device=runtime.device, runtime=runtime)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls (compilation and CUDA graph capture)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def step_flops(pair: Pair, device: torch.device, rho: float) -> int:
    """FLOPs of one whole distillation step (teacher forward, student forward and backward), fp32."""
    distiller = build(pair, resolve_runtime(str(device), "fp32", "off"), rho)
    distiller.step()
    with FlopCounterMode(display=False) as counter:
        distiller.step()
    return int(counter.get_total_flops())


def bf16_matmul_rate(device: torch.device, quick: bool) -> float:
    """The device's dense bf16 matmul rate in FLOP/s, measured here (the roofline rows are shares of)."""
    n = 512 if quick else 8192 if device.type == "cuda" else 2048  # 8192 on a CPU: ten minutes
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, 3, 5 if quick else 50)
    return 2 * n**3 / seconds


def bench_setting(pair: Pair, runtime: Runtime, args: argparse.Namespace) -> dict[str, Any]:
    device = runtime.device
    runtime.apply_global()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    distiller = build(pair, runtime, args.rho)
    first = time.perf_counter()
    distiller.step()
    sync(device)
    first_step_s = time.perf_counter() - first
    step_s = timed(distiller.step, device, args.warmup, args.steps)
    logs = read_logs(distiller.step())
    # The halves alone: the teacher call on a lease, the student update on a ready-made batch.
    lease = distiller.pool.take(pair.batch)
    distiller.pool.release(lease.lease_id)
    teacher_s = timed(lambda: distiller.teach(lease), device, 3, args.steps)
    batch = distiller.teach(lease)

    def learn(batch: KnowledgeBatch = batch) -> None:
        runtime.begin_step()
        terms = student_loss(distiller.run_student, distiller.chain, batch, distiller.vlb_weight, distiller.mode)
        distiller.optimizer_step(terms)

    student_s = timed(learn, device, 3, args.steps)
    row: dict[str, Any] = {
        "pair": pair.name,
        "engine": "local",
        "precision": runtime.precision,
        "compile": runtime.compile,
        "pool_on_device": distiller.pool.device.type == device.type,
        "ms_per_step": 1000 * step_s,
        "samples_per_s": pair.batch / step_s,
        "teacher_ms": 1000 * teacher_s,
        "student_ms": 1000 * student_s,
        "first_step_s": first_step_s,
        "loss": logs["loss"],
    }
    if device.type == "cuda":
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        # The shares the Ray rows give each side on a CPU: one core for the replicas, one for the rank.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            row["teacher_ms_one_core"] = 1000 * timed(lambda: distiller.teach(lease), device, 3, args.steps)
            row["student_ms_one_core"] = 1000 * timed(learn, device, 3, args.steps)
        finally:
            torch.set_num_threads(threads)
    return row


@dataclass(frozen=True)
class RaySetting:
    """One Ray row's pair, precision, compile mode and ``ray.ship_dtype``: ``pair:precision+compile[:ship]``."""

    pair: str
    precision: str
    compile: str
    ship: str = "fp32"

    @classmethod
    def parse(cls, text: str) -> RaySetting:
        pair, setting, *ship = text.split(":")
        precision, _, mode = setting.partition("+")
        if pair not in PAIRS or not mode or len(ship) > 1:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected PAIR:PRECISION+COMPILE[:SHIP], PAIR in {sorted(PAIRS)}"
            )
        return cls(pair, precision, mode, *ship)


def teacher_folder(pair: Pair, workdir: Path) -> str:
    """The pair's teacher as a model folder (what the Ray engine's replicas load): the bundled one, or
    the registry network with random weights saved once (speed does not depend on the weights)."""
    if Path(pair.teacher).is_dir():
        return pair.teacher
    out = workdir / f"teacher-{pair.name}"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = build_model(pair.teacher, pair.channels, pair.image_size, True)
        diffusion = DiffusionSpec(schedule=pair.schedule, num_timesteps=1000)
        card = ModelCard(
            arch=pair.teacher, channels=pair.channels, image_size=pair.image_size, learn_sigma=True, diffusion=diffusion
        )
        save_model(out, model, card)
    return str(out)


def ray_spec(pair: Pair, setting: RaySetting, args: argparse.Namespace, replicas: int, workdir: Path) -> DistillSpec:
    """A Ray job on one device: replicas share half of it, the student rank has the other half.

    The pool starts from teacher trajectories, one per ``chain`` samples, all stepped in one batch
    shape: a compiled teacher then records one extra graph, where shuffle denoise would record one
    per chunk size and cost ~ρ·K²·b/2 teacher calls (hours at K = 1000).
    """
    cuda = args.device_obj.type == "cuda"
    chain = pair.chain_steps or 1000
    log_every = 1 if args.quick else 10  # a logged step reads its losses and writes Redis: not every step
    return DistillSpec.model_validate(
        {
            "teacher": teacher_folder(pair, workdir),
            "student": {"arch": pair.student},
            "pool": {
                "strategy": "dynamic",
                "rho": 0.1,
                "chain_steps": pair.chain_steps,
                "init": "trajectory",
                "per_trajectory": chain,
            },
            "optim": {"batch_size": pair.batch, "lr": 1e-4, "warmup_steps": 10},
            "teacher_batch_size": pair.batch,
            "steps": args.ray_steps,
            "engine": "ray",
            "out": str(workdir / f"ray-{pair.name}-{setting.precision}-{setting.compile}-{replicas}"),
            "run": {
                "log_every": log_every,
                "checkpoint_every": 10**9,
                "eval_samples": 16,
                "quality_samples": 0,
                "sample_steps": 2,
            },
            "runtime": {"precision": setting.precision, "compile": setting.compile},
            "ray": {
                "teacher_replicas": replicas,
                # A core per replica on a GPU machine (its host work: Ray calls, launches); on two
                # CPU cores the replicas share one and the student has the other.
                "teacher_cpus": 1 if cuda else 1 / replicas,
                "teacher_gpus": (0.5 / replicas) if cuda else 0,
                "student_gpus": 0.5 if cuda else 0,
                "queue_size": 8,
                # The first teacher call on a lease compiles (a minute at CIFAR scale): not a dead replica.
                "lease_timeout_s": 600,
                "ship_dtype": setting.ship,
            },
        }
    )


def bench_ray(
    setting: RaySetting, args: argparse.Namespace, replicas: int, workdir: Path, redis: str
) -> dict[str, Any]:
    """The Ray engine on the same device as the local rows: teacher replicas and one student rank."""
    from services.engine.driver import run_job
    from services.jobs.store import JobStore

    pair = PAIRS[setting.pair]
    spec = ray_spec(pair, setting, args, replicas, workdir)
    job_id = f"gpu-bench-{pair.name}-{replicas}-{os.getpid()}-{time.monotonic_ns()}"
    started = time.perf_counter()
    run_job(spec, job_id, redis, progress=False)
    records = [json.loads(line) for line in (Path(spec.out) / "log.jsonl").read_text().splitlines()]
    # Steady state: from the logged step nearest a quarter of the run (compilation, queue filling before).
    warm = min((r for r in records if r["step"] >= args.ray_steps // 4), key=lambda r: r["step"])
    end = records[-1]
    rate = (end["step"] - warm["step"]) * pair.batch / (end["elapsed_s"] - warm["elapsed_s"])
    c = JobStore(redis, job_id).counters()
    busy, wait = c.get("student_busy_seconds", 0.0), c.get("student_wait_seconds", 0.0)
    return {
        "pair": pair.name,
        "engine": "ray",
        "precision": setting.precision,
        "compile": setting.compile,
        "ship_dtype": setting.ship,
        "teacher_replicas": replicas,
        "teacher_gpus": spec.ray.teacher_gpus,
        "student_gpus": spec.ray.student_gpus,
        "samples_per_s": rate,
        "ms_per_step": 1000 * pair.batch / rate,
        "student_idle_fraction": wait / (busy + wait) if busy + wait else None,
        "job_seconds": time.perf_counter() - started,
    }


def pipeline_efficiency(rows: list[dict[str, Any]]) -> None:
    """Ray rows: samples/s over the slower half's rate when it runs alone (the teacher call and the
    student update of the local row with the same pair, precision and compile mode, timed alone on
    the whole device), and the speed-up over that local row's whole step."""
    local = {
        (r["pair"], r["precision"], r["compile"]): r for r in rows if r.get("engine") == "local" and "teacher_ms" in r
    }
    for row in rows:
        if row.get("engine") != "ray" or "samples_per_s" not in row:
            continue
        match = local.get((row["pair"], row["precision"], row["compile"]))
        if match is None:  # no local row of this setting in the run: nothing to compare with
            row["pipeline_efficiency"] = row["speedup_vs_local"] = None
            continue
        batch = PAIRS[row["pair"]].batch
        slower = 1000 * batch / max(match["teacher_ms"], match["student_ms"])
        row["slower_side"] = "teacher" if match["teacher_ms"] >= match["student_ms"] else "student"
        row["pipeline_efficiency"] = row["samples_per_s"] / slower
        row["speedup_vs_local"] = row["samples_per_s"] / match["samples_per_s"]
        if "teacher_ms_one_core" in match:  # a CPU: the slower side alone on the share it has in the Ray row
            share = 1000 * batch / max(match["teacher_ms_one_core"], match["student_ms_one_core"])
            row["pipeline_efficiency_same_share"] = row["samples_per_s"] / share


def local_rows(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(pair, precision, compile) of every local row: each pair x setting, or with ``--local ray``
    only those the Ray rows are compared with."""
    if args.local == "ray":
        return list(dict.fromkeys((s.pair, s.precision, s.compile) for s in args.ray_settings))
    chosen = [("fp32", "off")] if args.quick else [(p, c) for p, c in (s.split("+") for s in args.settings)]
    return [(name, p, c) for name in args.pairs for p, c in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--pairs", nargs="+", default=["digits", "cifar"], choices=sorted(PAIRS))
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["fp32+off", "tf32+off", "bf16+off", "tf32+cudagraphs", "bf16+cudagraphs"],
        help="precision+compile pairs",
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rho", type=float, default=0.4)
    parser.add_argument("--ray", action="store_true", help="add Ray-engine rows (--ray-settings)")
    parser.add_argument(
        "--ray-settings",
        nargs="+",
        type=RaySetting.parse,
        default=None,
        help="PAIR:PRECISION+COMPILE[:SHIP_DTYPE] per Ray row (default: digits fp32+off and tf32+cudagraphs, "
        "cifar bf16+cudagraphs shipped in bf16; --quick: digits and cifar-quarter fp32+off)",
    )
    parser.add_argument(
        "--local",
        choices=["all", "ray"],
        default="all",
        help="local rows: every pair x setting, or only those the Ray rows are compared with",
    )
    parser.add_argument("--ray-replicas", nargs="+", type=int, default=[1, 2], help="teacher replicas per Ray row")
    parser.add_argument("--ray-steps", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: few steps, small pairs, fp32")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    if args.quick:
        args.device, args.steps, args.warmup, args.rho, args.ray_steps = "cpu", 2, 1, 0.1, 12
        args.pairs = ["digits", "cifar-quarter"]
        args.ray_settings = args.ray_settings or [
            RaySetting("digits", "fp32", "off"),
            RaySetting("cifar-quarter", "fp32", "off", "bf16"),
        ]
    args.ray_settings = args.ray_settings or [
        RaySetting("digits", "fp32", "off"),
        RaySetting("digits", "tf32", "cudagraphs"),
        RaySetting("cifar", "bf16", "cudagraphs", "bf16"),
    ]
    args.device_obj = resolve_runtime(args.device).device
    device = args.device_obj
    rows: list[dict[str, Any]] = []
    local = local_rows(args)
    args.pairs = list(dict.fromkeys(name for name, _, _ in local))
    described = list(dict.fromkeys(args.pairs + ([s.pair for s in args.ray_settings] if args.ray else [])))
    flops = {name: step_flops(PAIRS[name], device, args.rho) for name in args.pairs}
    rate = bf16_matmul_rate(device, args.quick)
    for name, precision, mode in local:
        try:
            row = bench_setting(PAIRS[name], resolve_runtime(str(device), precision, mode), args)
        except Exception as exc:  # one failed setting must not lose the other rows
            row = {"pair": name, "precision": precision, "compile": mode, "error": repr(exc)[:500]}
            traceback.print_exc()
        if "ms_per_step" in row:
            row["flops_per_step"] = flops[name]
            row["tflop_per_s"] = flops[name] / (row["ms_per_step"] / 1000) / 1e12
            row["share_of_bf16_matmul_rate"] = flops[name] / (row["ms_per_step"] / 1000) / rate
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.ray:
        from services.engine.embedded import ray_cluster, redis_url

        with tempfile.TemporaryDirectory(prefix="dkdm-gpu-bench-") as tmp, redis_url() as url, ray_cluster():
            for setting in args.ray_settings:
                for replicas in args.ray_replicas:
                    try:
                        row = bench_ray(setting, args, replicas, Path(tmp), url)
                    except Exception as exc:  # one failed row must not lose the others
                        row = {
                            "pair": setting.pair,
                            "engine": "ray",
                            "precision": setting.precision,
                            "compile": setting.compile,
                            "ship_dtype": setting.ship,
                            "teacher_replicas": replicas,
                            "error": repr(exc)[:500],
                        }
                        traceback.print_exc()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    pipeline_efficiency(rows)
    setup = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "bf16_matmul_tflop_per_s": rate / 1e12,
        "steps": args.steps,
        "warmup": args.warmup,
        "ray_steps": args.ray_steps if args.ray else None,
        "pairs": {
            n: {
                "teacher": PAIRS[n].teacher if not Path(PAIRS[n].teacher).is_dir() else "assets/teachers/digits",
                "student": PAIRS[n].student,
                "batch": PAIRS[n].batch,
                "chain_steps": PAIRS[n].chain_steps or 1000,
                "student_parameters": count_parameters(
                    build_model(PAIRS[n].student, PAIRS[n].channels, PAIRS[n].image_size, True)
                ),
            }
            for n in described
        },
    }
    result = {"setup": setup, "rows": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
