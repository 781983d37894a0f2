"""Property-based checks (hypothesis) of what the queue, the CLI and storage accept: any JSON object is a
valid job or an InvalidJob, never a crash; an accepted job keeps every bound and round-trips with its
id; no dataset name, job id or key can put an object outside the store's prefix, unicode tricks included."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fluxfarm.shared.errors import InvalidJob, StorageError
from fluxfarm.shared.jobs import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE_PX,
    MIN_SIDE_PX,
    RenderJob,
    parse_dataset_name,
    parse_job,
)
from fluxfarm.shared.local_store import LocalStore

JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)
HOSTILE_NAMES = st.sampled_from(
    [
        "..",
        "../etc",
        "a/../../b",
        "/abs",
        "a\\..\\b",
        "\uff0e\uff0e",
        "a\u2215b",
        "\uff41bc",
        "a\x00b",
        ".hidden",
        "-x",
        "",
        "a" * 129,
    ]
)
"""Traversal, absolute paths, backslashes, fullwidth dots and letters, a division slash, NUL, too long."""
FIELD_VALUES = {
    "prompt": st.text(max_size=60) | st.just("x" * (MAX_PROMPT_CHARS + 1)) | JSON_VALUES,
    "prompt_2": st.none() | st.text(max_size=20) | JSON_VALUES,
    "seed": st.integers(-5, MAX_SEED + 5) | JSON_VALUES,
    "width": st.integers(0, 4096) | JSON_VALUES,
    "height": st.integers(0, 4096) | JSON_VALUES,
    "steps": st.integers(-2, 200) | JSON_VALUES,
    "guidance": st.floats() | JSON_VALUES,
    "max_sequence_length": st.integers(-2, 600) | JSON_VALUES,
    "dataset": st.text(max_size=20) | HOSTILE_NAMES | JSON_VALUES,
    "quant": st.sampled_from(["auto", "min:Q4_0", "exact:Q8_0", "exact:nope", "min:"]) | st.text(max_size=10),
    "job_id": st.none() | st.text(max_size=20) | HOSTILE_NAMES,
}
JOB_OBJECTS = st.fixed_dictionaries(
    {"prompt": FIELD_VALUES["prompt"]},
    optional={**{k: v for k, v in FIELD_VALUES.items() if k != "prompt"}, "unknown": JSON_VALUES},
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _inside(store: LocalStore, key: str) -> bool:
    return (store.root / key).resolve().is_relative_to(store.root / store.prefix)


@PROPERTY
@given(JOB_OBJECTS)
@example({"prompt": "p", "dataset": "../etc"})
@example({"prompt": "p\x00"})
@example({"prompt": "p", "guidance": math.nan})
@example({"prompt": "p", "job_id": "\uff0e\uff0e"})
def test_any_json_object_is_a_valid_job_or_a_clear_refusal(
    tmp_path_factory: pytest.TempPathFactory, data: dict
) -> None:
    try:
        job = parse_job(data)
    except InvalidJob as error:
        assert str(error)  # a reason, never an empty message or another exception type
        return
    assert 1 <= len(job.prompt) <= MAX_PROMPT_CHARS and "\x00" not in job.prompt
    assert 0 <= job.seed <= MAX_SEED and 1 <= job.steps <= 100 and math.isfinite(job.guidance)
    assert all(MIN_SIDE_PX <= side <= MAX_SIDE_PX and side % 16 == 0 for side in (job.width, job.height))
    again = parse_job(json.loads(json.dumps(job.model_dump(mode="json"))))  # through the queue and back
    assert again == job and again.id == job.id
    store = LocalStore(tmp_path_factory.getbasetemp() / "store", "renders")
    keys = store.result_keys(job.dataset, job.id)
    assert _inside(store, keys.image) and _inside(store, keys.metadata)


@PROPERTY
@given(st.text(max_size=140) | HOSTILE_NAMES)
def test_no_dataset_name_reaches_outside_the_prefix(tmp_path_factory: pytest.TempPathFactory, name: str) -> None:
    store = LocalStore(tmp_path_factory.getbasetemp() / "store", "renders")
    try:
        dataset = parse_dataset_name(name)
    except InvalidJob:
        return
    assert dataset.isascii() and "/" not in dataset and ".." not in dataset and not dataset.startswith(".")
    assert _inside(store, store.result_keys(dataset, "j").image)
    assert _inside(store, store.manifest_key(dataset))


@PROPERTY
@given(st.lists(st.text(max_size=12) | HOSTILE_NAMES, min_size=1, max_size=4).map("/".join))
@example("renders/../../etc/passwd")
@example("/etc/passwd")
def test_every_store_operation_refuses_keys_that_could_escape(
    tmp_path_factory: pytest.TempPathFactory, key: str
) -> None:
    store = LocalStore(Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())))  # one per example
    try:
        store.put(key, b"x", "application/octet-stream")
    except StorageError:
        return
    assert key.isascii() and all(part and part != ".." and not part.startswith(".") for part in key.split("/"))
    assert _inside(store, key) and store.get(key) == b"x"
    store.delete(key)


def test_an_unknown_field_is_refused_by_name() -> None:
    with pytest.raises(InvalidJob, match="unknown: unknown field"):
        parse_job({"prompt": "p", "unknown": 1})
    assert "unknown" not in RenderJob.model_fields
