"""What a job may make a worker fetch is bounded, and checked from the size the store or the disk reports
before a byte is downloaded or read (issue 18, finding 5). The fused-LoRA cache is bounded in bytes and
gives up whole sets, least recently used first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fluxfarm.shared.errors import JobInputError
from fluxfarm.shared.units import GIB
from fluxfarm.worker.adapters.lora_fuser import FusedCache
from fluxfarm.worker.model.sources import resolve_job_file, resolve_job_folder
from fluxfarm.worker.settings import WorkerSettings
from tests.conftest import S3Server

KIB_AS_GIB = 1024 / GIB


def _settings(tmp_path: Path, s3: S3Server, **caps: float) -> WorkerSettings:
    return WorkerSettings(
        cache_dir=tmp_path / "cache", s3_endpoint_url=s3.endpoint_url, job_file_roots=[str(tmp_path)], **caps
    )


def _downloaded(settings: WorkerSettings) -> list[Path]:
    root = settings.cache_dir / "s3"
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


def test_a_file_larger_than_the_cap_is_refused_before_it_is_downloaded(tmp_path: Path, s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=bucket, Key="loras/big.safetensors", Body=b"x" * 4096)
    s3_server.client().put_object(Bucket=bucket, Key="loras/small.safetensors", Body=b"x" * 512)
    settings = _settings(tmp_path, s3_server, job_file_max_gib=KIB_AS_GIB)
    with pytest.raises(JobInputError, match=r"more than the 0\.00 GiB a job may make a worker fetch"):
        resolve_job_file(f"s3://{bucket}/loras/big.safetensors", settings, "LoRA")
    assert _downloaded(settings) == []
    assert resolve_job_file(f"s3://{bucket}/loras/small.safetensors", settings, "LoRA").stat().st_size == 512
    local = tmp_path / "big.safetensors"
    local.write_bytes(b"x" * 4096)
    with pytest.raises(JobInputError, match="FLUXFARM_JOB_FILE_MAX_GIB"):
        resolve_job_file(str(local), settings, "LoRA")


@pytest.mark.parametrize(
    ("caps", "reason"),
    [
        ({"job_folder_max_files": 2}, "holds more than 2 files"),
        ({"job_folder_max_gib": 2 * KIB_AS_GIB}, "FLUXFARM_JOB_FOLDER_MAX_GIB"),
    ],
)
def test_a_folder_past_its_caps_is_refused_before_anything_is_downloaded(
    tmp_path: Path, s3_server: S3Server, caps: dict[str, float], reason: str
) -> None:
    bucket = s3_server.new_bucket()
    for name in ("config.json", "a.safetensors", "b.safetensors"):
        s3_server.client().put_object(Bucket=bucket, Key=f"nets/canny/{name}", Body=b"x" * 1024)
    settings = _settings(tmp_path, s3_server, **caps)
    with pytest.raises(JobInputError, match=reason):
        resolve_job_folder(f"s3://{bucket}/nets/canny", settings, "ControlNet")
    assert _downloaded(settings) == []
    roomy = _settings(tmp_path, s3_server)
    folder = resolve_job_folder(f"s3://{bucket}/nets/canny", roomy, "ControlNet")
    assert sorted(path.name for path in folder.iterdir() if not path.name.startswith(".")) == [
        "a.safetensors",
        "b.safetensors",
        "config.json",
    ]


def _fused_set(root: Path, name: str, size: int, used_at: float | None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "part-0000.safetensors").write_bytes(b"x" * size)
    if used_at is not None:
        (folder / "manifest.json").write_text("{}")
        os.utime(folder / "manifest.json", (used_at, used_at))
    return folder


def test_the_fused_cache_gives_up_whole_sets_least_recently_used_first(tmp_path: Path) -> None:
    cache = FusedCache(tmp_path / "fused", max_gib=3000 / GIB)
    old = _fused_set(cache.root, "old", 1000, used_at=1_000)
    recent = _fused_set(cache.root, "recent", 1000, used_at=2_000)
    half_written = _fused_set(cache.root, "half", 500, used_at=None)
    writing = cache.root / "new"
    writing.mkdir()
    cache.make_room(1200, writing)  # 2500 held + 1200 > 3000: the half-written one, then the oldest
    assert not half_written.exists() and not old.exists() and recent.exists()
    with pytest.raises(OSError, match="larger than FLUXFARM_FUSED_CACHE_MAX_GIB"):
        cache.make_room(4000, writing)


def test_a_set_read_from_the_cache_counts_as_used(tmp_path: Path) -> None:
    cache = FusedCache(tmp_path / "fused", max_gib=2500 / GIB)
    first = _fused_set(cache.root, "first", 1000, used_at=1_000)
    second = _fused_set(cache.root, "second", 1000, used_at=2_000)
    (first / "part-0000.safetensors").rename(first / "blob.bin")  # bytes that count, no tensors to load
    assert cache.load("first") == {}
    cache.make_room(1000, cache.root / "third")
    assert first.exists() and not second.exists()
