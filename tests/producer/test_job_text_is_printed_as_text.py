"""Job text (prompts, failure reasons, worker names) reaches the terminal as text: Rich markup in it is
printed, never interpreted. A `[/x]` in a reason used to crash `fluxfarm status`, `wait` and
`submit --wait` (a closing tag with nothing open is an error in Rich)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import redis

from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared.datasets import DatasetBook
from fluxfarm.shared.job_records import DeadLetter
from tests.conftest import run_fluxfarm

REASON = "prompt 'a [/x] owl [bold]' failed: [red]unclosed"


def _env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {"FLUXFARM_BROKER_URL": redis_url, "FLUXFARM_STORAGE_URL": f"file://{tmp_path / 'store'}", "COLUMNS": "400"}


def test_status_and_wait_print_a_reason_with_markup_as_it_is(redis_server: RedisServer, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    letter = DeadLetter(
        dataset="marks", job_id="j1", reason=REASON, attempts=3, node="w[/y]@host", at=datetime.now(UTC), job={}
    )
    DatasetBook(client).dead_letter(letter)
    status = run_fluxfarm("status", env=_env(redis_server.url, tmp_path))
    assert status.returncode == 0, status.stderr
    assert REASON in status.stdout and "w[/y]@host" in status.stdout
    wait = run_fluxfarm("wait", "--dataset", "marks", env=_env(redis_server.url, tmp_path))
    assert "Traceback" not in wait.stderr, wait.stderr
    assert wait.returncode == 1  # a dataset with a failed job
    assert REASON in " ".join(wait.stderr.split()), wait.stderr
