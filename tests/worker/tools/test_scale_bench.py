"""`fluxfarm bench-scale` on small sizes: each farm state it builds is the one it says (real client, real
redis-server), the reads it times are the real ones, and a drained dataset leaves less in Redis than its
backlog held."""

from __future__ import annotations

from fluxfarm.worker.tools.scale_bench import ScaleRow, run_scale_bench


def test_rows_describe_the_farm_states_they_time() -> None:
    rows: list[ScaleRow] = []
    run_scale_bench([40, 300], [7], rows.append)
    assert [(r.queued_jobs, r.datasets, r.done_jobs) for r in rows] == [(40, 1, 0), (300, 1, 0), (0, 1, 300), (7, 7, 0)]
    small, large, drained, _ = rows
    assert large.redis_used_bytes - small.redis_used_bytes > 260 * 1_000  # about 2.4 KB a queued job
    assert drained.redis_used_bytes < large.redis_used_bytes
    assert all(r.sweep_complete for r in rows)
    assert all(r.status_s > 0 and r.exporter_s > 0 and r.sweep_s > 0 for r in rows)
    assert large.submit_s > 0 and drained.submit_s == 0
