"""The Grafana dashboard of dkdm jobs, defined once in Python with grafana-foundation-sdk.

``python -m deploy.dashboards`` writes it to both places that ship it: docker-compose's provisioning
folder and the helm chart's ``dashboards/`` (``.Files.Get``). ``--check`` only compares, for CI; a test
does the same and checks every query against the metric families the code exports.

Queries use the control plane's families (``services/control_plane/metrics.py``): rates are
``rate()`` over the engine's ``_total`` counters, per-replica figures divide by the live
``dkdm_job_teacher_replicas``, and every job panel follows the ``$job`` variable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, dashboard, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import ReduceDataOptions, VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, VizOrientation
from grafana_foundation_sdk.models.dashboard import DataSourceRef, DataTransformerConfig, VariableRefresh
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (ROOT / "deploy/grafana/dashboards/dkdm.json", ROOT / "helm/dkdm/dashboards/dkdm.json")
# The uid both provisioning files give the Prometheus data source.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="dkdm-prometheus")
JOB = 'job_id=~"$job"'
RATE = "[1m]"
HEIGHT = 8
HIDDEN_COLUMNS = {"Time": True, "Value": True, "__name__": True}

Panel = Any  # a grafana-foundation-sdk panel builder


def query(expr: str, legend: str = "{{job_id}}", ref: str = "A") -> prometheus.Dataquery:
    return prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)


def rate(counter: str) -> str:
    return f"rate({counter}{{{JOB}}}{RATE})"


def series(title: str, *targets: tuple[str, str], unit: str = "", width: int = 12) -> Panel:
    """A time series panel of (expr, legend) pairs, with a legend of last and max values."""
    legend = VizLegendOptions().display_mode(LegendDisplayMode.TABLE).placement(LegendPlacement.BOTTOM)
    panel = timeseries.Panel().title(title).datasource(DATASOURCE).height(HEIGHT).span(width)
    panel = panel.legend(legend.show_legend(True).calcs(["lastNotNull", "max"]))
    for i, (expr, legend_format) in enumerate(targets):
        panel = panel.with_target(query(expr, legend_format, chr(ord("A") + i)))
    return panel.unit(unit) if unit else panel


def jobs_row() -> list[Panel]:
    by_state = (
        bargauge.Panel()
        .title("Jobs by state")
        .datasource(DATASOURCE)
        .height(HEIGHT)
        .span(6)
        .orientation(VizOrientation.HORIZONTAL)
        .with_target(query("dkdm_jobs", "{{state}}"))
    )
    current = (
        table.Panel()
        .title("Job state")
        .description("Each selected job's current state and progress (step / total_steps).")
        .datasource(DATASOURCE)
        .height(HEIGHT)
        .span(6)
        .show_header(True)
        .with_target(query(f"dkdm_job_state{{{JOB}}} == 1", "{{state}}").instant().format(PromQueryFormat.TABLE))
        # An instant query as a table has Time, __name__ and Value columns too: job_id and state are the news.
        .with_transformation(DataTransformerConfig(id_val="organize", options={"excludeByName": HIDDEN_COLUMNS}))
    )
    progress = series("Progress", (f"dkdm_job_progress_ratio{{{JOB}}}", "{{job_id}}"), unit="percentunit")
    return [by_state, current, progress]


def throughput_row() -> list[Panel]:
    busy = rate("dkdm_job_student_busy_seconds_total")
    wait = rate("dkdm_job_student_wait_seconds_total")
    replicas = f"dkdm_job_teacher_replicas{{{JOB}}}"
    return [
        series("Student steps/s", (rate("dkdm_job_student_steps_total"), "{{job_id}}")),
        series(
            "Teacher samples/s per replica",
            (f"{rate('dkdm_job_teacher_evaluations_total')} / on (job_id) {replicas}", "{{job_id}} per replica"),
            (rate("dkdm_job_teacher_evaluations_total"), "{{job_id}} all replicas"),
        ),
        series(
            "Pipeline efficiency",
            (f"{busy} / ({busy} + {wait})", "{{job_id}} students busy"),
            (f"{wait} / ({busy} + {wait})", "{{job_id}} students idle (all ranks)"),
            (f"dkdm_job_student_idle_ratio{{{JOB}}}", "{{job_id}} idle (rank 0, whole run)"),
            (f"{rate('dkdm_job_teacher_busy_seconds_total')} / on (job_id) {replicas}", "{{job_id}} teachers busy"),
            unit="percentunit",
        ),
        series(
            "Teacher calls/s, pool samples advanced/s and replicas",
            (rate("dkdm_job_teacher_calls_total"), "{{job_id}} calls/s"),
            (rate("dkdm_job_pool_samples_advanced_total"), "{{job_id}} samples advanced/s"),
            (replicas, "{{job_id}} replicas"),
        ),
    ]


def quality_row() -> list[Panel]:
    score = (
        stat.Panel()
        .title("Quality score (teacher-feature FD)")
        .description("(fd - floor) / (ceiling - floor): 0 is as close as the teacher to itself, 1 is noise.")
        .datasource(DATASOURCE)
        .height(HEIGHT)
        .span(6)
        .reduce_options(ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(query(f'dkdm_job_teacher_fd{{{JOB}, figure="score"}}'))
    )
    return [
        series("Loss terms", (f"dkdm_job_loss{{{JOB}}}", "{{job_id}} {{term}}"), width=9),
        series(
            "Quality: teacher-feature FD over the run",
            (f'dkdm_job_teacher_fd{{{JOB}, figure=~"fd|floor|ceiling"}}', "{{job_id}} {{figure}}"),
            (f"dkdm_job_digits_fd{{{JOB}}}", "{{job_id}} digits FD"),
            width=9,
        ),
        score,
    ]


def pipeline_row() -> list[Panel]:
    pool = (
        bargauge.Panel()
        .title("Pool t-histogram (band 0 = lowest t)")
        .datasource(DATASOURCE)
        .height(HEIGHT)
        .span(12)
        .orientation(VizOrientation.VERTICAL)
        .with_target(query(f"sum by (band) (dkdm_job_pool_samples{{{JOB}}})", "band {{band}}"))
    )
    return [
        pool,
        series("Knowledge queue depth", (f"dkdm_job_queue_depth{{{JOB}}}", "{{job_id}} rank {{rank}}")),
        series(
            "Knowledge batches",
            (rate("dkdm_job_batches_produced_total"), "{{job_id}} produced/s"),
            (rate("dkdm_job_batches_consumed_total"), "{{job_id}} consumed/s"),
            (f"dkdm_job_leases_expired_total{{{JOB}}}", "{{job_id}} leases expired"),
            (f"dkdm_job_replica_restarts_total{{{JOB}}}", "{{job_id}} replica restarts"),
        ),
    ]


def sampling_row() -> list[Panel]:
    latency = "sum by (le) (rate(dkdm_sampling_request_duration_seconds_bucket[5m]))"
    return [
        series(
            "Sampling latency",
            (f"histogram_quantile(0.5, {latency})", "p50"),
            (f"histogram_quantile(0.95, {latency})", "p95"),
            unit="s",
        )
    ]


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model, panels numbered in order."""
    job = (
        dashboard.QueryVariable("job")
        .label("job")
        .datasource(DATASOURCE)
        .query("label_values(dkdm_job_step, job_id)")
        .include_all(True)
        .all_value(".*")
        .multi(True)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)  # new jobs appear without reloading the page
    )
    board = (
        dashboard.Dashboard("dkdm: distillation jobs")
        .uid("dkdm-jobs")
        .tags(["dkdm"])
        .editable()
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
        .with_variable(job)
    )
    rows = {
        "Jobs": jobs_row(),
        "Throughput and efficiency": throughput_row(),
        "Training and quality": quality_row(),
        "Pool and knowledge pipeline": pipeline_row(),
        "Sampling service": sampling_row(),
    }
    for title, panels in rows.items():
        board = board.with_row(dashboard.Row(title))
        for panel in panels:
            board = board.with_panel(panel)
    model = json.loads(JSONEncoder(sort_keys=True).encode(board.build()))
    for i, panel in enumerate(model["panels"], start=1):
        panel["id"] = i
    return model


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit status 1 if a file is stale")
    args = parser.parse_args(argv)
    text = render()
    stale = [p for p in TARGETS if not p.is_file() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} is stale: run python -m deploy.dashboards", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
