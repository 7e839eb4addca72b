"""Starting and watching engine runs through Ray's job submission API (what ``ray job submit`` uses).

A job may run several times (``POST /jobs/{id}/resume``); each run is its own Ray job, a *submission*,
named ``dkdm-<job id>`` the first time and ``dkdm-<job id>-r<n>`` for the n-th resume.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.job_submission import JobStatus, JobSubmissionClient

log = logging.getLogger(__name__)

ENTRYPOINT = "python -m services.engine --job-id {job_id} --quiet"
CLUSTER_INFO_TTL_S = 10.0  # the cluster's totals, asked at most this often
SUBMIT_WAIT_S = 60.0  # how long a submission waits for the head's job agent to come up
UNKNOWN = "UNKNOWN"  # the status of a submission the cluster answers it never heard of


def submission_id(job_id: str, run: int = 0) -> str:
    """The Ray submission id of a job's ``run``-th run (0: the first)."""
    return f"dkdm-{job_id}" if run == 0 else f"dkdm-{job_id}-r{run}"


class RayLauncher:
    def __init__(self, address: str, env: dict[str, str]) -> None:
        self.address = address
        self.env = env
        self._client: JobSubmissionClient | None = None
        # (when asked, the alive nodes' totals, the largest node's memory + object store), kept a while
        self._cluster: tuple[float, dict[str, float] | None, int] = (0.0, None, 0)

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:  # connect lazily: the app starts even while Ray is still coming up
            self._client = JobSubmissionClient(self.address)
        return self._client

    def submit(self, job_id: str, submission: str) -> str:
        """Submit one run; while the head's job agent is still coming up (Ray answers "No available
        agent to submit job, please try again later", seen right after a head starts on a loaded
        machine), try again for up to ``SUBMIT_WAIT_S``."""
        deadline = time.monotonic() + SUBMIT_WAIT_S
        while True:
            try:
                return self.client.submit_job(
                    entrypoint=ENTRYPOINT.format(job_id=job_id),
                    submission_id=submission,
                    runtime_env={"env_vars": self.env},
                )
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                log.info("Ray's job agent is not up yet; submitting %s again", submission)
                time.sleep(1.0)

    def status(self, submission: str) -> tuple[str, str] | None:
        """Ray's view of a submission: (status, message); ``(UNKNOWN, ...)`` when the cluster answered
        that it has no such job (a restarted head forgets every job), None when it did not answer."""
        try:
            info: Any = self.client.get_job_info(submission)
        except Exception as exc:
            # The SDK raises a RuntimeError carrying the HTTP status for an id it does not know; any
            # other failure (connection refused, timeout) is no opinion.
            if isinstance(exc, RuntimeError) and "status code 404" in str(exc):
                return UNKNOWN, f"the Ray cluster at {self.address} has no job {submission}"
            return None
        status = info.status.value if isinstance(info.status, JobStatus) else str(info.status)
        return status, info.message or ""

    def stop(self, submission: str) -> None:
        try:
            self.client.stop_job(submission)
        except Exception as exc:
            log.warning("could not stop Ray job %s: %s", submission, exc)

    def logs_tail(self, submission: str, chars: int = 2000) -> str:
        try:
            return str(self.client.get_job_logs(submission))[-chars:]
        except Exception:
            return ""

    def cluster_totals(self) -> dict[str, float] | None:
        """The alive nodes' resources in all (CPU, GPU, memory, object_store_memory), or None when Ray
        does not answer (asked again next time); kept for a few seconds, so a burst of requests asks Ray once."""
        asked, totals, _ = self._cluster
        if totals is not None and time.monotonic() - asked < CLUSTER_INFO_TTL_S:
            return totals
        try:
            from ray.util.state import list_nodes

            nodes = [n for n in list_nodes(address=self.address, timeout=5) if n.state == "ALIVE"]
        except Exception as exc:  # unreachable, or an older dashboard: the caller falls back
            log.info("no cluster resources from Ray at %s: %s", self.address, exc)
            return None
        if not nodes:  # a head still registering its node: no opinion yet (not kept)
            return None
        totals = {}
        largest = 0.0
        for node in nodes:
            resources = node.resources_total or {}
            for name, value in resources.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            largest = max(
                largest, float(resources.get("memory", 0.0)) + float(resources.get("object_store_memory", 0.0))
            )
        self._cluster = (time.monotonic(), totals, int(largest))
        return totals

    def largest_node_bytes(self) -> int | None:
        """Memory and object store of the largest alive node (as of the last ``cluster_totals``), if known."""
        _, totals, largest = self._cluster
        return largest if totals is not None and largest > 0 else None
