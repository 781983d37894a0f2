"""One storage interface: the S3 backend (moto over HTTP) and the local backend behave alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fluxfarm.shared.errors import ObjectNotFound, StorageError
from fluxfarm.shared.local_store import LocalStore
from fluxfarm.shared.s3_store import S3Store
from fluxfarm.shared.settings import FarmSettings
from fluxfarm.shared.storage import ObjectStore, open_store
from tests.conftest import S3Server


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        url = f"file://{tmp_path / 'root'}"
        yield open_store(FarmSettings(storage_url=url))
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        bucket = s3.new_bucket()
        yield open_store(FarmSettings(storage_url=f"s3://{bucket}/pre/fix", s3_endpoint_url=s3.endpoint_url))


def test_put_get_exists_delete(store: ObjectStore) -> None:
    keys = store.result_keys("set-1", "abc123")
    assert not store.exists(keys.image)
    store.put(keys.image, b"\x89PNG bytes", "image/png", {"job-id": "abc123"})
    assert store.exists(keys.image)
    assert store.get(keys.image) == b"\x89PNG bytes"
    store.delete(keys.image)
    assert not store.exists(keys.image)
    with pytest.raises(ObjectNotFound):
        store.get(keys.image)


def test_key_layout_is_prefix_dataset_job_id(store: ObjectStore) -> None:
    keys = store.result_keys("birds", "0123abcd")
    expected_base = "pre/fix/birds/0123abcd" if isinstance(store, S3Store) else "birds/0123abcd"
    assert (keys.image, keys.metadata) == (f"{expected_base}.png", f"{expected_base}.json")


@pytest.mark.parametrize("bad", ["../escape", "a/../../b", "/abs", "a//b", "", ".hidden/x", "a/\x00"])
def test_unsafe_keys_are_refused_by_every_operation(store: ObjectStore, bad: str) -> None:
    for operation in (lambda: store.put(bad, b"x", "text/plain"), lambda: store.get(bad), lambda: store.exists(bad)):
        with pytest.raises(StorageError, match="unsafe object key"):
            operation()


def test_fetch_to_copies_an_object_to_a_local_file(store: ObjectStore, tmp_path: Path) -> None:
    store.put("models/weights.gguf", b"GGUF" * 1000, "application/octet-stream")
    dest = store.fetch_to("models/weights.gguf", tmp_path / "cache" / "weights.gguf")
    assert dest.read_bytes() == b"GGUF" * 1000
    with pytest.raises(ObjectNotFound):
        store.fetch_to("models/missing.gguf", tmp_path / "cache" / "missing.gguf")


def test_s3_png_carries_object_metadata(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    store = S3Store(bucket, "p", endpoint_url=s3_server.endpoint_url)
    store.put("p/d/j.png", b"png", "image/png", {"job-id": "j", "quant": "Q8_0"})
    assert store.head_metadata("p/d/j.png") == {"job-id": "j", "quant": "Q8_0"}


def test_local_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("d/j.json", b"{}", "application/json")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["j.json"]


def test_storage_url_must_name_a_known_scheme() -> None:
    with pytest.raises(ValueError, match="s3:// or file://"):
        FarmSettings(storage_url="ftp://somewhere")


def test_a_key_that_collides_with_a_folder_is_a_storage_error_not_an_os_error(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b", b"x", "text/plain")
    with pytest.raises(StorageError, match="could not store a"):
        store.put("a", b"y", "text/plain")  # "a" is a folder
    with pytest.raises(StorageError, match="could not store a/b/c"):
        store.put("a/b/c", b"z", "text/plain")  # "a/b" is a file
    with pytest.raises(ObjectNotFound):
        store.get("a")
    assert store.get("a/b") == b"x"


def test_a_share_url_reads_the_object_without_credentials(store: ObjectStore) -> None:
    import os
    import urllib.request

    key = store.key("shared", "image.png")
    store.put(key, b"\x89PNG shared bytes", "image/png")
    url = store.share_url(key, expires_s=600)
    with urllib.request.urlopen(url, timeout=10) as response:  # no AWS credentials in this request
        assert response.read() == b"\x89PNG shared bytes"
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in url
    if url.startswith("http"):
        assert "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url


def test_a_planted_temporary_name_is_never_written_through(tmp_path: Path) -> None:
    """Issue 18, finding 9: an export into a shared folder where someone planted `.tmp-<name>` as a
    symlink to a file of the exporting user's wrote through it, overwriting that file."""
    from fluxfarm.producer.export import export_dataset

    shared, victim = tmp_path / "shared", tmp_path / "victim.txt"
    shared.mkdir()
    victim.write_text("precious")
    for name in ("moths.jsonl", "d/j.json"):
        (shared / name).parent.mkdir(parents=True, exist_ok=True)
        (shared / name).with_name(f".tmp-{Path(name).name}").symlink_to(victim)
    dest = LocalStore(shared)
    summary = export_dataset(LocalStore(tmp_path / "renders"), "moths", "jsonl", dest)
    source = tmp_path / "one.json"
    source.write_bytes(b"{}")
    dest.put_file("d/j.json", source, "application/json")
    assert victim.read_text() == "precious"
    assert summary.files == [dest.uri("moths.jsonl")] and (shared / "moths.jsonl").is_file()
    assert dest.get("d/j.json") == b"{}"


def test_result_pages_walk_the_finished_jobs_in_id_order_with_one_small_listing_each(store: ObjectStore) -> None:
    ids = [f"job-{i:03d}" for i in range(25)]
    for job_id in ids:
        keys = store.result_keys("pages", job_id)
        store.put(keys.image, b"png", "image/png")
        store.put(keys.metadata, b"{}", "application/json")
    store.put(store.result_keys("pages", "job-0105").image, b"png", "image/png")  # rendering: no JSON yet
    store.put(store.manifest_key("pages"), b"{}", "application/json")  # the fluxfarm/ subfolder
    store.put(store.input_key("pages", "a" * 64), b"input", "image/png")

    pages, after = [], None
    while page := store.stored_job_page("pages", after, 10):
        pages.append(page)
        after = page[-1]
    assert [len(page) for page in pages] == [10, 10, 5]
    assert [job_id for page in pages for job_id in page] == ids
    assert store.stored_job_page("pages", "job-009", 3) == ["job-010", "job-011", "job-012"]
    assert store.stored_job_page("nothing-here", None, 10) == []
