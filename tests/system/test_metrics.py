"""Prometheus metrics from real processes: a worker that rendered real jobs (and dead-lettered a
poison one) serves its families; `fluxfarm exporter` serves the fleet, queues and datasets from
Redis; the Grafana dashboard asks only for what they serve."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import promql_parser
import pytest
import yaml

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.local_stack import RedisServer, WorkerProcess, free_port
from fluxfarm.shared.errors import JobFailed
from tests.conftest import S3Server, farm_env, fresh_farm_settings, run_fluxfarm
from tests.fault_farm import SMALL_JOB, fault_worker
from tests.host_settings import HostSettings
from tests.metrics_scrape import scrape, start_exporter, value

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "fluxfarm.json"
ALERTS = ROOT / "infra" / "prometheus" / "alerts.yml"
RESULT_TIMEOUT_S = 300
WORKER_FAMILIES = {
    "fluxfarm_jobs",
    "fluxfarm_jobs_in_progress",
    "fluxfarm_render_phase_seconds",
    "fluxfarm_queue_wait_seconds",
    "fluxfarm_batch_size",
    "fluxfarm_model_load_seconds",
    "fluxfarm_vram_peak_bytes",
    "fluxfarm_vram_total_bytes",
    "fluxfarm_worker_info",
}


@dataclass(frozen=True)
class MetricsFarm:
    settings: HostSettings
    worker: WorkerProcess
    worker_port: int
    exporter_port: int


@pytest.fixture(scope="module")
def metrics_farm(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, redis_server: RedisServer, s3_server: S3Server
) -> Iterator[MetricsFarm]:
    work = tmp_path_factory.mktemp("metrics")
    settings = fresh_farm_settings(redis_server, s3_server, f"s3://{s3_server.new_bucket()}/renders", work)
    worker_port, exporter_port = free_port(), free_port()
    worker = fault_worker(
        settings,
        tiny_model,
        work / "worker.log",
        "w-metrics",
        {"poison_prompt": "POISON"},
        max_attempts="1",
        metrics_port=str(worker_port),
    )
    # A limit for this Redis, which has none, so the exporter serves it as the alert rules read it.
    exporter = start_exporter(exporter_port, {**farm_env(settings), "FLUXFARM_REDIS_MAXMEMORY_MIB": "1024"})
    with FarmClient(settings) as client:
        handles = list(
            client.submit_many(
                [{"prompt": f"a moth {i}", "dataset": "metrics", **SMALL_JOB} for i in range(3)]
                + [{"prompt": "a POISON moth", "dataset": "metrics", **SMALL_JOB}]
            )
        )
        for handle in handles[:3]:
            handle.result(timeout=RESULT_TIMEOUT_S)
        with pytest.raises(JobFailed, match="dead-lettered"):
            handles[3].result(timeout=RESULT_TIMEOUT_S)
    yield MetricsFarm(settings, worker, worker_port, exporter_port)
    exporter.terminate()
    exporter.wait(timeout=30)
    worker.stop()


def test_a_worker_serves_jobs_phases_queue_wait_load_time_and_vram_families(metrics_farm: MetricsFarm) -> None:
    families = scrape(metrics_farm.worker_port)
    assert set(families) >= WORKER_FAMILIES, sorted(WORKER_FAMILIES - set(families))
    jobs = families["fluxfarm_jobs"]
    assert value(jobs, "fluxfarm_jobs_total", level="Q8_0", outcome="rendered") == 3
    assert value(jobs, "fluxfarm_jobs_total", level="Q8_0", outcome="dead_lettered") == 1
    phases = families["fluxfarm_render_phase_seconds"]
    for phase in ("encode", "denoise", "decode", "png", "upload"):
        assert value(phases, "fluxfarm_render_phase_seconds_count", level="Q8_0", phase=phase) == 3
    assert value(phases, "fluxfarm_render_phase_seconds_sum", level="Q8_0", phase="denoise") > 0
    waits = families["fluxfarm_queue_wait_seconds"]
    assert value(waits, "fluxfarm_queue_wait_seconds_count", level="Q8_0") == 3
    assert value(waits, "fluxfarm_queue_wait_seconds_sum", level="Q8_0") > 0
    batches = families["fluxfarm_batch_size"]
    assert value(batches, "fluxfarm_batch_size_count", level="Q8_0") == 3
    loads = families["fluxfarm_model_load_seconds"]
    assert value(loads, "fluxfarm_model_load_seconds_count", level="Q8_0") == 1
    assert value(loads, "fluxfarm_model_load_seconds_sum", level="Q8_0") > 0
    assert value(families["fluxfarm_jobs_in_progress"], "fluxfarm_jobs_in_progress") == 0
    info = families["fluxfarm_worker_info"]
    assert value(info, "fluxfarm_worker_info", node="w-metrics", level="Q8_0", gpu="cpu", device="cpu") == 1
    # A CPU worker has no VRAM: the families are declared, with no sample (the device run shows them).
    assert families["fluxfarm_vram_peak_bytes"] == []
    assert "process_resident_memory_bytes" in families


def test_status_shows_the_heartbeat_s_metrics_url_and_facts(metrics_farm: MetricsFarm) -> None:
    env = {**farm_env(metrics_farm.settings), "COLUMNS": "220"}
    done = run_fluxfarm("status", "--json", env=env)
    assert done.returncode == 0, done.stderr
    workers = json.loads(done.stdout)["fleet"]["workers"]
    (worker,) = [w for w in workers if w["node"] == "w-metrics"]
    assert worker["metrics_url"].endswith(f":{metrics_farm.worker_port}/metrics")
    assert worker["torch_version"]
    assert worker["compute_capability"] is None and worker["vram_peak_gib"] is None  # a CPU worker
    table = run_fluxfarm("status", env=env).stdout
    assert "peak GiB" in table


def test_the_exporter_serves_fleet_queues_datasets_and_dead_letters(metrics_farm: MetricsFarm) -> None:
    families = scrape(metrics_farm.exporter_port)
    assert value(families["fluxfarm_broker_up"], "fluxfarm_broker_up") == 1
    up = families["fluxfarm_fleet_worker_up"]
    assert value(up, "fluxfarm_fleet_worker_up", node="w-metrics", level="Q8_0", gpu="cpu") == 1
    jobs = families["fluxfarm_dataset_jobs"]
    assert value(jobs, "fluxfarm_dataset_jobs", dataset="metrics", state="done") == 3
    assert value(jobs, "fluxfarm_dataset_jobs", dataset="metrics", state="failed") == 1
    assert value(jobs, "fluxfarm_dataset_jobs", dataset="metrics", state="queued") == 0
    assert value(families["fluxfarm_dead_letters"], "fluxfarm_dead_letters") == 1
    assert value(families["fluxfarm_dataset_eta_seconds"], "fluxfarm_dataset_eta_seconds", dataset="metrics") == 0
    waiting = families["fluxfarm_queue_waiting"]
    assert all(sample.value == 0 for sample in waiting) and waiting
    consumers = families["fluxfarm_queue_consumers"]
    assert sum(sample.value for sample in consumers) >= 1


def test_the_exporter_reports_a_broker_it_cannot_reach_instead_of_failing_the_scrape(tmp_path: Path) -> None:
    port = free_port()
    closed = free_port()
    exporter = start_exporter(port, {"FLUXFARM_BROKER_URL": f"redis://127.0.0.1:{closed}/0"})
    try:
        assert value(scrape(port)["fluxfarm_broker_up"], "fluxfarm_broker_up") == 0
    finally:
        exporter.terminate()
        exporter.wait(timeout=30)


def test_a_taken_metrics_port_leaves_the_worker_rendering_without_metrics() -> None:
    from fluxfarm.worker.serve.metrics import WorkerMetrics, serve_metrics

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve_metrics(WorkerMetrics(), "127.0.0.1", taken.getsockname()[1]) is None
    assert serve_metrics(WorkerMetrics(), "127.0.0.1", 0) is None  # 0: metrics off


def _named_families(exprs: list[str]) -> set[str]:
    """The metric families PromQL expressions read; each expression must parse as Prometheus parses it."""
    for expr in exprs:
        promql_parser.parse(expr)  # raises ValueError on a syntax error
    names = {name for expr in exprs for name in re.findall(r"fluxfarm_\w+", expr)}
    return {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in names}


def test_the_dashboard_queries_only_families_the_worker_and_exporter_serve(metrics_farm: MetricsFarm) -> None:
    served = set(scrape(metrics_farm.worker_port)) | set(scrape(metrics_farm.exporter_port))
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = (ROOT / "infra/grafana/provisioning/datasources/prometheus.yml").read_text()
    exprs = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] in datasource
            exprs.append(target["expr"])
    assert len(exprs) >= 20
    named = _named_families(exprs)
    assert named <= served, sorted(named - served)
    assert named >= WORKER_FAMILIES - {"fluxfarm_jobs_in_progress"}  # every worker family is on a panel


def test_the_alert_rules_parse_and_watch_only_served_families(metrics_farm: MetricsFarm) -> None:
    served = set(scrape(metrics_farm.worker_port)) | set(scrape(metrics_farm.exporter_port))
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} >= {"FluxfarmJobsWithNoWorker", "FluxfarmJobsDeadLettered"}
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"} and rule["annotations"]["summary"], rule
    named = _named_families([rule["expr"] for rule in rules])
    assert named <= served, sorted(named - served)


def test_the_deploy_page_names_every_family_the_worker_and_exporter_serve(metrics_farm: MetricsFarm) -> None:
    readme = (ROOT / "docs" / "deploy.md").read_text()
    served = set(scrape(metrics_farm.worker_port)) | set(scrape(metrics_farm.exporter_port))
    ours = {name for name in served if name.startswith("fluxfarm_")}
    assert len(ours) >= 18
    missing = [name for name in sorted(ours) if f"`{name}" not in readme and f"`{name}_total" not in readme]
    assert not missing, missing
