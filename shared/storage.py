"""One storage interface for images and metadata; its backends are shared/s3_store.py (S3 and
S3-compatible stores) and shared/local_store.py (a directory).

Both backends use the same key layout, `<prefix>/<dataset>/<job_id>.png` and `.json`, so a dataset
can move between them unchanged. A job is done when its metadata JSON exists: the PNG is written
first, the JSON last.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fluxfarm.shared.errors import StorageError
from fluxfarm.shared.settings import FarmSettings

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

PNG_CONTENT_TYPE = "image/png"
JSON_CONTENT_TYPE = "application/json"
CALIBRATION_DATASET = "fluxfarm-calibration"
"""The dataset `fluxfarm calibrate` renders its probe jobs under (never stored) and keeps its rows beside."""


def check_key(key: str) -> str:
    """Refuse any key that could escape the store's root: every segment must be a plain name."""
    segments = key.split("/")
    if not key or any(not _SEGMENT.fullmatch(s) or ".." in s for s in segments):
        raise StorageError(f"unsafe object key {key!r}")
    return key


@dataclass(frozen=True)
class ResultKeys:
    """Where one job's two objects live."""

    image: str
    metadata: str


class ObjectStore(ABC):
    """A flat key -> bytes store. Keys are checked before any backend sees them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.strip("/")
        if self.prefix:
            check_key(self.prefix)

    def key(self, *parts: str) -> str:
        """`parts` joined under the store's prefix, checked."""
        return check_key("/".join(part for part in (self.prefix, *parts) if part))

    def result_keys(self, dataset: str, job_id: str) -> ResultKeys:
        """The key layout: the only place that knows it."""
        return ResultKeys(image=self.key(dataset, f"{job_id}.png"), metadata=self.key(dataset, f"{job_id}.json"))

    def put(
        self,
        key: str,
        data: bytes,
        content_type: str,
        metadata: dict[str, str] | None = None,
        if_absent: bool = False,
    ) -> None:
        """Store `data` at `key`. With `if_absent` the write happens only if no object is there (S3's
        conditional `If-None-Match: *`; a hard link on disk), else ObjectExists: of two racing
        writers exactly one wins."""
        self._put(check_key(key), data, content_type, metadata or {}, if_absent)

    def get(self, key: str) -> bytes:
        return self._get(check_key(key))

    def exists(self, key: str) -> bool:
        return self._exists(check_key(key))

    def delete(self, key: str) -> None:
        self._delete(check_key(key))

    def dataset_folder(self, dataset: str) -> str:
        """The key prefix (ending in '/') under which a dataset's objects live."""
        return self.key(dataset) + "/"

    def manifest_key(self, dataset: str) -> str:
        """The dataset's manifest: in a subfolder, where no job's objects can be (job ids hold no '/')."""
        return check_key(f"{self.dataset_folder(dataset)}fluxfarm/manifest.json")

    def thumbnail_key(self, dataset: str, job_id: str) -> str:
        """A result's thumbnail (the gateway's gallery makes it once): in the `fluxfarm/` subfolder too."""
        return check_key(f"{self.dataset_folder(dataset)}fluxfarm/thumbs/{job_id}.webp")

    def input_key(self, dataset: str, sha256: str) -> str:
        """A job input stored by digest (a control image): in the dataset's `fluxfarm/` subfolder, beside
        the manifest, where no job's objects can be."""
        return check_key(f"{self.dataset_folder(dataset)}fluxfarm/inputs/{sha256}")

    def calibration_key(self, calibration_id: str) -> str:
        """A calibration (`fluxfarm calibrate`), kept for the whole farm: in the `fluxfarm/` subfolder of the
        dataset its probe jobs are rendered under, where no job's objects can be."""
        return check_key(f"{self.dataset_folder(CALIBRATION_DATASET)}fluxfarm/calibrations/{calibration_id}.json")

    def stored_results(self, dataset: str) -> list[ResultKeys]:
        """The finished jobs' keys (metadata JSON present, and so the PNG before it), in job id order,
        from one listing."""
        return [self.result_keys(dataset, job_id) for job_id in sorted(self.stored_job_ids(dataset))]

    def _job_files(self, dataset: str) -> Iterator[str]:
        """Names of the files directly in the dataset's folder (its jobs' objects, not the manifest's
        subfolder), from one listing."""
        folder = self.dataset_folder(dataset)
        for key in self._list(folder):
            name = key[len(folder) :]
            if "/" not in name:
                yield name

    def count_stored(self, dataset: str) -> tuple[int, int]:
        """(images, metadata objects) of the dataset's jobs, from one listing."""
        names = list(self._job_files(dataset))
        return sum(n.endswith(".png") for n in names), sum(n.endswith(".json") for n in names)

    def stored_job_ids(self, dataset: str) -> set[str]:
        """Ids of the dataset's finished jobs (those whose metadata JSON exists), from one listing:
        a resubmit learns what is done without a request per job."""
        return {name.removesuffix(".json") for name in self._job_files(dataset) if name.endswith(".json")}

    def stored_job_page(self, dataset: str, after: str | None, limit: int) -> list[str]:
        """Up to `limit` ids of the dataset's finished jobs, in id order, after the job id `after`: a
        page of results that costs a listing of about one page of keys, however large the dataset."""
        folder = self.dataset_folder(dataset)
        start = f"{folder}{after}.json" if after else None
        ids: list[str] = []
        while len(ids) < limit:
            wanted = 2 * (limit - len(ids)) + 1  # a job's .json and .png, and one more to know if it ends
            names = self._names_after(folder, start, wanted)
            ids += [name.removesuffix(".json") for name in names if name.endswith(".json")][: limit - len(ids)]
            if len(names) < wanted:
                break
            start = folder + names[-1]
        return ids

    def size(self, key: str) -> int:
        """The object's size in bytes, before reading it; ObjectNotFound when it is not there."""
        return self._size(check_key(key))

    def put_file(self, key: str, source: Path, content_type: str) -> None:
        """Store a local file without reading it into memory (large exports: tar shards, parquet)."""
        self._put_file(check_key(key), source, content_type)

    def fetch_to(self, key: str, dest: Path) -> Path:
        """Copy an object to a local file (atomically): large model files stream, never sit in memory."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.partial")
        self._fetch_to(check_key(key), partial)
        partial.replace(dest)
        return dest

    @abstractmethod
    def uri(self, key: str) -> str:
        """A URI a person can paste: s3://bucket/key or file:///path."""

    @abstractmethod
    def share_url(self, key: str, expires_s: int) -> str:
        """A URL that reads the object without credentials for `expires_s` (S3: presigned GET)."""

    @abstractmethod
    def _list(self, folder: str) -> Iterator[str]:
        """Every key that starts with `folder`, in any order."""

    @abstractmethod
    def _names_after(self, folder: str, start_after: str | None, count: int) -> list[str]:
        """Up to `count` names of the objects directly in `folder` (not in its subfolders) whose keys sort
        after `start_after`, in key order (S3's: UTF-8 bytes)."""

    @abstractmethod
    def _put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str], if_absent: bool) -> None: ...

    @abstractmethod
    def _put_file(self, key: str, source: Path, content_type: str) -> None: ...

    @abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _size(self, key: str) -> int: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _fetch_to(self, key: str, dest: Path) -> None: ...


def open_store(settings: FarmSettings) -> ObjectStore:
    """The store named by `FLUXFARM_STORAGE_URL`."""
    return open_store_url(settings.storage_url, settings)


def open_store_url(url: str, settings: FarmSettings) -> ObjectStore:
    """A store at `url` (s3://bucket/prefix, file:///dir or a path), reached with `settings`' S3
    endpoint and region."""
    from fluxfarm.shared.local_store import LocalStore  # the backends import this module's ObjectStore
    from fluxfarm.shared.s3_store import S3Store

    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"storage URL {url!r} names no bucket")
        endpoint, region, ca_file = settings.s3_endpoint_url, settings.s3_region, settings.tls_ca_file
        return S3Store(bucket, prefix, endpoint_url=endpoint, region=region, ca_file=ca_file)
    return LocalStore(Path(url.removeprefix("file://")))
