"""The distributed engine: pool shards, teacher replicas and student trainers on Ray, metadata in Redis.

``distill_ray`` is what ``dkdm distill --engine ray`` and ``python -m services.engine`` run.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# Every actor process of a job imports this package first: the shards and queues need neither models
# nor diffusers, so nothing heavy is imported here.
if TYPE_CHECKING:
    from dkdm_core.plan import JobPlan
    from dkdm_core.spec import DistillSpec
    from services.runner import RunResult


def distill_ray(
    spec: DistillSpec, job_id: str | None = None, progress: bool = True, plan: JobPlan | None = None
) -> RunResult:
    """Run a job on ``RAY_ADDRESS`` / ``DKDM_REDIS_URL``, or on a local Ray and a private redis-server."""
    from services.engine.driver import new_job_id, run_job
    from services.engine.embedded import ray_cluster, redis_url

    with redis_url() as url, ray_cluster():
        job_id = job_id or os.environ.get("DKDM_JOB_ID") or new_job_id()
        return run_job(spec, job_id, url, progress=progress, plan=plan)
