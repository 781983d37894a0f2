"""A prompt file as a dataset, against a real worker process, Redis and moto S3: a producer killed half
way and resubmitted ends with every image exactly once; a finished dataset resubmits nothing; a dry run
names bad rows and enqueues nothing."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import redis

from shared.datasets import DatasetBook
from tests.conftest import FLUXFARM, Farm, queue_length, run_fluxfarm

pytestmark = pytest.mark.slow

SMALL = ("--width", "256", "--height", "256", "--steps", "1")


def _objects(farm: Farm, dataset: str) -> tuple[list[str], list[str]]:
    keys = farm.s3.keys(farm.bucket, f"{farm.prefix}/{dataset}/")
    return [k for k in keys if k.endswith(".png")], [k for k in keys if k.endswith(".json")]


def test_a_producer_killed_half_way_then_resubmitted_ends_with_every_image_once(farm: Farm, tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": f"a moth, study {i}", "seed": i}) for i in range(200)]
    full = tmp_path / "moths.jsonl"
    full.write_text("\n".join(rows) + "\n")
    stream = tmp_path / "stream.jsonl"
    os.mkfifo(stream)  # the producer reads rows as they are written, so it can die with half of them sent
    env = {**os.environ, **farm.worker_env(), "FLUXFARM_SUBMIT_CHUNK": "20"}
    args = ["submit", "--dataset", "moths", *SMALL]
    producer = subprocess.Popen([FLUXFARM, *args, "--skip-invalid", str(stream)], env=env, stderr=subprocess.PIPE)
    book = DatasetBook.from_url(farm.settings.broker_url)
    try:
        with stream.open("w") as pipe:
            pipe.write("\n".join(rows[:100]) + "\n")
            pipe.flush()
            deadline = time.monotonic() + 60
            while book.record("moths").total < 100:
                assert time.monotonic() < deadline, "the producer did not send the first half"
                time.sleep(0.05)
            producer.kill()  # SIGKILL: no cleanup, mid-file
            producer.wait()
        assert book.record("moths").total == 100

        again = run_fluxfarm(*args, "--wait", "--timeout", "400", str(full), env=env, timeout=600)
        assert again.returncode == 0, again.stderr
        assert "queued 100 jobs" in again.stderr  # the other 100 were stored, queued or running already
        pngs, metas = _objects(farm, "moths")
        assert len(pngs) == 200 and len(metas) == 200
        record = book.record("moths")
        assert (record.done, record.queued, record.running, record.failed) == (200, 0, 0, 0)
        assert record.levels == ["Q8_0"] and record.defaults["steps"] == 1

        finished = run_fluxfarm(*args, str(full), env=env)
        assert finished.returncode == 0, finished.stderr
        assert "nothing to enqueue: 200 jobs already stored" in finished.stderr
        assert queue_length(redis.Redis.from_url(farm.settings.broker_url)) == 0
    finally:
        book.close()


def test_a_dry_run_names_every_bad_line_and_enqueues_nothing(farm: Farm, tmp_path: Path) -> None:
    lines = [json.dumps({"prompt": f"a beetle {i}"}) for i in range(8)]
    lines[1] = json.dumps({"prompt": "a beetle", "steps": 0})
    lines[4] = '{"prompt": "unterminated'
    lines[6] = json.dumps({"prompt": "a beetle", "dataset": "../escape"})
    path = tmp_path / "beetles.jsonl"
    path.write_text("\n".join(lines) + "\n")
    env = farm.worker_env()
    broker = redis.Redis.from_url(farm.settings.broker_url)
    for mode in ("--dry-run", None):  # a normal run refuses the file whole, too
        done = run_fluxfarm("submit", str(path), "--dataset", "beetles", *SMALL, *([mode] if mode else []), env=env)
        assert done.returncode == 2, done.stderr
        assert [f"{path}:{n}" in done.stderr for n in (2, 5, 7)] == [True] * 3, done.stderr
        assert "3 invalid rows" in done.stderr
        assert queue_length(broker) == 0 and DatasetBook(broker).record("beetles").total == 0

    skipping = run_fluxfarm("submit", str(path), "--dataset", "beetles", *SMALL, "--skip-invalid", "--wait", env=env)
    assert skipping.returncode == 0, skipping.stderr
    assert "queued 5 jobs" in skipping.stderr and "3 invalid rows skipped" in skipping.stderr
    assert len(_objects(farm, "beetles")[1]) == 5
