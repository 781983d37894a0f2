"""docker-compose.yml, the Dockerfiles, the env example and the README, read as a deployer reads them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from shared.settings import FarmSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SECRET_NAMES = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH", re.IGNORECASE)


def _env(service: str) -> dict[str, str]:
    return {key: str(value) for key, value in SERVICES[service].get("environment", {}).items()}


def test_compose_has_the_farm_services() -> None:
    assert {"redis", "minio", "minio-init", "worker", "producer"} <= set(SERVICES)


def test_redis_persists_with_aof_refuses_eviction_and_needs_a_password() -> None:
    command = SERVICES["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")
    assert any(volume.endswith(":/data") for volume in SERVICES["redis"]["volumes"])


def test_worker_reserves_one_gpu_and_stops_warm() -> None:
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert SERVICES["worker"]["stop_grace_period"] == "10m"
    assert any(volume.startswith("models-cache:") for volume in SERVICES["worker"]["volumes"])


@pytest.mark.parametrize("service", ["redis", "minio"])
def test_stateful_services_have_healthchecks_and_volumes(service: str) -> None:
    assert SERVICES[service]["healthcheck"]["test"]
    assert SERVICES[service]["volumes"]


def test_services_start_after_what_they_need() -> None:
    for service in ("worker", "producer"):
        needs = SERVICES[service]["depends_on"]
        assert needs["redis"]["condition"] == "service_healthy"
        assert needs["minio-init"]["condition"] == "service_completed_successfully"


def test_no_secret_is_baked_into_compose() -> None:
    for name in SERVICES:
        for key, value in _env(name).items():
            if SECRET_NAMES.search(key):
                assert value.startswith("${"), f"{name}.{key} must come from the environment"
    worker_env = _env("worker")
    assert "${REDIS_PASSWORD" in worker_env["FLUXFARM_BROKER_URL"]


def test_env_example_names_every_variable_compose_reads() -> None:
    wanted = set(re.findall(r"\$\{([A-Z_]+)", (ROOT / "docker-compose.yml").read_text()))
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / "infra" / "env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert wanted <= example, wanted - example


def test_compose_worker_settings_are_real_settings() -> None:
    fields = {f"FLUXFARM_{name.upper()}" for name in FarmSettings.model_fields}
    for service in ("worker", "producer"):
        for key in _env(service):
            if key.startswith("FLUXFARM_"):
                assert key in fields, key


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


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in FarmSettings.model_fields:
        assert f"`FLUXFARM_{name.upper()}`" in readme, name
