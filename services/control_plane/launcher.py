"""Starting and watching engine runs through Ray's job submission API (what ``ray job submit`` uses)."""

from __future__ import annotations

import logging
from typing import Any

from ray.job_submission import JobStatus, JobSubmissionClient

log = logging.getLogger(__name__)

ENTRYPOINT = "python -m services.engine --job-id {job_id} --quiet"


def submission_id(job_id: str) -> str:
    return f"dkdm-{job_id}"


class RayLauncher:
    def __init__(self, address: str, env: dict[str, str]) -> None:
        self.address = address
        self.env = env
        self._client: JobSubmissionClient | None = None

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:  # connect lazily: the app starts even while Ray is still coming up
            self._client = JobSubmissionClient(self.address)
        return self._client

    def submit(self, job_id: str, resources: dict[str, float] | None = None) -> str:
        return self.client.submit_job(
            entrypoint=ENTRYPOINT.format(job_id=job_id),
            submission_id=submission_id(job_id),
            runtime_env={"env_vars": self.env},
        )

    def status(self, job_id: str) -> tuple[str, str] | None:
        """Ray's view of the run: (status, message), or None if Ray does not know it."""
        try:
            info: Any = self.client.get_job_info(submission_id(job_id))
        except Exception:  # unknown id, or the cluster is unreachable: no opinion
            return None
        status = info.status.value if isinstance(info.status, JobStatus) else str(info.status)
        return status, info.message or ""

    def stop(self, job_id: str) -> None:
        try:
            self.client.stop_job(submission_id(job_id))
        except Exception as exc:
            log.warning("could not stop Ray job %s: %s", submission_id(job_id), exc)

    def logs_tail(self, job_id: str, chars: int = 2000) -> str:
        try:
            return str(self.client.get_job_logs(submission_id(job_id)))[-chars:]
        except Exception:
            return ""
