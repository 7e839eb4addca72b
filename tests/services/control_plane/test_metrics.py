"""The control plane's metrics are the engine's Redis records, named as the deploy files expect."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from services.control_plane.metrics import EXPORTED, EngineCollector
from services.engine.embedded import RedisServer
from services.jobs.store import JobStore


def test_collector_exports_every_declared_family_from_a_job_record() -> None:
    with RedisServer() as server:
        store = JobStore(server.url, "abcdefabcdef")
        store.create({"steps": 10}, state="RUNNING", total_steps=10)
        store.update(step=4)
        store.add(**{name: 1 for name in ("student_steps_total", "teacher_calls", "batches_consumed")})
        store.set_metrics(
            {"loss": 0.5, "mse": 0.4, "vlb": 0.1, "idle_fraction": 0.02, "digits_fd": 9.0, "teacher_fd_score": 0.25}
        )
        store.set_shard(0, {"histogram": [3, 4]})
        store.set_queue_depths([2])
        store.heartbeat("driver", replicas=3)
        registry = CollectorRegistry()
        registry.register(EngineCollector(store.r, server.url))
        families = {m.name for m in registry.collect()}
        text = generate_latest(registry).decode()
    declared = {name.removesuffix("_total") for name in EXPORTED}
    assert families == declared
    assert 'dkdm_job_progress_ratio{job_id="abcdefabcdef"} 0.4' in text
    assert 'dkdm_job_state{job_id="abcdefabcdef",state="RUNNING"} 1.0' in text
    assert 'dkdm_job_state{job_id="abcdefabcdef",state="PENDING"} 0.0' in text
    assert 'dkdm_job_teacher_replicas{job_id="abcdefabcdef"} 3.0' in text
    assert 'dkdm_job_teacher_fd{figure="score",job_id="abcdefabcdef"} 0.25' in text
    assert 'dkdm_job_pool_samples{band="1",job_id="abcdefabcdef",shard="0"} 4.0' in text
    assert (
        'dkdm_jobs{state="RUNNING"} 1.0' in text and 'dkdm_job_teacher_calls_total{job_id="abcdefabcdef"} 1.0' in text
    )
