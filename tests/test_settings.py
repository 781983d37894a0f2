"""Settings come from FLUXFARM_* variables; secrets in URLs are never printed."""

from __future__ import annotations

import pytest

from shared.settings import FarmSettings, redact_url


def test_settings_read_fluxfarm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXFARM_BROKER_URL", "rediss://:pw@redis.example:6380/2")
    monkeypatch.setenv("FLUXFARM_STORAGE_URL", "s3://bucket/renders")
    monkeypatch.setenv("FLUXFARM_VISIBILITY_TIMEOUT_S", "9000")
    settings = FarmSettings()
    assert settings.broker_url == "rediss://:pw@redis.example:6380/2"
    assert settings.result_backend == settings.broker_url
    assert settings.visibility_timeout_s == 9000


def test_a_too_short_visibility_timeout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUXFARM_VISIBILITY_TIMEOUT_S", "5")
    with pytest.raises(ValueError, match="visibility_timeout_s"):
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
