"""The local-directory backend of shared/storage.py: a folder on disk, written atomically."""

from __future__ import annotations

import heapq
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from fluxfarm.shared.errors import ObjectExists, ObjectNotFound, StorageError
from fluxfarm.shared.storage import ObjectStore, check_key


@contextmanager
def _os_errors(key: str, action: str) -> Iterator[None]:
    """A local file system's refusals as StorageError, like S3's."""
    try:
        yield
    except OSError as error:
        raise StorageError(f"could not {action} {key}: {error.strerror or error}") from None


class LocalStore(ObjectStore):
    """A directory on disk; writes are atomic (temp file + rename), so readers never see half a file."""

    def __init__(self, root: Path, prefix: str = "") -> None:
        super().__init__(prefix)
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"unsafe object key {key!r}")
        return path

    def uri(self, key: str) -> str:
        return self._path(check_key(key)).as_uri()

    def share_url(self, key: str, expires_s: int) -> str:
        return self.uri(key)  # a local file is as shared as its file system: no expiry to sign

    def _put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str], if_absent: bool) -> None:
        self._write(key, lambda handle: handle.write(data), if_absent)

    def _put_file(self, key: str, source: Path, content_type: str) -> None:
        def copy(handle: BinaryIO) -> None:
            with source.open("rb") as data:
                shutil.copyfileobj(data, handle)

        self._write(key, copy, if_absent=False)

    def _write(self, key: str, fill: Callable[[BinaryIO], object], if_absent: bool) -> None:
        """Fill a new temporary file, then rename it over the key. The temporary name is random and
        created exclusively (mkstemp: O_CREAT | O_EXCL), so a name planted in a shared folder, a symlink
        included, is never opened or written through."""
        path = self._path(key)
        with _os_errors(key, "store"):  # e.g. a key whose folder is a stored file, or the reverse
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
            try:
                with os.fdopen(fd, "wb") as handle:
                    fill(handle)
                if if_absent:
                    try:
                        os.link(tmp, path)  # atomic, and refuses an existing name
                    except FileExistsError:
                        raise ObjectExists(key) from None
                else:
                    os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)

    def _list(self, folder: str) -> Iterator[str]:
        directory = self._path(folder.rstrip("/"))
        if not directory.is_dir():
            return
        for path in directory.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield path.relative_to(self.root).as_posix()

    def _names_after(self, folder: str, start_after: str | None, count: int) -> list[str]:
        directory = self._path(folder.rstrip("/"))
        if not directory.is_dir():
            return []
        after = start_after[len(folder) :] if start_after else ""
        with os.scandir(directory) as entries:  # a directory has no order: one scan, keeping only the page
            names = (e.name for e in entries if e.is_file() and not e.name.startswith(".tmp-") and e.name > after)
            return heapq.nsmallest(count, names, key=lambda name: name.encode())

    def _get(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        with _os_errors(key, "read"):
            return path.read_bytes()

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _size(self, key: str) -> int:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(key)
        return path.stat().st_size

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _fetch_to(self, key: str, dest: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFound(key)
        shutil.copyfile(source, dest)
