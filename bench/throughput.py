"""Student throughput of the local engine vs the Ray engine, measured side by side in one run.

Same teacher (the bundled unet-small digits teacher), same student (unet-tiny), same batch, chain
and pool for every row. Prints one JSON object:

* ``student_samples_per_s``: b x steps / seconds over the steady part of the run (the first
  ``--warmup`` steps are excluded: model start-up, queue filling);
* ``student_idle_fraction`` (Ray): time student ranks waited on their queue / (waited + trained);
* ``teacher_utilisation`` (Ray): time replicas spent in teacher calls / (replicas x the student ranks'
  wall time, waiting plus training);
* ``lease_ms`` / ``return_ms`` (Ray): mean round trip of a shard take / put seen by a replica;
* ``speedup_vs_local``: the ratio of the Ray row's samples/s to the local row's, same run.

    python bench/throughput.py [--steps 200] [--replicas 1 2] [--student-cpus 1] [--teacher-cpus 1]

On a CPU machine the "devices" are cores: the local engine runs teacher and student one after the
other on all of them, the Ray engine gives each replica and each student rank its own share.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dkdm_core.spec import DistillSpec
from services.local_engine import build_distiller


def base_spec(args: argparse.Namespace, out: Path) -> DistillSpec:
    return DistillSpec.model_validate(
        {
            "teacher": "assets/teachers/digits",
            "student": {"arch": args.student},
            "pool": {"strategy": "dynamic", "rho": args.rho, "chain_steps": args.chain_steps},
            "optim": {"batch_size": args.batch_size, "lr": 1e-3, "warmup_steps": 10},
            "steps": args.steps,
            "seed": 0,
            "out": str(out),
            "run": {"log_every": 1, "checkpoint_every": 10**9, "eval_samples": 16, "sample_steps": 5},
        }
    )


def steady_rate(records: list[dict[str, Any]], warmup: int, batch: int) -> float:
    """Samples per second between the logged steps ``warmup`` and the last one."""
    start = next(r for r in records if r["step"] == warmup)
    end = records[-1]
    return (end["step"] - warmup) * batch / (end["elapsed_s"] - start["elapsed_s"])


def bench_local(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    spec = base_spec(args, workdir / "local")
    distiller, _ = build_distiller(spec, torch.device(args.device))
    distiller.init_pool(spec.teacher_batch_size)
    times = []
    for _ in range(args.steps):
        distiller.step()
        times.append(time.perf_counter())
    seconds = times[-1] - times[args.warmup - 1]
    return {
        "engine": "local",
        "threads": torch.get_num_threads(),
        "student_samples_per_s": (args.steps - args.warmup) * args.batch_size / seconds,
    }


def bench_ray(args: argparse.Namespace, workdir: Path, replicas: int, redis_url: str) -> dict[str, Any]:
    from services.engine.driver import run_job
    from services.jobs.store import JobStore

    out = workdir / f"ray-{replicas}"
    spec = base_spec(args, out).model_copy(update={"engine": "ray"})
    spec.ray.teacher_replicas = replicas
    # The teacher side gets the same budget in every row, split between its replicas.
    spec.ray.teacher_cpus = args.teacher_cpus / replicas
    spec.ray.teacher_gpus = args.teacher_gpus / replicas
    spec.ray.student_cpus = args.student_cpus
    spec.ray.student_gpus = args.student_gpus
    spec.ray.queue_size = args.queue_size
    job_id = f"bench-{replicas}-{os.getpid()}"
    run_job(spec, job_id, redis_url, progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    c = JobStore(redis_url, job_id).counters()
    calls = max(c["teacher_calls"], 1.0)
    wall = c["student_wait_seconds"] + c["student_busy_seconds"]
    return {
        "engine": "ray",
        "teacher_replicas": replicas,
        "cpus_per_replica": spec.ray.teacher_cpus,
        "student_samples_per_s": steady_rate(records, args.warmup, args.batch_size),
        "student_idle_fraction": c["student_wait_seconds"] / (c["student_wait_seconds"] + c["student_busy_seconds"]),
        "teacher_utilisation": c["teacher_busy_seconds"] / (replicas * wall),
        "lease_ms": 1000 * c["lease_seconds"] / calls,
        "return_ms": 1000 * c["return_seconds"] / calls,
        "teacher_batches_per_student_step": c["teacher_calls"] / args.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chain-steps", type=int, default=100)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--student", default="unet-tiny")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--teacher-cpus", type=float, default=1.0, help="for all replicas together")
    parser.add_argument("--teacher-gpus", type=float, default=0.0, help="for all replicas together")
    parser.add_argument("--student-cpus", type=float, default=1.0)
    parser.add_argument("--student-gpus", type=float, default=0.0)
    parser.add_argument("--queue-size", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="local engine")
    args = parser.parse_args()

    from services.engine.embedded import ray_cluster, redis_url

    with tempfile.TemporaryDirectory(prefix="dkdm-bench-") as tmp:
        workdir = Path(tmp)
        rows = [bench_local(args, workdir)]
        with redis_url() as url, ray_cluster():
            rows += [bench_ray(args, workdir, n, url) for n in args.replicas]
    local = rows[0]["student_samples_per_s"]
    for row in rows[1:]:
        row["speedup_vs_local"] = row["student_samples_per_s"] / local
    setup = {k: getattr(args, k) for k in ("steps", "warmup", "batch_size", "chain_steps", "rho", "student")}
    setup.update(
        teacher="assets/teachers/digits (unet-small)", cpu_count=os.cpu_count(), cuda=torch.cuda.is_available()
    )
    print(json.dumps({"setup": setup, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
