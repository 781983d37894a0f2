"""Model file digests: hashed once per file (many files side by side), and read off a Hugging Face cache blob's
name without hashing."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from fluxfarm.worker.model import file_digest
from fluxfarm.worker.model.file_digest import DigestCache
from fluxfarm.worker.model.reproduction import COMPONENTS, weight_digests


def _hub_file(cache: Path, content: bytes, name: str) -> Path:
    """A file as huggingface_hub lays it out: a snapshot's link to a blob named by its sha256."""
    repo = cache / "models--org--model"
    blob = repo / "blobs" / name
    blob.parent.mkdir(parents=True)
    blob.write_bytes(content)
    link = repo / "snapshots" / "0123abcd" / "transformer" / "diffusion_pytorch_model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    return link


def test_a_hub_blob_is_named_by_its_sha256_and_not_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = b"weights" * 1000
    link = _hub_file(tmp_path / "hub", content, hashlib.sha256(content).hexdigest())

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"{path} was hashed")

    monkeypatch.setattr(file_digest, "_hash_file", no_hashing)
    assert DigestCache(tmp_path / "cache").sha256(link) == hashlib.sha256(content).hexdigest()


def test_other_files_are_hashed_once_and_again_when_they_change(tmp_path: Path) -> None:
    small = _hub_file(tmp_path / "hub", b"{}", "0" * 40)  # a non-LFS blob: a git hash, not a sha256
    plain = tmp_path / "model.safetensors"
    plain.write_bytes(b"one")
    digests = DigestCache(tmp_path / "cache")
    assert digests.sha256(small) == hashlib.sha256(b"{}").hexdigest()
    assert digests.sha256(plain) == hashlib.sha256(b"one").hexdigest()
    plain.write_bytes(b"two, longer")
    assert digests.sha256(plain) == hashlib.sha256(b"two, longer").hexdigest()


def test_files_are_hashed_in_parallel_threads_and_remembered_in_one_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = []
    for index in range(4):
        files.append(tmp_path / f"shard-{index}.safetensors")
        files[-1].write_bytes(bytes([index]) * 1000)
    threads: set[str] = set()
    writes = []
    hash_file, remember = file_digest._hash_file, DigestCache._remember

    def hashing(path: Path) -> str:
        threads.add(threading.current_thread().name)
        time.sleep(0.2)  # long enough that the pool runs the files side by side
        return hash_file(path)

    def counted(cache: DigestCache, entries: dict[str, dict[str, object]]) -> None:
        writes.append(len(entries))
        remember(cache, entries)

    monkeypatch.setattr(file_digest, "_hash_file", hashing)
    monkeypatch.setattr(file_digest, "_HASH_THREADS", 4)
    monkeypatch.setattr(DigestCache, "_remember", counted)
    digests = DigestCache(tmp_path / "cache")
    found = digests.sha256_all(files)
    assert found == {path.resolve(): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}
    assert len(threads) > 1 and writes == [4]
    monkeypatch.setattr(file_digest, "_hash_file", lambda path: pytest.fail(f"{path} was hashed again"))
    assert DigestCache(tmp_path / "cache").sha256_all(files) == found  # all four remembered


def test_a_pipeline_s_weight_digests_are_each_component_s(tmp_path: Path) -> None:
    base = tmp_path / "pipeline"
    for name, shards in (("transformer", 2), ("text_encoder", 1), ("text_encoder_2", 2), ("vae", 1)):
        for index in range(shards):
            (base / name).mkdir(parents=True, exist_ok=True)
            (base / name / f"model-{index}.safetensors").write_bytes(f"{name} {index}".encode())
    (base / "scheduler").mkdir()
    digests = DigestCache(tmp_path / "cache")
    found = weight_digests(base, None, digests)
    expected = {name: digests.folder_sha256(base / name) for name in ("transformer", *COMPONENTS)}
    assert found == expected and len(set(found.values())) == 4
    single = tmp_path / "transformer-Q8_0.gguf"
    single.write_bytes(b"a quantized transformer")
    with_file = weight_digests(base, single, digests)
    assert with_file == {**expected, "transformer": hashlib.sha256(b"a quantized transformer").hexdigest()}
    for shard in (base / "transformer").iterdir():
        shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files"):
        weight_digests(base, None, digests)
