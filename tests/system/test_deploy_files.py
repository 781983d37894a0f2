"""docker-compose.yml, the Dockerfiles, the env example and the README, read as a deployer reads them."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from fluxfarm.producer.gateway.settings import GatewaySettings
from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.settings import PLACEHOLDER_SECRET_PREFIX, FarmSettings
from fluxfarm.worker.settings import WorkerSettings
from tests.compose_files import interpolate
from tests.host_settings import HostSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ["docker-compose.yml", "infra/compose.tls.yml", "infra/worker-host.yml"]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
WORKERS = [name for name in SERVICES if name.startswith("worker")]
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH", re.IGNORECASE)
VARIABLE_NAME = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)")


def env_example() -> dict[str, str]:
    lines = (ROOT / "infra" / "env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of a later file: mappings merge, sequences append, a command is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = copy.deepcopy(base)
        for key, value in override.items():
            replace = key in ("command", "entrypoint") or (key == "healthcheck" and "test" in value)
            merged[key] = value if replace or key not in merged else merge(merged[key], value)
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


def validate_compose(document: dict[str, Any]) -> None:
    jsonschema.validate(document, get_builtin_schema("vendor.compose-spec"))


@pytest.mark.parametrize("path", COMPOSE_FILES)
def test_compose_files_validate_against_the_compose_specification(path: str) -> None:
    document = yaml.safe_load((ROOT / path).read_text())
    validate_compose(document)
    # What the central host's .env (from infra/env.example) and a GPU host's worker.env hold.
    worker_env = {"FLUXFARM_BROKER_URL": "rediss://:pw@farm:6380/0", "FLUXFARM_STORAGE_URL": "s3://farm/renders"}
    filled = {**env_example(), **worker_env, "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}
    validate_compose(interpolate(document, filled))


def test_the_schema_check_catches_a_broken_file() -> None:
    broken = copy.deepcopy(COMPOSE)
    del broken["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]
    with pytest.raises(jsonschema.ValidationError, match="capabilities"):
        validate_compose(broken)


def test_the_tls_override_merged_into_the_farm_is_valid_and_serves_tls_with_the_guide_s_files() -> None:
    override = yaml.safe_load((ROOT / "infra" / "compose.tls.yml").read_text())
    merged = merge(COMPOSE, override)
    validate_compose(merged)
    redis = merged["services"]["redis"]
    assert redis["command"][0] == "/etc/fluxfarm/redis/start.sh" and "--appendonly" in redis["command"]
    assert "6380:6380" in redis["ports"] and "127.0.0.1:6379:6379" in redis["ports"]
    guide = (ROOT / "docs" / "deploy" / "multi-host.md").read_text()
    made = set(re.findall(r"(?:-keyout|-out|cp \S+) (\S+\.(?:crt|key))", guide))
    for path in [a for a in redis["command"] if a.startswith("/tls/")]:
        assert Path(path).name in {Path(m).name for m in made}, path
    assert {"minio/public.crt", "minio/private.key", "minio/CAs/ca.crt"} <= made
    assert "./infra/tls/minio:/certs:ro" in merged["services"]["minio"]["volumes"]


def test_compose_has_the_farm_services() -> None:
    assert {"redis", "minio", "minio-init", "worker", "producer", "exporter", "flower", "prometheus", "grafana"} <= set(
        SERVICES
    )


def _env(service: str) -> dict[str, str]:
    return {key: str(value) for key, value in SERVICES[service].get("environment", {}).items()}


def test_redis_persists_with_aof_refuses_eviction_and_starts_with_the_acl_users() -> None:
    command = SERVICES["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--maxmemory") + 1].startswith("${REDIS_MAXMEMORY:-"), "an explicit cap"
    assert (
        command[0] == "/etc/fluxfarm/redis/start.sh"
        and "./infra/redis:/etc/fluxfarm/redis:ro" in SERVICES["redis"]["volumes"]
    )
    assert not [arg for arg in command if "PASSWORD" in arg], "no password on the command line"
    users = re.findall(r"^user (\w+)", (ROOT / "infra" / "redis" / "users.acl").read_text(), re.MULTILINE)
    assert users == ["default", "admin", "worker", "producer", "gateway", "exporter", "flower"]
    for user in users[1:]:
        assert _env("redis")[f"REDIS_{user.upper()}_PASSWORD"].startswith(f"${{REDIS_{user.upper()}_PASSWORD:?")
    assert any(volume.endswith(":/data") for volume in SERVICES["redis"]["volumes"])


def test_each_fluxfarm_service_holds_its_own_redis_user_and_no_root_keys() -> None:
    """Issue 18, finding 8: one Redis password with every command, and MinIO's root keys, went to workers,
    producers and the exporter alike."""
    users = {"worker": "worker", "gateway": "gateway", "exporter": "exporter"}
    for service, user in users.items():
        assert _env(service)["FLUXFARM_BROKER_URL"].startswith(f"redis://{user}:${{REDIS_{user.upper()}_PASSWORD:?")
    assert _env("flower")["FLUXFARM_BROKER_URL"].startswith("redis://flower:${REDIS_FLOWER_PASSWORD:?")
    assert SERVICES["flower"]["entrypoint"] == ["celery", "-A", "fluxfarm.celery"], "the farm's own Celery app"
    assert _env("worker")["AWS_ACCESS_KEY_ID"] == "fluxfarm-worker"
    assert _env("gateway")["AWS_ACCESS_KEY_ID"] == "fluxfarm-producer"
    assert "AWS_SECRET_ACCESS_KEY" not in _env("exporter")
    holders = {name for name in SERVICES if any("MINIO_ROOT" in value for value in _env(name).values())}
    assert holders == {"minio", "minio-init"}
    assert _env("worker")["FLUXFARM_REMOTE_CONTROL"] == "true", "Flower is deployed beside them"


@pytest.mark.parametrize("role", ["worker", "producer"])
def test_minio_users_are_held_to_the_farm_bucket(role: str) -> None:
    policy = json.loads((ROOT / "infra" / "minio" / f"{role}-policy.json").read_text())
    writes = [s for s in policy["Statement"] if "s3:PutObject" in s["Action"]]
    assert [s["Resource"] for s in writes] == [["arn:aws:s3:::@BUCKET@/*"]]
    assert not [s for s in policy["Statement"] if any(a.startswith("s3:Delete") or a == "s3:*" for a in s["Action"])]
    init = (ROOT / "infra" / "minio" / "init.sh").read_text()
    assert f"{role}-policy.json" in init or "$role-policy.json" in init


def test_each_worker_service_reserves_its_own_gpu_and_stops_warm() -> None:
    """Docker hands every replica of one service the same card, so each GPU has its own service."""
    cards = []
    for name in WORKERS:
        worker = SERVICES[name]
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device
        cards += device["device_ids"]
        assert worker["stop_grace_period"] == "10m"
        assert any(volume.startswith("models-cache:") for volume in worker["volumes"])
        assert worker["environment"] == SERVICES["worker"]["environment"]  # one template
        assert worker["networks"]["default"]["aliases"] == ["workers"]
        assert name == "worker" or worker["profiles"] == [name.removeprefix("worker-")]
    assert cards == [str(i) for i in range(len(WORKERS))] and len(WORKERS) == 8


def test_prometheus_scrapes_every_worker_and_the_exporter_on_their_ports() -> None:
    config = yaml.safe_load((ROOT / "infra" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (workers,) = jobs["fluxfarm-workers"]["dns_sd_configs"]
    assert workers["names"] == ["workers"] and workers["port"] == int(SERVICES["worker"]["expose"][0])
    assert int(_env("worker")["FLUXFARM_METRICS_PORT"]) == workers["port"] == WorkerSettings().metrics_port
    (static,) = jobs["fluxfarm-farm"]["static_configs"]
    exporter = SERVICES["exporter"]
    port = exporter["command"][exporter["command"].index("--port") + 1]
    assert static["targets"] == [f"exporter:{port}"] and exporter["expose"] == [port]
    assert "./infra/prometheus:/etc/prometheus:ro" in SERVICES["prometheus"]["volumes"]
    (files,) = jobs["fluxfarm-workers"]["file_sd_configs"]
    assert files["files"] == ["/etc/prometheus/targets/*.yml"]
    assert (ROOT / "infra" / "prometheus" / "targets").is_dir()
    (rules,) = config["rule_files"]  # the mounted ./infra/prometheus
    assert (ROOT / "infra" / "prometheus" / Path(rules).relative_to("/etc/prometheus")).is_file()


def test_grafana_is_provisioned_with_the_datasource_and_dashboard_it_mounts() -> None:
    grafana = SERVICES["grafana"]
    mounts = dict(volume.rsplit(":", 1)[0].split(":", 1) for volume in grafana["volumes"] if volume.startswith("./"))
    provider = yaml.safe_load((ROOT / "infra/grafana/provisioning/dashboards/fluxfarm.yml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert mounts["./infra/grafana/dashboards"] == dashboards_dir
    assert mounts["./infra/grafana/provisioning"] == "/etc/grafana/provisioning"
    source = yaml.safe_load((ROOT / "infra/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_dir}/fluxfarm.json"


def test_monitoring_stays_on_the_host_and_flower_needs_a_password() -> None:
    assert SERVICES["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    assert SERVICES["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert SERVICES["grafana"]["ports"] == ["127.0.0.1:3000:3000"]
    assert SERVICES["redis"]["ports"] == ["127.0.0.1:6379:6379"]
    assert "${FLOWER_PASSWORD:?" in SERVICES["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    assert "${GRAFANA_ADMIN_PASSWORD:?" in SERVICES["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]


@pytest.mark.parametrize(
    "service", ["redis", "minio", "worker", "gateway", "exporter", "flower", "prometheus", "grafana"]
)
def test_long_running_services_have_healthchecks(service: str) -> None:
    assert SERVICES[service]["healthcheck"]["test"][0] == "CMD"


@pytest.mark.parametrize("service", ["redis", "minio", "prometheus", "grafana"])
def test_stateful_services_keep_their_data_in_named_volumes(service: str) -> None:
    named = [volume.split(":", 1)[0] for volume in SERVICES[service]["volumes"]]
    assert set(named) & set(COMPOSE["volumes"]), service


def test_services_start_after_what_they_need() -> None:
    for service in ("worker", "gateway"):
        needs = SERVICES[service]["depends_on"]
        assert needs["redis"]["condition"] == "service_healthy"
        assert needs["minio-init"]["condition"] == "service_completed_successfully"
    assert SERVICES["producer"]["depends_on"] == {"gateway": {"condition": "service_healthy"}}


def test_producers_hold_a_gateway_token_and_no_redis_password_nor_storage_keys() -> None:
    """Issue 19, acceptance 6: the producer-side Redis and MinIO credentials live in the gateway alone."""
    producer = _env("producer")
    assert producer == {"FLUXFARM_API_URL": "http://gateway:8080", "FLUXFARM_API_TOKEN": "${FLUXFARM_API_TOKEN:-}"}
    holders = {name for name in SERVICES if any("REDIS_PRODUCER_PASSWORD" in value for value in _env(name).values())}
    assert holders == {"redis"}, "no service runs on the direct producer user; the gateway has its own"
    assert SERVICES["gateway"]["ports"] == ["127.0.0.1:8080:8080"], "others come in through the TLS proxy"
    tls = yaml.safe_load((ROOT / "infra" / "compose.tls.yml").read_text())["services"]["gateway-proxy"]
    assert tls["ports"] == ["8443:8443"] and "./infra/caddy/Caddyfile:/etc/caddy/Caddyfile:ro" in tls["volumes"]
    caddyfile = (ROOT / "infra" / "caddy" / "Caddyfile").read_text()
    assert "tls /tls/server.crt /tls/server.key" in caddyfile and "max_size" in caddyfile


def test_no_secret_is_baked_into_compose() -> None:
    for name in SERVICES:
        for key, value in _env(name).items():
            if SECRET_NAMES.search(key):
                assert value.startswith("${"), f"{name}.{key} must come from the environment"
    worker_env = _env("worker")
    assert "${REDIS_WORKER_PASSWORD" in worker_env["FLUXFARM_BROKER_URL"]


def test_every_placeholder_of_env_example_is_one_the_farm_refuses() -> None:
    secrets = {name: value for name, value in env_example().items() if SECRET_NAMES.search(name)}
    assert secrets and all(value.startswith(PLACEHOLDER_SECRET_PREFIX) or value == "" for value in secrets.values())


def test_env_example_names_every_variable_compose_reads() -> None:
    for path in ("docker-compose.yml", "infra/compose.tls.yml"):
        wanted = set(VARIABLE_NAME.findall((ROOT / path).read_text()))
        assert wanted <= set(env_example()), wanted - set(env_example())


def test_farm_env_names_every_setting_and_every_fluxfarm_container_loads_it() -> None:
    """infra/farm.env lists every FLUXFARM_* setting with its default, commented out, and holds no secret."""
    text = (ROOT / "infra" / "farm.env").read_text()
    for name, field in HostSettings.model_fields.items():
        match = re.search(rf"^# FLUXFARM_{name.upper()}=(.*)$", text, re.MULTILINE)
        assert match, name
        default = field.get_default(call_default_factory=True)
        if isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, list):  # as the variable spells it: comma-separated
            shown = ",".join(map(str, default))
        else:
            shown = "" if default is None else str(default)
        assert match.group(1) == shown, name
    assert not [line for line in text.splitlines() if line and not line.startswith("#")]  # nothing set
    for name in [*WORKERS, "producer", "exporter"]:
        assert SERVICES[name]["env_file"] == ["infra/farm.env"], name


@pytest.mark.parametrize("path", COMPOSE_FILES)
def test_compose_fluxfarm_variables_are_real_settings(path: str) -> None:
    fields = {f"FLUXFARM_{name.upper()}" for name in HostSettings.model_fields}
    document = yaml.safe_load((ROOT / path).read_text())
    for name, service in document["services"].items():
        for key in service.get("environment", {}):
            if key.startswith("FLUXFARM_") and name != "minio-init":
                assert key in fields, f"{path}: {name}.{key}"


@pytest.mark.parametrize(("dockerfile", "installs_gpu"), [("worker.Dockerfile", True), ("producer.Dockerfile", False)])
def test_dockerfiles_run_as_a_user_and_install_the_right_extras(dockerfile: str, installs_gpu: bool) -> None:
    text = (ROOT / "infra" / dockerfile).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0].startswith("FROM ")
    assert ("cuda" in lines[0]) == installs_gpu
    assert any(line.startswith("USER ") and "root" not in line for line in lines)
    assert ("'.[gpu]'" in text) == installs_gpu
    assert not SECRET_NAMES.search(" ".join(line for line in lines if line.startswith(("ENV", "ARG"))))
    for source in re.findall(r"^COPY (\S+)", text, re.MULTILINE):
        assert (ROOT / source).exists(), source


def test_the_configuration_reference_lists_every_setting_under_the_side_that_reads_it() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    sections = dict(re.findall(r"^## (.+)\n((?:.*\n)*?)(?=^## |\Z)", reference, re.MULTILINE))
    shared = set(FarmSettings.model_fields)
    for title, names in (
        ("The farm: every process", shared),
        ("Workers", set(WorkerSettings.model_fields) - shared),
        ("Producers", set(ProducerSettings.model_fields) - shared),
        ("The gateway", set(GatewaySettings.model_fields) - set(ProducerSettings.model_fields)),
    ):
        listed = set(re.findall(r"^\| `FLUXFARM_([A-Z0-9_]+)`", sections[title], re.MULTILINE))
        assert listed == {name.upper() for name in names}, title


def test_the_worker_image_lets_a_tight_budget_use_fragmented_memory_and_exposes_its_metrics() -> None:
    text = (ROOT / "infra" / "worker.Dockerfile").read_text()
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in text
    assert f"EXPOSE {WorkerSettings().metrics_port}" in text


def test_both_compose_files_cap_redis_memory_with_a_value_redis_takes(redis_server: RedisServer) -> None:
    """Without a maxmemory Redis grows until the kernel kills it; the cap's default is one Redis parses."""
    tls = yaml.safe_load((ROOT / "infra" / "compose.tls.yml").read_text())["services"]["redis"]["command"]
    capped = [command[command.index("--maxmemory") + 1] for command in (SERVICES["redis"]["command"], tls)]
    assert capped[0] == capped[1]
    default = interpolate(capped[0], {})
    client = redis.Redis.from_url(redis_server.url)
    before = client.config_get("maxmemory")["maxmemory"]
    try:
        client.config_set("maxmemory", default)
        assert int(client.config_get("maxmemory")["maxmemory"]) == 4 * 2**30
    finally:
        client.config_set("maxmemory", before)
    assert env_example()["REDIS_MAXMEMORY"] == default
