"""A command or worker started with a wrong FLUXFARM_* value stops with one line naming the variable, not a
pydantic or redis-py traceback (the worker's came after its model had loaded, at the first connection)."""

from __future__ import annotations

import pytest

from tests.conftest import run_fluxfarm


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (["status"], {"FLUXFARM_BROKER_URL": "ftp://farm:hunter2@redis:6379/0"}, "FLUXFARM_BROKER_URL: "),
        (["worker", "--model", "unused"], {"FLUXFARM_MAX_BATCH": "hunter2"}, "FLUXFARM_MAX_BATCH: "),
    ],
)
def test_a_bad_setting_is_one_error_line(args: list[str], env: dict[str, str], said: str) -> None:
    done = run_fluxfarm(*args, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: invalid setting ") and said in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr, done.stderr
