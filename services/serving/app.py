"""The sampling service on Ray Serve: a FastAPI ingress and a multiplexed student deployment.

Students are served by name from the model registry in Redis (a finished job registers
``job-<id>``). The ``StudentSampler`` deployment loads a student the first time a request names it
(Serve model multiplexing, an LRU of ``MODELS_PER_REPLICA`` per replica) and Serve routes later
requests for it to a replica that already holds it, so a newly registered student is servable at
once, without a restart or a redeploy. Requests are not batched across callers: each carries its own
seed, step count and sampler, and batching them would change what a seed produces.
"""

# No `from __future__ import annotations` here: FastAPI reads the ingress methods' annotations at
# runtime, and Serve's class-based ingress needs them as real types, not strings.
import io
import json
import time
from typing import Any, Literal

import numpy as np
import redis
import torch
from fastapi import FastAPI, HTTPException, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from dkdm_core.checkpoint import read_card
from dkdm_core.data import to_uint8_nhwc
from dkdm_core.diffusion import Sampler
from dkdm_core.sampling import draw
from services.engine.store import ModelRegistry
from services.images import grid_image

MAX_NUM = 256  # samples per request: bounds the memory and time of one call
MAX_STEPS = 1000  # sampling steps per request (and never more than the model's T)
MODELS_PER_REPLICA = 8

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


def _registry(redis_url: str) -> ModelRegistry:
    return ModelRegistry(redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=10))


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


# Deployments are pickled when decorated: everything they call must be defined above this line.
@serve.deployment(ray_actor_options={"num_cpus": 1})
class StudentSampler:
    def __init__(self, redis_url: str) -> None:
        self.registry = _registry(redis_url)

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, name: str) -> tuple[torch.nn.Module, Any]:
        from dkdm_core.checkpoint import load_model

        entry = self.registry.get(name)
        if entry is None:
            raise KeyError(name)
        return load_model(entry["path"])

    async def sample(self, num: int, steps: int, sampler: Sampler, seed: int) -> np.ndarray:
        model, card = await self.get_model(serve.get_multiplexed_model_id())
        x = draw(model, card, num, seed, steps, sampler)  # O2MKD routers, BOOT and latent models too
        return to_uint8_nhwc(x) if x.ndim == 4 else x.numpy()


api = FastAPI(title="dkdm sampling", version="0.1.0", description="Samples from distilled students.")


@serve.deployment
@serve.ingress(api)
class SamplingAPI:
    def __init__(self, sampler: DeploymentHandle, redis_url: str) -> None:
        self.sampler = sampler
        self.registry = _registry(redis_url)

    @api.get("/v1/models")
    def models(self) -> dict[str, dict[str, Any]]:
        return self.registry.all()

    @api.post("/v1/models/{name}/samples")
    async def samples(self, name: str, request: SampleRequest) -> Response:
        start = time.perf_counter()
        entry = self.registry.get(name)
        if entry is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {name!r}; GET /v1/models lists them")
        card = read_card(entry["path"])
        if request.steps > card.diffusion.num_timesteps:
            detail = [{"loc": ["body", "steps"], "msg": f"at most the model's T = {card.diffusion.num_timesteps}"}]
            raise HTTPException(422, detail)
        handle = self.sampler.options(multiplexed_model_id=name)
        arr = await handle.sample.remote(request.num, request.steps, request.sampler, request.seed)
        response = _encode(arr, request.format)
        LATENCY.labels(model=name, format=request.format).observe(time.perf_counter() - start)
        return response

    @api.get("/metrics")
    def metrics(self) -> Response:
        return Response(generate_latest(METRICS), media_type=CONTENT_TYPE_LATEST)


def build(redis_url: str) -> Any:
    """The Serve application: ingress -> multiplexed student sampler."""
    return SamplingAPI.bind(StudentSampler.bind(redis_url), redis_url)


def deploy(redis_url: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Deploy (or update) the sampling app on the connected Ray cluster; it keeps running after we return."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build(redis_url), name="dkdm-sampling", route_prefix="/", blocking=False)
