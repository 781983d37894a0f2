"""`fluxfarm bench-submit`: how fast `fluxfarm submit FILE` enqueues a large dataset, and its peak memory.

Writes a prompt file of N distinct rows, starts a private redis-server (the machine's own Redis is
never touched), and runs the real `fluxfarm submit` command on it as a child process: the rate is
rows over the command's whole wall time (start-up, the validation pass and the enqueue pass), the
memory is the child's peak resident set. A second submit of the same file measures a resume with
nothing left to send.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
from pydantic import BaseModel

from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared.celery_app import QUEUE_ANY, waiting_messages


class SubmitBenchRow(BaseModel):
    rows: int
    run: str
    """"first" (everything enqueued) or "resubmit" (everything already queued)."""
    seconds: float
    jobs_per_s: float
    peak_rss_mib: float
    enqueued: int
    queue_length: int


def write_prompt_file(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for i in range(rows):
            handle.write(json.dumps({"prompt": f"a study of light on water, plate {i}", "seed": i}) + "\n")


def _timed_submit(path: Path, env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """Seconds, peak RSS (MiB) and stderr of one `fluxfarm submit` child."""
    command = [sys.executable, "-m", "fluxfarm", "submit", str(path), "--dataset", "bench-submit"]
    with log.open("w") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage, not all children's
        seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    if child.returncode != 0:
        raise RuntimeError(f"fluxfarm submit failed ({child.returncode}): {text.strip()}")
    return seconds, usage.ru_maxrss / 1024, text  # ru_maxrss is in KiB on Linux


def run_submit_bench(rows: int) -> list[SubmitBenchRow]:
    results = []
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server:
        folder = Path(tmp)
        prompts = folder / "prompts.jsonl"
        write_prompt_file(prompts, rows)
        env = {
            **os.environ,
            "FLUXFARM_BROKER_URL": server.url,
            "FLUXFARM_STORAGE_URL": f"file://{folder / 'store'}",
        }
        broker = redis.Redis.from_url(server.url)
        for run in ("first", "resubmit"):
            seconds, peak_mib, stderr = _timed_submit(prompts, env, folder / f"{run}.log")
            enqueued = rows if run == "first" else 0
            expected = f"queued {rows} jobs" if run == "first" else f"{rows} already queued or running"
            if expected not in stderr:
                raise RuntimeError(f"unexpected submit report: {stderr.strip()}")
            results.append(
                SubmitBenchRow(
                    rows=rows,
                    run=run,
                    seconds=seconds,
                    jobs_per_s=rows / seconds,
                    peak_rss_mib=peak_mib,
                    enqueued=enqueued,
                    queue_length=waiting_messages(broker, [QUEUE_ANY])[0],
                )
            )
        broker.close()
    return results
