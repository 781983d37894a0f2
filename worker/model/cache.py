"""The worker's download cache for model files fetched from S3: bounded in size, checked by sha256.

Files are evicted least recently used first (a file's mtime is refreshed whenever it is used), and a
file whose sha256 does not match what the catalog pins is deleted and refused rather than loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from fluxfarm.shared.errors import JobInputError, ModelLoadError
from fluxfarm.shared.units import GIB
from fluxfarm.worker.model.file_digest import DigestCache


class ModelCache:
    def __init__(self, root: Path, max_gib: float | None, digests: DigestCache) -> None:
        self.root = root
        self.max_bytes = None if max_gib is None else int(max_gib * GIB)
        self._digests = digests

    def path_for(self, bucket: str, key: str) -> Path:
        """Where an object of `bucket` is cached. A key is untrusted (a job names it; a bucket listing
        returns whatever was uploaded), so a path that would resolve outside the cache is refused before
        anything is read or written there."""
        segments = [bucket, *key.removesuffix("/").split("/")]
        path = self.root.joinpath(*segments)
        if any(s in ("", ".", "..") or "/" in s for s in segments) or not path.resolve().is_relative_to(
            self.root.resolve()
        ):
            raise JobInputError(f"s3://{bucket}/{key[:200]} is not a key the model cache can hold")
        return path

    def files(self) -> list[Path]:
        return [p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith(".")]

    def touch(self, path: Path) -> None:
        os.utime(path)

    def make_room(self, incoming_bytes: int, keep: Path | None = None) -> list[Path]:
        """Evict least recently used files until `incoming_bytes` more fit under the limit."""
        if self.max_bytes is None:
            return []
        if incoming_bytes > self.max_bytes:
            raise ModelLoadError(
                f"a {incoming_bytes / GIB:.1f} GiB model file cannot fit a {self.max_bytes / GIB:.1f} GiB cache"
            )
        files = sorted((p for p in self.files() if p != keep), key=lambda p: p.stat().st_mtime)
        used = sum(p.stat().st_size for p in self.files())
        evicted = []
        while files and used + incoming_bytes > self.max_bytes:
            oldest = files.pop(0)
            used -= oldest.stat().st_size
            oldest.unlink()
            evicted.append(oldest)
        return evicted

    def verify(self, path: Path, sha256: str, owned: bool) -> None:
        """Refuse a file whose digest differs from the pinned one; delete it if this cache fetched it."""
        actual = self._digests.sha256(path)
        if actual != sha256.lower():
            if owned:
                path.unlink(missing_ok=True)
            raise ModelLoadError(f"{path} has sha256 {actual}, but {sha256} was expected; refusing to load it")
