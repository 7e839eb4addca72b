"""Entrypoint of a distillation job on Ray, for ``ray job submit`` and the control plane.

    python -m services.engine --spec configs/digits-dkdm-ray.yaml [--set steps=500] [--job-id ID]
    python -m services.engine --job-id ID      # the spec comes from the job's record in Redis

With ``--job-id`` alone the job record must already exist in the Redis named by ``DKDM_REDIS_URL``
(the control plane writes it before submitting). Exit status: 0 done, 1 failed, 2 bad input; every
failure ends in one ``services.engine: error:`` line and, when the job has a record, in its record
(FAILED with that line).

A driver started with ``--job-id`` makes itself the job's live submission: Ray's submission id when
it runs as a Ray job (``ray job submit``, the control plane), else ``local:<host>:<pid>``. The control
plane then follows this run, not an earlier failed one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

from dkdm_core.plan import JobPlan
from dkdm_core.spec import DistillSpec, load_yaml
from services.cli import apply_sets

if TYPE_CHECKING:
    from services.jobs.store import JobStore


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


log = logging.getLogger("services.engine")


def submission_id() -> str:
    """This driver's submission: the Ray job it runs as (Ray hands the driver its job config, the
    submission id among its metadata), else this process."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        found = config.get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        found = None
    return str(found) if found else f"local:{socket.gethostname()}:{os.getpid()}"


def job_store(args: argparse.Namespace) -> JobStore | None:
    """The job's record, when this run has one (``--job-id`` with ``DKDM_REDIS_URL`` set)."""
    url = os.environ.get("DKDM_REDIS_URL")
    if not (args.job_id and url):
        return None
    from services.jobs.store import JobStore

    store = JobStore(url, args.job_id)
    return store if store.exists() else None


def fail(store: JobStore | None, line: str, status: int) -> int:
    """One error line on stderr (the last line of Ray's log) and in the record."""
    print(f"services.engine: error: {line}", file=sys.stderr)
    if store is not None:
        try:
            if store.state() not in ("SUCCEEDED", "FAILED", "CANCELLED"):  # the engine's own verdict stands
                store.set_state("FAILED", error=line)
        except Exception as exc:
            log.warning("could not record the failure: %s", exc)
    return status


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        store = job_store(args)
    except Exception as exc:  # Redis unreachable: nothing to record it in
        return fail(None, " ".join(str(exc).split()), 2)
    if store is not None:
        store.begin_submission(submission_id())
    try:
        spec, plan = load_job(args)
    except (ValueError, KeyError, FileNotFoundError, ValidationError) as exc:
        return fail(store, " ".join(str(exc).split()), 2)
    from services.engine import distill_ray
    from services.engine.driver import error_line

    try:
        result = distill_ray(spec, job_id=args.job_id, progress=not args.quiet, plan=plan)
    except Exception as exc:
        log.exception("the job failed")  # the traceback, for the log; the line below says why
        return fail(store, error_line(exc), 1)
    shown = {k: round(v, 4) for k, v in result.metrics.items() if k in ("digits_fd", "digits_is", "train_seconds")}
    print(f"distillation finished: {result.steps} steps in {result.out} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
