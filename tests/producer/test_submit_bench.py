"""`fluxfarm bench-submit` as a user runs it: a real submit of a generated file into a private Redis."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_fluxfarm


def test_bench_submit_enqueues_every_row_once_and_reports_rate_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "submit.jsonl"
    done = run_fluxfarm("bench-submit", "--rows", "500", "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    first, resubmit = (json.loads(line) for line in out.read_text().splitlines())
    assert (first["run"], first["enqueued"], first["queue_length"]) == ("first", 500, 500)
    assert (resubmit["run"], resubmit["enqueued"], resubmit["queue_length"]) == ("resubmit", 0, 500)
    assert first["jobs_per_s"] > 0 and 10 < first["peak_rss_mib"] < 4096
    assert "jobs/s" in done.stdout
