"""sha256 of model files, remembered by (path, size, mtime) so a 12 GB file is hashed once, and read off the
name of a Hugging Face cache blob, which is its sha256, so a fresh machine's first load hashes nothing it
fetched from the Hub (FLUX.1-dev's weights are ~34 GB, FLUX.2 [dev]'s over 100 GB: hashing them on the load
path would be most of a warm start). Files that must be hashed (a folder or bucket of weights on a fresh
machine) are hashed in parallel threads: hashlib releases the GIL, so a pipeline's shards take the time of the
largest one, not of their sum, and the worker hashes them beside its load (worker/model/pipeline.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fluxfarm.shared.units import MIB

_CHUNK_BYTES = 8 * MIB
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")
_HASH_THREADS = min(8, os.cpu_count() or 1)
_WRITING = threading.Lock()
"""One rewrite of a digest file at a time in this process: each reads it, adds its entries and replaces it."""


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
        return self.sha256_all([path])[path.resolve()]

    def sha256_all(self, paths: Iterable[Path]) -> dict[Path, str]:
        """Each file's sha256 by its resolved path: a Hub blob's from its name, a known file's from the cache,
        the others hashed together in threads, then remembered in one write."""
        found: dict[Path, str] = {}
        stamps: dict[Path, dict[str, int]] = {}
        known = self._load()
        for path in dict.fromkeys(p.resolve() for p in paths):
            if (named := hub_blob_sha256(path)) is not None:
                found[path] = named
                continue
            stat = path.stat()
            stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            entry = known.get(str(path))
            if entry and all(entry.get(k) == v for k, v in stamp.items()):
                found[path] = str(entry["sha256"])
            else:
                stamps[path] = stamp
        if stamps:
            with ThreadPoolExecutor(min(len(stamps), _HASH_THREADS), thread_name_prefix="sha256") as pool:
                found.update(zip(stamps, pool.map(_hash_file, stamps), strict=True))
            self._remember({str(path): {**stamp, "sha256": found[path]} for path, stamp in stamps.items()})
        return found

    def _remember(self, entries: dict[str, dict[str, object]]) -> None:
        with _WRITING:
            known = {**self._load(), **entries}
            try:
                self._file.parent.mkdir(parents=True, exist_ok=True)
                tmp = self._file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(known, indent=1))
                tmp.replace(self._file)
            except OSError:
                pass  # a read-only cache only costs a re-hash next time

    def folder_sha256(self, folder: Path, pattern: str = "*.safetensors") -> str:
        """One digest for a sharded folder: sha256 over its sorted `name sha256` lines."""
        files = weight_files(folder, pattern)
        if not files:
            raise FileNotFoundError(f"no {pattern} files in {folder}")
        return folder_digest(files, self.sha256_all(files))


def weight_files(folder: Path, pattern: str = "*.safetensors") -> list[Path]:
    """A folder's weight files in the order its digest lists them."""
    return sorted(folder.glob(pattern))


def folder_digest(files: list[Path], sha256_of: Mapping[Path, str]) -> str:
    """sha256 over `name sha256` lines of a folder's `files` (as weight_files lists them), from known digests."""
    lines = [f"{path.name} {sha256_of[path.resolve()]}\n" for path in files]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
