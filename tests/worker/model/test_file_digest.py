"""Model file digests: hashed once per file, and read off a Hugging Face cache blob's name without hashing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fluxfarm.worker.model import file_digest
from fluxfarm.worker.model.file_digest import DigestCache


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
