"""Settings come from FLUXFARM_* variables; secrets in URLs are never printed."""

from __future__ import annotations

import pytest
from pydantic import model_validator

from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.errors import InvalidSettings, PlaceholderSecret
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.settings import FarmSettings, redact_url
from fluxfarm.worker.settings import WorkerSettings


def test_settings_read_fluxfarm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXFARM_BROKER_URL", "rediss://:pw@redis.example:6380/2")
    monkeypatch.setenv("FLUXFARM_STORAGE_URL", "s3://bucket/renders")
    monkeypatch.setenv("FLUXFARM_LEASE_S", "45")
    settings = FarmSettings()
    assert settings.broker_url == "rediss://:pw@redis.example:6380/2"
    assert settings.result_backend == settings.broker_url
    assert settings.lease_s == 45


def test_a_too_short_lease_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXFARM_LEASE_S", "1")
    with pytest.raises(InvalidSettings, match="FLUXFARM_LEASE_S"):
        FarmSettings()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:s3cret@host/1", "rediss://user:***@host/1"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


def test_the_lease_is_kombu_s_visibility_timeout_and_dead_workers_are_swept_often() -> None:
    from fluxfarm.shared.celery_app import make_celery_app

    app = make_celery_app(FarmSettings(lease_s=30))
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == 30
    assert options["unacked_restore_interval"] == 5 and options["unacked_restore_throttle"] == 1
    assert app.conf.broker_use_ssl is None


def test_rediss_urls_verify_the_server_certificate_unless_the_url_says_otherwise() -> None:
    import ssl

    from fluxfarm.shared.celery_app import make_celery_app

    app = make_celery_app(FarmSettings(broker_url="rediss://:pw@redis.example:6380/0"))
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert app.conf.redis_backend_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    app = make_celery_app(FarmSettings(broker_url="rediss://:pw@redis.example:6380/0?ssl_cert_reqs=required"))
    assert app.conf.broker_use_ssl is None  # the URL's own choice stands


def test_a_private_ca_reaches_celery_s_broker_and_backend_and_a_blank_one_is_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ssl

    from fluxfarm.shared.celery_app import make_celery_app

    settings = FarmSettings(broker_url="rediss://:pw@farm:6380/0", tls_ca_file="/etc/fluxfarm/ca.crt")
    app = make_celery_app(settings)
    wanted = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/fluxfarm/ca.crt"}
    assert app.conf.broker_use_ssl == wanted and app.conf.redis_backend_use_ssl == wanted
    monkeypatch.setenv("FLUXFARM_TLS_CA_FILE", "")
    monkeypatch.setenv("FLUXFARM_S3_ENDPOINT_URL", "")
    blank = FarmSettings()
    assert blank.tls_ca_file is None and blank.s3_endpoint_url is None


@pytest.mark.parametrize(
    ("env", "what"),
    [
        ({"FLUXFARM_BROKER_URL": "redis://producer:change-me@redis:6379/0"}, "Redis password"),
        ({"FLUXFARM_RESULT_BACKEND_URL": "redis://:change-me-too@redis:6379/1"}, "Redis password"),
        ({"AWS_SECRET_ACCESS_KEY": "change-me-too"}, "AWS_SECRET_ACCESS_KEY"),
    ],
)
def test_the_placeholder_secrets_of_env_example_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], what: str
) -> None:
    """Issue 18, finding 8: a farm started with infra/env.example's values ran with them."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PlaceholderSecret, match=f"{what}.*is still the placeholder") as refused:
        FarmSettings()
    assert "redis://" not in str(refused.value), "the refusal names no URL, so no other secret"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-real-secret")
    for name in env:
        if name.startswith("FLUXFARM_"):
            monkeypatch.setenv(name, env[name].replace("change-me", "s3cret"))
    FarmSettings()


def test_the_cache_is_bounded_by_default_and_an_empty_limit_unbounds_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert WorkerSettings().cache_max_gib == 200
    monkeypatch.setenv("FLUXFARM_CACHE_MAX_GIB", "")
    assert WorkerSettings().cache_max_gib is None


@pytest.mark.parametrize("name", ["FLUXFARM_LEVEL", "FLUXFARM_QUANT"])
def test_a_forced_level_is_read_by_its_name_and_its_earlier_one(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """`quant` means a job's constraint; the level a worker is forced to is `level`, and FLUXFARM_QUANT,
    which deployments already set, still works."""
    monkeypatch.setenv(name, "q4_k")
    assert WorkerSettings().level is QuantLevel.Q4_K
    monkeypatch.setenv(name, "Q9_Z")
    with pytest.raises(InvalidSettings, match="unknown quantization level 'Q9_Z'"):
        WorkerSettings()
    monkeypatch.setenv(name, "")
    assert WorkerSettings().level is None


def test_a_bad_setting_names_its_variables_and_reasons_but_never_a_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker or command started with a wrong FLUXFARM_* value says which and why in one line (the CLI prints
    it as `error: ...`), not a pydantic traceback; the value itself may be a secret."""
    monkeypatch.setenv("FLUXFARM_BROKER_URL", "ftp://farm:hunter2-secret@redis:6379/0")
    monkeypatch.setenv("FLUXFARM_MAX_BATCH", "banana")
    with pytest.raises(InvalidSettings) as refused:
        WorkerSettings()
    message = str(refused.value)
    assert message.startswith("invalid setting FLUXFARM_BROKER_URL: a Redis URL starts with")
    assert "redis:// or rediss://" in message and "FLUXFARM_MAX_BATCH: Input should be a valid integer" in message
    assert "hunter2" not in message and "banana" not in message
    with pytest.raises(InvalidSettings, match="FLUXFARM_RESULT_BACKEND_URL"):
        FarmSettings(broker_url="redis://farm:6379/0", result_backend_url="http://farm:6379/1")
    assert FarmSettings(broker_url="rediss://farm:6380/0", result_backend_url="").result_backend_url is None


def test_each_side_reads_its_own_settings_from_one_shared_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers and producers may share one .env: each class takes the farm's settings and its own side's,
    and ignores the other side's variables."""
    monkeypatch.setenv("FLUXFARM_BROKER_URL", "redis://farm:6379/0")
    monkeypatch.setenv("FLUXFARM_SUBMIT_CHUNK", "77")
    monkeypatch.setenv("FLUXFARM_MAX_BATCH", "3")
    worker, producer = WorkerSettings(), ProducerSettings()
    assert worker.broker_url == producer.broker_url == "redis://farm:6379/0"
    assert worker.max_batch == 3 and producer.submit_chunk == 77
    assert not hasattr(producer, "max_batch") and not hasattr(worker, "submit_chunk")
    shared = set(FarmSettings.model_fields)
    assert not (set(WorkerSettings.model_fields) - shared) & (set(ProducerSettings.model_fields) - shared)
    assert {"model", "level", "cache_dir", "lease_s"} <= set(WorkerSettings.model_fields)
    assert "model" not in ProducerSettings.model_fields and "cache_dir" not in ProducerSettings.model_fields


@pytest.mark.parametrize(("cls", "name"), [(FarmSettings, "cache_dir"), (ProducerSettings, "max_batch")])
def test_a_setting_of_the_other_side_given_by_keyword_is_an_error(cls: type[FarmSettings], name: str) -> None:
    """The environment's strangers are ignored, but a keyword is the caller's intent: dropping it silently
    would run with the default."""
    with pytest.raises(TypeError, match=f"has no setting {name}"):
        cls(**{name: 1})
    assert WorkerSettings(quant="q8_0").level is QuantLevel.Q8_0  # an alias is a name


class _PairedSettings(FarmSettings):
    """A setting whose check needs another one: a model validator's ValueError names no single field."""

    @model_validator(mode="after")
    def _backend_beside_broker(self) -> _PairedSettings:
        if self.result_backend_url == self.broker_url:
            raise ValueError("FLUXFARM_RESULT_BACKEND_URL must not be FLUXFARM_BROKER_URL")
        return self


def test_a_problem_of_the_whole_settings_reads_as_its_own_words() -> None:
    with pytest.raises(InvalidSettings) as refused:
        _PairedSettings(broker_url="redis://farm:6379/0", result_backend_url="redis://farm:6379/0")
    assert str(refused.value) == ("invalid setting FLUXFARM_RESULT_BACKEND_URL must not be FLUXFARM_BROKER_URL")
