"""sha256 of model files, remembered by (path, size, mtime) so a 12 GB file is hashed once, and read off the
name of a Hugging Face cache blob, which is its sha256, so a fresh machine's first load hashes nothing it
fetched from the Hub (FLUX.1-dev's weights are ~34 GB, FLUX.2 [dev]'s over 100 GB: hashing them on the load
path would be most of a warm start)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from fluxfarm.shared.units import MIB

_CHUNK_BYTES = 8 * MIB
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def hub_blob_sha256(resolved: Path) -> str | None:
    """The sha256 a Hugging Face cache file carries in its name: `models--ORG--NAME/blobs/<sha256>` is how
    huggingface_hub stores an LFS file (named by the hash the Hub gave it; smaller files are named by a
    40-digit git hash instead, and are hashed). None for any other path."""
    in_hub_cache = resolved.parent.name == "blobs" and resolved.parent.parent.name.startswith("models--")
    return resolved.name if in_hub_cache and _SHA256_NAME.fullmatch(resolved.name) else None


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class DigestCache:
    """A JSON file of known digests under the cache dir; unreadable or stale entries are recomputed."""

    def __init__(self, cache_dir: Path) -> None:
        self._file = cache_dir / "digests.json"

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            return json.loads(self._file.read_text())
        except (OSError, ValueError):
            return {}

    def sha256(self, path: Path) -> str:
        path = path.resolve()
        if (named := hub_blob_sha256(path)) is not None:
            return named
        stat = path.stat()
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        known = self._load()
        entry = known.get(str(path))
        if entry and all(entry.get(k) == v for k, v in stamp.items()):
            return str(entry["sha256"])
        value = _hash_file(path)
        known[str(path)] = {**stamp, "sha256": value}
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(self._file)
        except OSError:
            pass  # a read-only cache only costs a re-hash next time
        return value

    def folder_sha256(self, folder: Path, pattern: str = "*.safetensors") -> str:
        """One digest for a sharded folder: sha256 over its sorted `name sha256` lines."""
        lines = [f"{p.name} {self.sha256(p)}\n" for p in sorted(folder.glob(pattern))]
        if not lines:
            raise FileNotFoundError(f"no {pattern} files in {folder}")
        return hashlib.sha256("".join(lines).encode()).hexdigest()
