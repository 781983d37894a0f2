"""Inline control images as untrusted input (issue 18, finding 2), as properties: any `control_image`
string is a valid job or a clear refusal; an accepted image over 64 KiB leaves the job for storage, once,
named by its digest, and the job sent is a valid job whose id is the same however often it is staged."""

from __future__ import annotations

import base64
import hashlib
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fluxfarm.producer.job_inputs import InputStager
from fluxfarm.shared.adapters import INLINE_KEEP_BYTES, INLINE_PNG_PREFIX, MAX_INLINE_IMAGE_BYTES, image_type
from fluxfarm.shared.errors import InvalidJob
from fluxfarm.shared.jobs import parse_job
from fluxfarm.shared.local_store import LocalStore

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PREFIXES = st.sampled_from([INLINE_PNG_PREFIX, "data:image/jpeg;base64,", "data:image/png,", "data:;base64,"])
SIZES = st.sampled_from([0, 10, INLINE_KEEP_BYTES - 8, INLINE_KEEP_BYTES + 1, 300_000, MAX_INLINE_IMAGE_BYTES + 1])


def _image_url(prefix: str, signed: bool, size: int, seed: int, mangle: bool) -> str:
    data = (PNG_SIGNATURE if signed else b"") + random.Random(seed).randbytes(size)
    encoded = base64.b64encode(data).decode()
    return prefix + (encoded[:-1] + "!" if mangle and encoded else encoded)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(PREFIXES, st.booleans(), SIZES, st.integers(0, 2**16), st.booleans())
@example(INLINE_PNG_PREFIX, True, 300_000, 1, False)
def test_any_inline_image_is_a_valid_job_or_a_refusal_and_large_ones_leave_the_message(
    tmp_path_factory: pytest.TempPathFactory, prefix: str, signed: bool, size: int, seed: int, mangle: bool
) -> None:
    url = _image_url(prefix, signed, size, seed, mangle)
    fields = {"prompt": "p", "dataset": "inline", "controlnet": {"source": "hf://o/net", "control_image": url}}
    try:
        job = parse_job(fields)
    except InvalidJob as error:
        assert str(error)
        return
    data = base64.b64decode(url.removeprefix(INLINE_PNG_PREFIX))
    assert url.startswith(INLINE_PNG_PREFIX) and data.startswith(PNG_SIGNATURE) and len(data) <= MAX_INLINE_IMAGE_BYTES
    store = LocalStore(Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())))
    stager = InputStager(store)
    sent = stager.stage(job)
    assert sent.controlnet is not None
    if len(data) <= INLINE_KEEP_BYTES:
        assert sent == job
        return
    digest = hashlib.sha256(data).hexdigest()
    assert sent.controlnet.control_image == f"sha256:{digest}" and len(sent.model_dump_json()) < 2048
    assert store.get(store.input_key("inline", digest)) == data
    assert parse_job(sent.model_dump(mode="json")) == sent and InputStager(store).stage(job).id == sent.id


@given(st.binary(max_size=64))
def test_the_image_type_of_any_bytes_is_png_jpeg_webp_or_none(data: bytes) -> None:
    assert image_type(data) in (None, "image/png", "image/jpeg", "image/webp")


class _CountingStore(LocalStore):
    """A local store that counts the existence checks a stager makes."""

    checks = 0

    def _exists(self, key: str) -> bool:
        type(self).checks += 1
        return super()._exists(key)


def test_a_stager_remembers_its_latest_inputs_and_no_more(tmp_path: Path) -> None:
    """A gateway's stager lives as long as the gateway: it keeps the inputs it stored last, bounded, and
    asks storage again only for one it forgot."""
    store = _CountingStore(tmp_path)
    stager = InputStager(store, remember=3)
    images = [PNG_SIGNATURE + bytes([i]) * 64 for i in range(5)]
    names = [stager.store("d", image) for image in images]
    assert len(set(names)) == 5 and store.checks == 5 and len(stager._stored) == 3
    stager.store("d", images[4])  # remembered: no question to storage
    assert store.checks == 5
    assert stager.store("d", images[0]) == names[0]  # forgotten: asked again, found, not written twice
    assert store.checks == 6 and len(stager._stored) == 3
