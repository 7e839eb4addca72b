"""Deployment files: docker-compose validates, Prometheus config checks, the Grafana dashboard and the
helm chart parse, and every metric they query is one the code really exports."""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Any

import yaml

from services.control_plane.metrics import EXPORTED
from services.serving.app import LATENCY
from tests.conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "dkdm.json"
CHART = ROOT / "helm" / "dkdm"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def exported_names() -> set[str]:
    return set(EXPORTED) | {LATENCY._name + suffix for suffix in HISTOGRAM_SUFFIXES}


def test_docker_compose_config_validates() -> None:
    env = {**os.environ, "DKDM_API_TOKEN": "x" * 24}
    proc = subprocess.run(["docker-compose", "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(subprocess.run(["docker-compose", "config"], cwd=ROOT, env=env, capture_output=True).stdout)
    assert {"redis", "ray-head", "ray-worker", "control-plane", "prometheus", "grafana"} <= set(config["services"])


def test_prometheus_config_checks() -> None:
    proc = subprocess.run(["promtool", "check", "config", "deploy/prometheus.yml"], cwd=ROOT, capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]  # rows have no targets
    for variable in dashboard["templating"]["list"]:
        exprs.append(variable["query"] if isinstance(variable["query"], str) else variable["query"]["query"])
    return {m for e in exprs for m in re.findall(r"\bdkdm_[a-z_]+\b", e)}


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = dashboard_metrics(dashboard)
    assert used and used <= exported_names(), used - exported_names()
    first_asked = (
        "dkdm_job_student_steps_total",  # student steps/s
        "dkdm_job_teacher_evaluations_total",  # teacher samples/s ...
        "dkdm_job_teacher_replicas",  # ... per replica
        "dkdm_job_student_busy_seconds_total",  # pipeline efficiency
        "dkdm_job_student_idle_ratio",
        "dkdm_job_teacher_fd",  # the quality figure
        "dkdm_job_state",
    )
    for needed in (*first_asked, "dkdm_job_progress_ratio", "dkdm_job_loss", "dkdm_job_pool_samples"):
        assert needed in used
    provisioned = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    queried = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert queried and all(p["datasource"]["uid"] == uid for p in queried)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_checked_in_dashboards_are_the_generated_ones() -> None:
    """Both copies (compose and the chart) are what `python -m deploy.dashboards` writes today."""
    from deploy.dashboards import TARGETS, render

    assert DASHBOARD in TARGETS and CHART / "dashboards" / "dkdm.json" in TARGETS
    text = render()
    for path in TARGETS:
        assert path.read_text() == text, f"{path} is stale: run python -m deploy.dashboards"


def values_paths(values: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in values.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= values_paths(value, f"{prefix}{key}.")
    return paths


def render_with_placeholders(text: str) -> str:
    """Helm isn't installed here: drop control lines and put a scalar where each action prints."""
    kept = [line for line in text.splitlines() if not re.fullmatch(r"\s*\{\{-? (if|else|end|define)\b.*", line)]
    indented = r"^\{\{ \.Files\.Get .*\| indent (\d+) \}\}$"
    kept = [re.sub(indented, lambda m: " " * int(m.group(1)) + "placeholder", line) for line in kept]
    return re.sub(r"\{\{-?.*?-?\}\}", "placeholder", "\n".join(kept))


def test_helm_chart_parses_and_uses_only_documented_values() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "dkdm"
    values_text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(values_text)
    known = values_paths(values)
    lines = values_text.splitlines()
    for i, line in enumerate(lines):  # every top-level value has a comment just above it
        if re.match(r"^[a-zA-Z]", line):
            assert lines[i - 1].startswith("#"), f"values.yaml: {line} is not documented"
    kinds = set()
    for template in sorted((CHART / "templates").glob("*.yaml")):
        text = template.read_text()
        for ref in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text):
            assert ref in known, f"{template.name} uses .Values.{ref}, which values.yaml does not define"
        for path in re.findall(r'\.Files\.Get "([^"]+)"', text):
            assert (CHART / path).is_file(), path
        for doc in yaml.safe_load_all(render_with_placeholders(text)):
            if doc:
                assert doc["apiVersion"] and doc["metadata"]["name"]
                kinds.add(doc["kind"])
    assert {"RayCluster", "Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= kinds


def _redis_dir(args: list[str]) -> str:
    assert args[args.index("--appendonly") + 1] == "yes", args  # job records survive a restart
    return args[args.index("--dir") + 1]


def test_compose_redis_keeps_an_append_only_file_on_a_volume() -> None:
    config = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    redis = config["services"]["redis"]
    directory = _redis_dir(redis["command"])
    volume, _, mount = redis["volumes"][0].partition(":")
    assert mount == directory and volume in config["volumes"]  # a named volume, not the container's layer


def test_helm_redis_keeps_an_append_only_file_on_a_claim() -> None:
    docs = [d for d in yaml.safe_load_all(render_with_placeholders((CHART / "templates/redis.yaml").read_text())) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    directory = _redis_dir(container["args"])
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert mount["mountPath"] == directory and mount["name"] == volume["name"]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # a ReadWriteOnce claim: never two pods
