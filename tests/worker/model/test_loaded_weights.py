"""A load hashes its weights beside itself and the first render: the digests are awaited by the first image's
record, not by the load or the render (worker/model/pipeline.py's LoadedWeights)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fluxfarm.shared.errors import ModelLoadError
from fluxfarm.shared.jobs import RenderJob
from fluxfarm.worker.model import pipeline
from fluxfarm.worker.model.file_digest import DigestCache
from fluxfarm.worker.model.pipeline import load_model
from fluxfarm.worker.model.reproduction import weight_digests
from fluxfarm.worker.render.engine import RenderEngine
from fluxfarm.worker.settings import WorkerSettings

HELD_S = 60.0
"""Longer than any load and render of the tiny model: reaching it means the hashing was waited for."""


def test_the_load_and_a_render_go_on_while_the_weights_are_hashed(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release, hashing_began = threading.Event(), threading.Event()

    def held_digests(*args: object) -> dict[str, str]:
        hashing_began.set()
        assert release.wait(HELD_S), "the hashing was never released"
        return weight_digests(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(pipeline, "weight_digests", held_digests)
    settings = WorkerSettings(cache_dir=tmp_path / "cache")
    loaded = load_model(str(tiny_model), None, "cpu", settings)
    assert hashing_began.is_set() and not release.is_set()
    assert loaded.weights.model_id == str(tiny_model)  # the names are known at once
    RenderEngine(loaded).render_batch([RenderJob(prompt="a kite", width=256, height=256, steps=2, seed=3)])
    with ThreadPoolExecutor(1) as pool:
        record = pool.submit(lambda: loaded.info)
        assert not record.done()  # the image's record waits for the digests
        release.set()
        info = record.result(timeout=HELD_S)
    want = weight_digests(tiny_model, None, DigestCache(tmp_path / "other-cache"))
    assert loaded.weights_sha256 == want and info.transformer_sha256 == want["transformer"]


def test_weights_that_cannot_be_hashed_say_so_once_and_no_record_is_written(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker acts on the failure (it leaves as a stranded worker does, worker/serve/runtime.py); a record asked
    for anyway is a clear load error, not a digest of nothing."""

    def unreadable(*_: object) -> dict[str, str]:
        raise PermissionError("weights gone unreadable under the worker")

    monkeypatch.setattr(pipeline, "weight_digests", unreadable)
    loaded = load_model(str(tiny_model), None, "cpu", WorkerSettings(cache_dir=tmp_path / "cache"))
    failures: list[BaseException] = []
    told = threading.Event()
    loaded.weights.on_failure(lambda error: (failures.append(error), told.set()))  # ended by now or will: one call
    with pytest.raises(ModelLoadError, match=r"could not hash the weights of .*unreadable"):
        _ = loaded.info
    assert told.wait(HELD_S) and [type(error) for error in failures] == [PermissionError]
