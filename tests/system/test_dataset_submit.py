"""A prompt file as a dataset, against a real worker process, Redis and moto S3: a producer killed half
way and resubmitted ends with every image exactly once; a finished dataset resubmits nothing; a dry run
names bad rows and enqueues nothing; the finished dataset exports to every format and loads with the
libraries people use; status agrees with storage; cancel drops queued jobs; priorities reorder."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.datasets import DatasetBook
from tests.conftest import FLUXFARM, Farm, queue_length, run_fluxfarm

pytestmark = pytest.mark.slow

SMALL = ("--width", "256", "--height", "256", "--steps", "1")


def _objects(farm: Farm, dataset: str) -> tuple[list[str], list[str]]:
    """The dataset's images and metadata objects (not its manifest, in a subfolder)."""
    folder = f"{farm.prefix}/{dataset}/"
    keys = [k for k in farm.s3.keys(farm.bucket, folder) if "/" not in k[len(folder) :]]
    return [k for k in keys if k.endswith(".png")], [k for k in keys if k.endswith(".json")]


def _moth_rows() -> list[str]:
    return [json.dumps({"prompt": f"a moth, study {i}", "seed": i}) for i in range(200)]


def test_a_producer_killed_half_way_then_resubmitted_ends_with_every_image_once(farm: Farm, tmp_path: Path) -> None:
    rows = _moth_rows()
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


@pytest.fixture(scope="module")
def moths(farm: Farm, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The first test's 200-image dataset, finished: resubmitting is idempotent, so this renders it only
    when that test did not run."""
    path = tmp_path_factory.mktemp("moths") / "moths.jsonl"
    path.write_text("\n".join(_moth_rows()) + "\n")
    done = run_fluxfarm(
        "submit",
        "--dataset",
        "moths",
        *SMALL,
        "--wait",
        "--timeout",
        "400",
        str(path),
        env=farm.worker_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return "moths"


def _export(farm: Farm, fmt: str, out: str, *extra: str) -> list[str]:
    done = run_fluxfarm("export", "--dataset", "moths", "--format", fmt, "--out", out, *extra, env=farm.worker_env())
    assert done.returncode == 0, done.stderr
    assert f"exported {16 if fmt == 'contact-sheet' else 200} jobs of moths" in done.stderr
    return done.stdout.split()


def test_an_imagefolder_export_loads_with_hugging_face_datasets(
    farm: Farm, moths: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    folder = tmp_path / "hf"
    _export(farm, "imagefolder", str(folder))
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "c"))
    assert len(loaded) == 200
    assert sorted(loaded["prompt"]) == sorted(json.loads(row)["prompt"] for row in _moth_rows())
    assert {"seed", "quant", "image_key", "timings_denoise_s"} <= set(loaded.column_names)
    first = loaded[0]
    assert first["image"].size == (256, 256) and first["quant"] == "Q8_0"


def test_webdataset_parquet_jsonl_and_contact_sheet_exports_hold_every_image(
    farm: Farm, moths: str, tmp_path: Path
) -> None:
    import io

    import boto3
    import pyarrow.parquet as pq
    import webdataset
    from PIL import Image

    from fluxfarm.shared.metadata import RenderResult

    pngs, metas = _objects(farm, "moths")
    shards = _export(farm, "webdataset", str(tmp_path / "wds"), "--shard-mb", "2")
    assert len(shards) >= 3 and all(Path(s.removeprefix("file://")).stat().st_size <= 2 << 20 for s in shards)
    samples = list(webdataset.WebDataset([s.removeprefix("file://") for s in shards], shardshuffle=False))
    assert len(samples) == 200 and all({"png", "json"} <= set(sample) for sample in samples)
    ids = [json.loads(sample["json"])["job_id"] for sample in samples]
    assert sorted(ids) == sorted(Path(k).stem for k in metas) and [s["__key__"] for s in samples] == ids

    bucket = farm.s3.new_bucket()
    [parquet_uri] = _export(farm, "parquet", f"s3://{bucket}/exports")
    assert parquet_uri == f"s3://{bucket}/exports/moths.parquet"
    s3 = boto3.client("s3", endpoint_url=farm.settings.s3_endpoint_url)
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key="exports/moths.parquet")["Body"].read()))
    assert table.num_rows == 200 and sorted(table.column("image_key").to_pylist()) == sorted(pngs)
    assert set(table.column("steps").to_pylist()) == {1} and "worker_node" in table.column_names

    [jsonl] = _export(farm, "jsonl", str(tmp_path / "jsonl"))
    lines = Path(jsonl.removeprefix("file://")).read_text().splitlines()
    assert sorted(RenderResult.model_validate_json(line).image.key for line in lines) == sorted(pngs)

    [sheet] = _export(farm, "contact-sheet", str(tmp_path / "sheet"), "--count", "16")
    assert Image.open(sheet.removeprefix("file://")).size == (4 * 256, 4 * 276)


def test_status_figures_match_the_stored_objects(farm: Farm, moths: str) -> None:
    from fluxfarm.shared.metadata import RenderResult

    done = run_fluxfarm("status", "--dataset", "moths", "--json", env=farm.worker_env())
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    [dataset] = report["datasets"]
    pngs, metas = _objects(farm, "moths")
    assert dataset["record"]["done"] == dataset["stored_metadata"] == len(metas) == 200
    assert dataset["stored_images"] == len(pngs) and dataset["record"]["queued"] == dataset["record"]["running"] == 0
    [worker] = report["fleet"]["workers"]
    s3 = farm.s3.client()
    rendered_by = [
        RenderResult.model_validate_json(s3.get_object(Bucket=farm.bucket, Key=key)["Body"].read()).worker.node
        for key in farm.s3.keys(farm.bucket, f"{farm.prefix}/")
        if key.endswith(".json") and "/fluxfarm/" not in key
    ]
    assert worker["images_rendered"] == rendered_by.count(worker["node"]) == len(rendered_by)
    assert worker["images_per_hour"] > 0
    wide = {**farm.worker_env(), "COLUMNS": "220"}
    table = run_fluxfarm("status", "--dataset", "moths", env=wide)
    assert "200/200" in table.stdout and "moths" in table.stdout
    watched = run_fluxfarm("status", "--dataset", "moths", "--watch", env=wide, timeout=60)  # ends: nothing left
    assert watched.returncode == 0 and "200/200" in watched.stdout


def test_cancel_drops_queued_jobs_and_priorities_reorder_the_queue(
    farm: Farm, tiny_model: Path, tmp_path: Path
) -> None:
    """Everything goes to exact:Q4_0, which no worker serves until the test starts one: the cancelled
    jobs must then be dropped unrendered, and high jobs must be served before normal and low ones."""
    from fluxfarm.shared.celery_app import waiting_messages
    from fluxfarm.shared.ladder import QuantLevel
    from fluxfarm.shared.metadata import RenderResult
    from fluxfarm.worker.tools.tiny_model import gguf_path
    from tests.conftest import start_worker

    env = farm.worker_env()
    queue = ("--quant", "exact:Q4_0", *SMALL)
    wasps = tmp_path / "wasps.txt"
    wasps.write_text("\n".join(f"a wasp {i}" for i in range(20)) + "\n")
    assert run_fluxfarm("submit", str(wasps), "--dataset", "wasps", *queue, env=env).returncode == 0
    cancelled = run_fluxfarm("cancel", "--dataset", "wasps", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelled 20 queued jobs of wasps; 0 running will finish" in cancelled.stderr
    for priority in ("low", "normal", "high"):
        rows = tmp_path / f"{priority}.txt"
        rows.write_text("\n".join(f"{priority} {i}" for i in range(4)) + "\n")
        sent = run_fluxfarm("submit", str(rows), "--dataset", "ranks", "--priority", priority, *queue, env=env)
        assert sent.returncode == 0, sent.stderr
    broker = redis.Redis.from_url(farm.settings.broker_url)
    assert waiting_messages(broker, ["render.exact.q4_0"]) == [32]

    worker = start_worker(  # one job at a time, so the finishing order is the serving order
        farm.settings,
        tiny_model,
        gguf_path(tiny_model, QuantLevel.Q4_0),
        tmp_path / "q4.log",
        "w-ranks",
        {"FLUXFARM_MAX_BATCH": "1"},
    )
    try:
        assert run_fluxfarm("wait", "--dataset", "ranks", "--timeout", "300", env=env, timeout=400).returncode == 0
        deadline = time.monotonic() + 60
        while waiting_messages(broker, ["render.exact.q4_0"]) != [0]:  # the cancelled messages, dropped
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert _objects(farm, "wasps") == ([], []) and DatasetBook(broker).record("wasps").cancelled == 20

        again = run_fluxfarm("submit", str(wasps), "--dataset", "wasps", *queue, "--wait", env=env, timeout=400)
        assert again.returncode == 0, again.stderr
        assert "queued 20 jobs" in again.stderr
        record = DatasetBook(broker).record("wasps")
        assert (record.done, record.cancelled, len(_objects(farm, "wasps")[1])) == (20, 0, 20)
    finally:
        worker.stop()
    s3 = farm.s3.client()
    results = [
        RenderResult.model_validate_json(s3.get_object(Bucket=farm.bucket, Key=key)["Body"].read())
        for key in _objects(farm, "ranks")[1]
    ]
    order = [r.job.prompt.split()[0] for r in sorted(results, key=lambda r: r.timings.finished_at)]
    assert order == ["high"] * 4 + ["normal"] * 4 + ["low"] * 4, order


def test_a_finished_dataset_streams_every_result_to_the_client_and_the_cli(
    farm: Farm, moths: str, client_settings: ProducerSettings
) -> None:
    """The client's stream both ways (straight to Redis, and through the gateway), then the CLI's."""
    from fluxfarm.producer.client import FarmClient

    with FarmClient(client_settings) as client:
        outcomes = list(client.as_completed("moths", timeout=60))
    assert len(outcomes) == 200 and all(o.ok and o.result is not None for o in outcomes)
    assert len({o.job_id for o in outcomes}) == 200 and {o.result.job.dataset for o in outcomes} == {"moths"}
    printed = run_fluxfarm("wait", "--dataset", "moths", "--results", env=farm.worker_env())
    assert printed.returncode == 0, printed.stderr
    lines = [line.split("\t") for line in printed.stdout.splitlines()]
    assert sorted(job_id for job_id, _ in lines) == sorted(o.job_id for o in outcomes)
    assert all(uri.startswith(f"s3://{farm.bucket}/{farm.prefix}/moths/") for _, uri in lines)
    shared = run_fluxfarm("wait", "--dataset", "moths", "--results", "--presign", "600", env=farm.worker_env())
    assert shared.returncode == 0, shared.stderr
    job_id, url = shared.stdout.splitlines()[0].split("\t")
    with urllib.request.urlopen(url, timeout=10) as response:  # presigned: no credentials needed
        assert response.read()[:4] == b"\x89PNG"
    assert "X-Amz-Signature=" in url and f"/moths/{job_id}.png" in url
