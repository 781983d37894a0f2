"""Exactly one stored result per job id when writers race: conditional puts on S3 (moto over HTTP)
and on disk, and the reconciliation a losing writer does."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fluxfarm.shared.errors import ObjectExists
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.local_store import LocalStore
from fluxfarm.shared.metadata import ImageInfo, ModelInfo, RenderResult, Timings, WorkerInfo, read_result
from fluxfarm.shared.s3_store import S3Store
from fluxfarm.shared.storage import ObjectStore
from fluxfarm.worker.serve.result_store import ResultStore
from tests.conftest import S3Server

JOB = parse_job({"prompt": "a contested job", "dataset": "race"})


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, s3_server: S3Server, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "s3":
        yield S3Store(s3_server.new_bucket(), "renders", endpoint_url=s3_server.endpoint_url)
    else:
        yield LocalStore(tmp_path / "store", "renders")


def _result(store: ObjectStore, png: bytes, node: str) -> RenderResult:
    keys = store.result_keys(JOB.dataset, JOB.id)
    now = datetime.now(UTC)
    return RenderResult(
        job_id=JOB.id,
        job=JOB,
        model=ModelInfo(id="tiny", transformer="tiny.gguf", transformer_sha256="0" * 64),
        quant="Q8_0",
        worker=WorkerInfo(node=node, hostname="h", device="cpu", gpu_name=None, vram_gib=None),
        timings=Timings(
            queued_at=None,
            started_at=now,
            finished_at=now,
            load_s=0,
            encode_s=0,
            denoise_s=0,
            decode_s=0,
            upload_s=0,
        ),
        image=ImageInfo(
            key=keys.image,
            uri=store.uri(keys.image),
            sha256=hashlib.sha256(png).hexdigest(),
            bytes=len(png),
            width=1,
            height=1,
        ),
        metadata_key=keys.metadata,
        fluxfarm_version="test",
    )


def _write(results: ResultStore, png: bytes, node: str) -> RenderResult:
    """One writer's whole store step: PNG, then the JSON."""
    keys = results.store.result_keys(JOB.dataset, JOB.id)
    results.put_image(keys, png, {})
    return results.put_result(keys, _result(results.store, png, node), png, dict)


def _stored_pair(store: ObjectStore) -> tuple[RenderResult, str]:
    keys = store.result_keys(JOB.dataset, JOB.id)
    return read_result(store, keys), hashlib.sha256(store.get(keys.image)).hexdigest()


def test_a_conditional_put_refuses_an_existing_object(store: ObjectStore) -> None:
    key = store.key("race", "once.json")
    store.put(key, b"first", "application/json", if_absent=True)
    with pytest.raises(ObjectExists):
        store.put(key, b"second", "application/json", if_absent=True)
    assert store.get(key) == b"first"
    store.put(key, b"third", "application/json")  # unconditional puts still overwrite
    assert store.get(key) == b"third"


def test_a_late_second_writer_leaves_one_pair_that_agrees(store: ObjectStore) -> None:
    """A finishes; B (a lapsed claim) then writes its PNG and loses the JSON: the pair must agree."""
    results = ResultStore(store, retry_s=0)
    _write(results, b"png of A", "A")
    kept = _write(results, b"png of B", "B")
    stored, image_sha = _stored_pair(store)
    assert stored.image.sha256 == image_sha, "the stored JSON describes the stored PNG"
    assert kept == stored


def test_a_second_writer_of_the_same_image_returns_the_first_result(store: ObjectStore) -> None:
    """Same seed, same level: the same PNG. B's write changes nothing and B reports A's result."""
    results = ResultStore(store, retry_s=0)
    first = _write(results, b"the same png", "A")
    kept = _write(results, b"the same png", "B")
    assert kept == first == _stored_pair(store)[0]


def test_a_writer_whose_png_replaced_the_winner_s_stores_its_own_json(store: ObjectStore) -> None:
    """A writes its PNG; B writes its PNG over it; A's JSON lands first: B must replace that JSON."""
    results = ResultStore(store, retry_s=0)
    keys = store.result_keys(JOB.dataset, JOB.id)
    results.put_image(keys, b"png of A", {})
    results.put_image(keys, b"png of B", {})
    results.put_result(keys, _result(store, b"png of A", "A"), b"png of A", dict)  # A did not see B's PNG
    kept = results.put_result(keys, _result(store, b"png of B", "B"), b"png of B", dict)
    stored, image_sha = _stored_pair(store)
    assert kept == stored and stored.worker.node == "B" and stored.image.sha256 == image_sha
