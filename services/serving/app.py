"""The sampling service on Ray Serve: a FastAPI ingress and a multiplexed student deployment.

Students are served by name from the model registry in Redis (a finished job registers
``job-<id>``). The ``StudentSampler`` deployment loads a student the first time a request names it
(Serve model multiplexing, an LRU of ``MODELS_PER_REPLICA`` per replica) and Serve routes later
requests for it to a replica that already holds it, so a newly registered student is servable at
once, without a restart or a redeploy. Requests are not batched across callers: each carries its own
seed, step count and sampler, and batching them would change what a seed produces.

Guards, since one request can cost minutes of a replica's CPU: sampling needs the control plane's bearer
token (``GET /v1/models`` stays open but shows no filesystem paths); each sampler replica runs at most
``DKDM_SAMPLING_MAX_ONGOING_REQUESTS`` requests, a few more wait, and the rest get 503 + Retry-After;
and one request may cost at most ``DKDM_SAMPLING_MAX_COST`` samples x network calls x parameters (422).

Devices follow the rule of every ``dkdm`` command (``DKDM_SAMPLING_DEVICE``: auto, cpu, cuda, cuda:N).
A sampler replica asks Ray for ``DKDM_SAMPLING_GPUS_PER_REPLICA`` GPUs and resolves its device itself,
inside the replica, since the process that deploys the app may have no GPU. Models run on that device
in fp32, as ``dkdm sample`` runs them, so a seed draws what the command draws on the same device; the
noise is drawn on the CPU and samples come back to it for encoding.
"""

# No `from __future__ import annotations` here: FastAPI reads the ingress methods' annotations at
# runtime, and Serve's class-based ingress needs them as real types, not strings.
import contextlib
import io
import json
import time
from functools import lru_cache
from typing import Annotated, Any, Literal

import numpy as np
import ray
import torch
from fastapi import Depends, FastAPI, HTTPException, Response, status
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from dkdm_core.checkpoint import CheckpointError, count_parameters, read_card
from dkdm_core.data import to_uint8_nhwc
from dkdm_core.diffusion import Sampler
from dkdm_core.runtime import pick_device
from dkdm_core.sampling import class_labels, draw, sampling_guidance, sampling_steps
from services.auth import bearer, check_bearer
from services.images import grid_image
from services.jobs.client import redis_client
from services.jobs.store import ModelRegistry
from services.serving.settings import SamplingSettings

MAX_NUM = 256  # samples per request: bounds the memory and time of one call
MAX_STEPS = 1000  # sampling steps per request (and never more than the model's T)
MODELS_PER_REPLICA = 8
# The ingress only awaits the samplers, so it may hold many requests; past these the HTTP proxy sheds load.
INGRESS_MAX_ONGOING = 100
INGRESS_MAX_QUEUED = 100
# What /v1/models shows of a registry entry: never its folder (a filesystem path).
PUBLIC_FIELDS = ("created", "job_id", "arch", "steps", "method")

Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

METRICS = CollectorRegistry()
LATENCY = Histogram(
    "dkdm_sampling_request_duration_seconds",
    "Time to answer a sampling request",
    labelnames=["model", "format"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=METRICS,
)


class SampleRequest(BaseModel):
    num: int = Field(16, ge=1, le=MAX_NUM, description=f"samples to draw (at most {MAX_NUM})")
    steps: int = Field(50, ge=1, le=MAX_STEPS, description="sampling steps (respaced from the model's T)")
    sampler: Sampler = "iddpm"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    format: Literal["png", "npz", "json"] = "png"
    # Class-conditional models: one class for every sample or one per sample (default: each class in
    # turn), and the classifier-free guidance scale (default: the model card's).
    class_labels: list[int] | None = Field(None, min_length=1, max_length=MAX_NUM)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0)


def _class_errors(card: Any, request: SampleRequest) -> list[dict[str, Any]]:
    """422 details for class fields the model cannot take, each naming its field."""
    errors = []
    for field, check in (
        ("class_labels", lambda: class_labels(card.classes, request.num, request.class_labels)),
        ("guidance_scale", lambda: sampling_guidance(card.classes, request.guidance_scale)),
    ):
        try:
            check()
        except ValueError as exc:
            errors.append({"loc": ["body", field], "msg": str(exc), "type": "value_error"})
    return errors


def _registry(redis_url: str) -> ModelRegistry:
    return ModelRegistry(redis_client(redis_url))


@lru_cache(maxsize=256)
def _parameters(path: str) -> int:
    # A registered folder is never rewritten in place (checkpoints are renamed into place), so a path's
    # count holds; reading safetensors headers costs a few ms, caching it keeps it off every request.
    return count_parameters(path)


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    shown = {k: entry[k] for k in PUBLIC_FIELDS if k in entry}
    with contextlib.suppress(CheckpointError, KeyError):  # an unreadable folder errs when sampled from
        shown["parameters"] = _parameters(entry["path"])
    return shown


def _too_costly(num: int, calls: int, parameters: int, budget: float) -> HTTPException | None:
    """422 naming ``num`` (or ``steps`` when even one sample is too costly) with what would fit."""
    cost = num * calls * parameters
    if cost <= budget:
        return None
    most = int(budget // (calls * parameters))
    what = f"num x steps x parameters = {num} x {calls} x {parameters} = {cost:.3g} exceeds the budget {budget:.3g}"
    if most >= 1:
        detail = {"loc": ["body", "num"], "msg": f"{what}: at most {most} samples at {calls} steps for this model"}
    else:
        most_steps = max(1, int(budget // parameters))
        detail = {"loc": ["body", "steps"], "msg": f"{what}: at most {most_steps} steps for one sample"}
    return HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, [{**detail, "type": "value_error"}])


def _encode(arr: np.ndarray, fmt: str) -> Response:
    if fmt == "json":
        body = json.dumps({"shape": list(arr.shape), "dtype": str(arr.dtype), "samples": arr.tolist()})
        return Response(body, media_type="application/json")
    if fmt == "npz":
        buffer = io.BytesIO()
        np.savez(buffer, arr_0=arr)
        return Response(buffer.getvalue(), media_type="application/octet-stream")
    if arr.ndim != 4:
        raise HTTPException(422, "png needs image samples; use npz or json")
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    buffer = io.BytesIO()
    grid_image(images).save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png")


def replica_device(name: str, gpu_ids: list[Any]) -> torch.device:
    """A sampler replica's device for the setting ``name``, given the GPUs Ray assigned it.

    ``auto`` is a GPU only when Ray gave the replica one: Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for
    an actor with no GPUs, so such a replica would otherwise see, and take, GPUs reserved for others.
    """
    if name == "auto":
        return pick_device("cuda" if gpu_ids else "cpu")
    return pick_device(name)  # cuda:N counts the GPUs Ray made visible; one that is missing is an error


def cluster_gpu_error(settings: SamplingSettings, cluster_gpus: float) -> str | None:
    """Why the cluster cannot place a sampler replica's GPUs (Serve would wait for them forever), or None."""
    wanted = settings.gpus_per_replica
    if wanted <= cluster_gpus:
        return None
    return (
        f"a sampler replica asks Ray for {wanted:g} GPU(s) (device {settings.sampling_device!r}), "
        f"but the cluster has {cluster_gpus:g}: use device cpu, or fewer GPUs per replica"
    )


# Deployments are pickled when decorated: everything they call must be defined above this line.
@serve.deployment(ray_actor_options={"num_cpus": 1})
class StudentSampler:
    def __init__(self, redis_url: str, device: str = "auto") -> None:
        self.registry = _registry(redis_url)
        # Here, not where the app is built: only the replica knows the GPUs Ray gave it.
        self.device = replica_device(device, ray.get_gpu_ids())

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, name: str) -> tuple[torch.nn.Module, Any]:
        from dkdm_core.checkpoint import load_model

        entry = self.registry.get(name)
        if entry is None:
            raise KeyError(name)
        return load_model(entry["path"], self.device)

    async def sample(
        self,
        num: int,
        steps: int,
        sampler: Sampler,
        seed: int,
        class_labels: list[int] | None = None,
        guidance_scale: float | None = None,
    ) -> np.ndarray:
        model, card = await self.get_model(serve.get_multiplexed_model_id())
        # O2MKD routers, BOOT, latent and class-conditional models too; x is on the CPU whatever the device
        x = draw(model, card, num, seed, steps, sampler, labels=class_labels, guidance_scale=guidance_scale)
        return to_uint8_nhwc(x) if x.ndim == 4 else x.numpy()


api = FastAPI(title="dkdm sampling", version="0.1.0", description="Samples from distilled students.")


@serve.deployment
@serve.ingress(api)
class SamplingAPI:
    def __init__(self, sampler: DeploymentHandle, settings: SamplingSettings) -> None:
        assert settings.redis_url is not None  # deploy() checks it
        self.sampler = sampler
        self.settings = settings
        self.registry = _registry(settings.redis_url)

    @api.get("/v1/models")
    def models(self) -> dict[str, dict[str, Any]]:
        return {name: _public(entry) for name, entry in self.registry.all().items()}

    @api.post("/v1/models/{name}/samples", responses={401: {}, 404: {}, 422: {}, 503: {}})
    async def samples(self, name: str, request: SampleRequest, credentials: Credentials) -> Response:
        check_bearer(self.settings.api_token, credentials)  # before anything else: no model names to strangers
        start = time.perf_counter()
        entry = self.registry.get(name)
        if entry is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {name!r}; GET /v1/models lists them")
        card = read_card(entry["path"])
        if request.steps > card.diffusion.num_timesteps:
            detail = [{"loc": ["body", "steps"], "msg": f"at most the model's T = {card.diffusion.num_timesteps}"}]
            raise HTTPException(422, detail)
        class_errors = _class_errors(card, request)
        if class_errors:
            raise HTTPException(422, class_errors)
        calls = sampling_steps(card, request.steps)
        guidance = sampling_guidance(card.classes, request.guidance_scale)
        if guidance is not None and guidance.scale != 1.0:
            calls *= 2  # a guided step runs the network on the conditional and the null label
        too_costly = _too_costly(request.num, calls, _parameters(entry["path"]), self.settings.sampling_max_cost)
        if too_costly is not None:
            raise too_costly
        handle = self.sampler.options(multiplexed_model_id=name)
        try:
            arr = await handle.sample.remote(
                request.num, request.steps, request.sampler, request.seed, request.class_labels, request.guidance_scale
            )
        except BackPressureError as exc:  # every replica busy and the wait list full: shed, do not queue
            retry = str(self.settings.sampling_retry_after_s)
            busy = f"all sampler replicas are busy; retry in {retry} s"
            raise HTTPException(503, busy, {"Retry-After": retry}) from exc
        response = _encode(arr, request.format)
        LATENCY.labels(model=name, format=request.format).observe(time.perf_counter() - start)
        return response

    @api.get("/metrics")
    def metrics(self) -> Response:
        return Response(generate_latest(METRICS), media_type=CONTENT_TYPE_LATEST)


def sampler_deployment(settings: SamplingSettings) -> Any:
    """The student sampler as ``settings`` bound it: its request limits and the GPUs it asks Ray for."""
    actor: dict[str, Any] = {"num_cpus": 1}
    if settings.gpus_per_replica > 0:
        actor["num_gpus"] = settings.gpus_per_replica
    return StudentSampler.options(
        max_ongoing_requests=settings.sampling_max_ongoing_requests,
        max_queued_requests=settings.sampling_max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=settings.sampling_retry_after_s),
        ray_actor_options=actor,
    )


def build(settings: SamplingSettings) -> Any:
    """The Serve application: ingress -> multiplexed student sampler, both bounded by ``settings``."""
    retry = settings.sampling_retry_after_s
    sampler = sampler_deployment(settings)
    ingress = SamplingAPI.options(
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        max_queued_requests=INGRESS_MAX_QUEUED,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=retry),
    )
    return ingress.bind(sampler.bind(settings.redis_url, settings.sampling_device), settings)


def deploy(settings: SamplingSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Deploy (or update) the sampling app on the connected Ray cluster; it keeps running after we return."""
    if settings.redis_url is None:
        raise ValueError("the sampling service reads the model registry from Redis: set DKDM_REDIS_URL")
    no_room = cluster_gpu_error(settings, ray.cluster_resources().get("GPU", 0.0))
    if no_room is not None:
        raise ValueError(no_room)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(settings), name="dkdm-sampling", route_prefix="/", blocking=False)
