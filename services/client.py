"""A client of the control plane's REST API and of the sampling service: the ``Client`` class for Python
and the logic behind ``dkdm jobs``.

It imports neither the server nor torch, so it is cheap to use from a notebook or a script. Every
failure is a :class:`ClientError` whose text is one line: the API's status and detail (``422
optim.batch_size: Input should be greater than 0`` — the field as ``--set`` names it) or the URL that
could not be reached.
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests
from pydantic import BaseModel, ConfigDict

# Where `dkdm serve api` and `dkdm serve sampling` listen by default (and docker-compose publishes them).
DEFAULT_API_URL = "http://127.0.0.1:8080"
DEFAULT_SAMPLE_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
# Path and body wrappers FastAPI puts first in a 422's loc: the user knows the field, not the envelope.
LOC_ENVELOPES = ("body", "path", "query")
MAX_LINE = 500


class ClientError(Exception):
    """A request that failed; ``str()`` is one line. ``exit_status``: 2 for the caller's mistake, 1 for a
    service that failed or could not be reached (the ``dkdm`` command's convention)."""

    exit_status = 1


class ApiError(ClientError):
    """The service answered with an error status."""

    def __init__(self, status: int, detail: Any, retry_after: float | None = None) -> None:
        self.status = status
        self.detail = detail
        self.retry_after = retry_after  # seconds, when a 503 said when to come back
        # 429 (too many jobs running) is the service's state, not a mistake in the request.
        self.exit_status = 2 if 400 <= status < 500 and status != 429 else 1
        text = describe_detail(detail)
        if status == 401:
            text += " (the token is read from DKDM_API_TOKEN)"
        super().__init__(_one_line(f"{status} {text}"))


class Unreachable(ClientError):
    """Nothing answered at the URL (refused, unknown host, timed out)."""


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_LINE]


def describe_detail(detail: Any) -> str:
    """FastAPI's ``detail``: a message, or a list of ``{loc, msg}`` shown as ``field: message; ...``."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, dict) and "msg" in detail:
        detail = [detail]
    if isinstance(detail, list) and all(isinstance(e, dict) and "msg" in e for e in detail):
        parts = []
        for err in detail:
            loc = [str(p) for p in err.get("loc", [])]
            if loc and loc[0] in LOC_ENVELOPES:
                loc = loc[1:]
            parts.append(f"{'.'.join(loc)}: {err['msg']}" if loc else str(err["msg"]))
        return "; ".join(parts)
    return json.dumps(detail)


class JobCreated(BaseModel):
    id: str
    state: str


class JobView(BaseModel):
    """``GET /jobs/{id}``; fields the server adds later are kept (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow")

    id: str
    state: str
    step: int
    total_steps: int
    progress: float
    created: float
    updated: float
    error: str = ""
    out: str = ""
    metrics: dict[str, float] = {}
    counters: dict[str, float] = {}
    checkpoints: list[str] = []
    spec: dict[str, Any] = {}

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass
class Client:
    """The control plane at ``url`` and the sampling service at ``sample_url``; ``token`` is the bearer
    token both need for anything that changes state or costs compute."""

    url: str = DEFAULT_API_URL
    token: str | None = None
    sample_url: str = DEFAULT_SAMPLE_URL
    timeout: float = 30.0
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    @classmethod
    def from_env(cls) -> Client:
        """``DKDM_API_URL``, ``DKDM_API_TOKEN`` and ``DKDM_SAMPLE_URL`` (the sampling service is a
        separate Ray Serve app with its own address)."""
        return cls(
            url=os.environ.get("DKDM_API_URL") or DEFAULT_API_URL,
            token=os.environ.get("DKDM_API_TOKEN") or None,
            sample_url=os.environ.get("DKDM_SAMPLE_URL") or DEFAULT_SAMPLE_URL,
        )

    def _request(self, method: str, url: str, what: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = self.session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
        except requests.Timeout as exc:
            raise Unreachable(f"{what} at {url} did not answer within {self.timeout:g} s") from exc
        except requests.ConnectionError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else _one_line(str(exc))[:200]
            raise Unreachable(f"cannot reach {what} at {url} ({reason})") from exc
        if response.status_code >= 400:
            raise ApiError(response.status_code, _detail(response), _seconds(response.headers.get("Retry-After")))
        return response

    def _api(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, self.url.rstrip("/") + path, "the control plane", **kwargs).json()

    # Jobs -----------------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any]) -> JobCreated:
        return JobCreated.model_validate(self._api("POST", "/jobs", json=spec))

    def jobs(self) -> list[JobView]:
        return [JobView.model_validate(v) for v in self._api("GET", "/jobs")]

    def job(self, job_id: str) -> JobView:
        return JobView.model_validate(self._api("GET", f"/jobs/{_part(job_id)}"))

    def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate(self._api("POST", f"/jobs/{_part(job_id)}/cancel"))

    def scale(self, job_id: str, teacher_replicas: int) -> JobView:
        body = {"teacher_replicas": teacher_replicas}
        return JobView.model_validate(self._api("POST", f"/jobs/{_part(job_id)}/scale", json=body))

    def resume(self, job_id: str) -> JobView:
        """Start a stopped job again from its last checkpoint (``POST /jobs/{id}/resume``)."""
        return JobView.model_validate(self._api("POST", f"/jobs/{_part(job_id)}/resume"))

    def watch(self, job_id: str, every: float = 1.0) -> Iterator[JobView]:
        """The job's view every ``every`` seconds, until (and including) the first finished one."""
        while True:
            view = self.job(job_id)
            yield view
            if view.finished:
                return
            time.sleep(every)

    def models(self) -> dict[str, dict[str, Any]]:
        return self._api("GET", "/models")

    # Sampling -------------------------------------------------------------------------------------

    def sample(
        self,
        model: str,
        num: int,
        steps: int = 50,
        sampler: str = "iddpm",
        seed: int = 0,
        retries: int = 3,
        class_labels: list[int] | None = None,
        guidance_scale: float | None = None,
    ) -> np.ndarray:
        """``num`` samples of a registered student: uint8 NHWC images, or float arrays for 2-D toys.
        A class-conditional student takes ``class_labels`` (one for all samples, or one each; default:
        every class in turn) and ``guidance_scale`` (default: its card's).

        A 503 with ``Retry-After`` (every sampler replica busy) is retried ``retries`` times after the
        wait the service asks for; any other error is raised at once."""
        url = f"{self.sample_url.rstrip('/')}/v1/models/{_part(model)}/samples"
        body: dict[str, Any] = {"num": num, "steps": steps, "sampler": sampler, "seed": seed, "format": "npz"}
        if class_labels is not None:
            body["class_labels"] = class_labels
        if guidance_scale is not None:
            body["guidance_scale"] = guidance_scale
        attempt = 0
        while True:
            try:
                response = self._request("POST", url, "the sampling service", json=body)
            except ApiError as exc:
                if exc.status != 503 or exc.retry_after is None or attempt >= retries:
                    raise
                attempt += 1
                time.sleep(exc.retry_after)
                continue
            return _read_samples(response.content, url)


def _part(name: str) -> str:
    """A job id or model name, quoted as one path segment; dots too, since the HTTP library would
    resolve a ``..`` segment into another route before sending."""
    return urllib.parse.quote(name, safe="").replace(".", "%2E")


def _read_samples(content: bytes, url: str) -> np.ndarray:
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as data:
            return data["arr_0"]
    except (ValueError, OSError, KeyError) as exc:
        raise ClientError(f"the sampling service at {url} answered without an arr_0 .npz: {exc}") from exc


def _seconds(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header else None
    except ValueError:  # an HTTP date: not what our services send; do not wait on a guess
        return None


def _detail(response: requests.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip().splitlines()[0] if response.text.strip() else response.reason
    return body.get("detail", body) if isinstance(body, dict) else body
