"""The two rates a worker publishes in its heartbeat: one that falls when it idles (what `status` shows of a
stalled farm), one that does not (what the fleet planner counts a card as sustaining)."""

from __future__ import annotations

import time

import pytest

from fluxfarm.shared.rates import RATE_WINDOW_S
from fluxfarm.worker.serve.job_runner import RunnerStats


def test_idle_time_lowers_the_worker_rate_but_not_its_rate_while_rendering() -> None:
    stats = RunnerStats()
    assert stats.images_per_hour() is None and stats.busy_images_per_hour() is None
    now = time.monotonic()
    # five renders of 2 GPU seconds each, the last 240 s ago: a short run, then idle
    for ended_ago in (250.0, 248.0, 246.0, 244.0, 240.0):
        stats.rendered_at.append((now - ended_ago, 2.0))
    assert stats.busy_images_per_hour() == pytest.approx(5 / 10.0 * 3600)
    idle_inclusive = stats.images_per_hour()
    assert idle_inclusive is not None and idle_inclusive == pytest.approx(5 / 250.0 * 3600, rel=0.01)
    # a render older than the window counts in neither
    stats.rendered_at.appendleft((now - RATE_WINDOW_S - 1, 100.0))
    assert stats.busy_images_per_hour() == pytest.approx(5 / 10.0 * 3600)
