"""Entrypoint of a distillation job on Ray, for ``ray job submit`` and the control plane.

    python -m services.engine --spec configs/digits-dkdm-ray.yaml [--set steps=500] [--job-id ID]
    python -m services.engine --job-id ID      # the spec comes from the job's record in Redis

With ``--job-id`` alone the job record must already exist in the Redis named by ``DKDM_REDIS_URL``
(the control plane writes it before submitting). Exit status: 0 done, 1 failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pydantic import ValidationError

from dkdm_core.plan import JobPlan
from dkdm_core.spec import DistillSpec, load_yaml
from services.cli import apply_sets


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.engine", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", help="YAML job spec (a DistillSpec)")
    parser.add_argument("--job-id", help="job id; with no --spec, the spec is read from the job's Redis record")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec field")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def load_job(args: argparse.Namespace) -> tuple[DistillSpec, JobPlan | None]:
    """The job's spec, and its plan when the control plane stored one for exactly this spec."""
    record: dict[str, str] = {}
    if args.spec:
        data = load_yaml(args.spec)
    elif args.job_id:
        from services.jobs.store import JobStore

        url = os.environ.get("DKDM_REDIS_URL")
        if not url:
            raise ValueError("--job-id without --spec reads the job from Redis: set DKDM_REDIS_URL")
        store = JobStore(url, args.job_id)
        data, record = store.spec(), store.record()
    else:
        raise ValueError("give --spec FILE or --job-id ID")
    data = apply_sets(data, args.set)
    data["engine"] = "ray"
    spec = DistillSpec.model_validate(data)
    plan = JobPlan.model_validate_json(record["plan"]) if "plan" in record else None
    return spec, plan if plan is not None and plan.spec == spec else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        spec, plan = load_job(args)
    except (ValueError, KeyError, FileNotFoundError, ValidationError) as exc:
        print(f"services.engine: error: {exc}", file=sys.stderr)
        return 2
    from services.engine import distill_ray

    result = distill_ray(spec, job_id=args.job_id, progress=not args.quiet, plan=plan)
    shown = {k: round(v, 4) for k, v in result.metrics.items() if k in ("digits_fd", "digits_is", "train_seconds")}
    print(f"distillation finished: {result.steps} steps in {result.out} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
