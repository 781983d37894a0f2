"""A key is untrusted: whatever a job names or a bucket lists, the model cache reads and writes only
inside its own folder, and says so before it looks at the disk (no existence oracle)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fluxfarm.shared.errors import InvalidJob, JobInputError
from fluxfarm.shared.jobs import parse_job
from fluxfarm.worker.model.sources import model_cache, resolve_file
from fluxfarm.worker.settings import WorkerSettings


@pytest.mark.parametrize("key", ["../../secret.safetensors", "a/../../../secret.safetensors", "a//b", "./a", ""])
def test_a_key_that_leaves_its_bucket_is_refused(tmp_path: Path, key: str) -> None:
    cache = model_cache(WorkerSettings(cache_dir=tmp_path / "cache"))
    with pytest.raises(JobInputError, match="not a key the model cache can hold"):
        cache.path_for("bucket", key)


def test_a_file_outside_the_cache_is_not_returned_even_when_it_exists(tmp_path: Path) -> None:
    """Before: `s3://bucket/../../secret.safetensors` resolved to a file beside the cache and was
    returned when it existed, without asking S3 (and 'does not exist' otherwise: an oracle)."""
    settings = WorkerSettings(cache_dir=tmp_path / "cache")
    secret = tmp_path / "cache" / "secret.safetensors"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"private")
    with pytest.raises(JobInputError, match="not a key the model cache can hold"):
        resolve_file("s3://bucket/../../secret.safetensors", settings)


def test_plain_keys_map_under_the_bucket(tmp_path: Path) -> None:
    cache = model_cache(WorkerSettings(cache_dir=tmp_path / "cache"))
    assert cache.path_for("models", "flux/dev-Q8_0.gguf") == cache.root / "models" / "flux" / "dev-Q8_0.gguf"
    assert cache.path_for("nets", "canny/") == cache.root / "nets" / "canny"


SEGMENTS = st.text(max_size=12) | st.sampled_from(["..", ".", "", "a/..", "\\..", "\uff0e\uff0e", "~", "%2e%2e"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(SEGMENTS, min_size=1, max_size=5).map("/".join), st.booleans())
@example("../../secret.safetensors", False)
@example("a//b.safetensors", True)
def test_any_source_key_the_schema_accepts_maps_inside_the_cache(tmp_path_factory, key: str, folder: bool) -> None:
    """Issue 18, finding 4, as a property: whatever key a job names, either the schema refuses it or the
    cache path built from it stays inside the cache (or the cache refuses it before touching the disk)."""
    source = f"s3://models/{key}" + ("/" if folder else ".safetensors")
    field = (
        {"controlnet": {"source": source, "control_image": "s3://models/c.png"}}
        if folder
        else {"loras": [{"source": source}]}
    )
    try:
        parse_job({"prompt": "p", **field})
    except InvalidJob:
        return
    cache = model_cache(WorkerSettings(cache_dir=tmp_path_factory.getbasetemp() / "cache"))
    bucket_key = source.removeprefix("s3://models/")
    try:
        path = cache.path_for("models", bucket_key)
    except JobInputError:
        return
    assert path.resolve().is_relative_to(cache.root.resolve())
