"""One storage interface for images and metadata, with an S3 backend and a local-directory backend.

Both backends use the same key layout, `<prefix>/<dataset>/<job_id>.png` and `.json`, so a dataset
can move between them unchanged. A job is done when its metadata JSON exists: the PNG is written
first, the JSON last.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fluxfarm.shared.errors import ObjectExists, ObjectNotFound, StorageError
from fluxfarm.shared.settings import FarmSettings

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_CONFLICT_CODES = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
"""A conditional put lost: the object exists (412), or another conditional write was in flight (409)."""

PNG_CONTENT_TYPE = "image/png"
JSON_CONTENT_TYPE = "application/json"


def _check_key(key: str) -> str:
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
            _check_key(self.prefix)

    def key(self, *parts: str) -> str:
        """`parts` joined under the store's prefix, checked."""
        return _check_key("/".join(part for part in (self.prefix, *parts) if part))

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
        self._put(_check_key(key), data, content_type, metadata or {}, if_absent)

    def get(self, key: str) -> bytes:
        return self._get(_check_key(key))

    def exists(self, key: str) -> bool:
        return self._exists(_check_key(key))

    def delete(self, key: str) -> None:
        self._delete(_check_key(key))

    def dataset_folder(self, dataset: str) -> str:
        """The key prefix (ending in '/') under which a dataset's objects live."""
        return self.key(dataset) + "/"

    def manifest_key(self, dataset: str) -> str:
        """The dataset's manifest: in a subfolder, where no job's objects can be (job ids hold no '/')."""
        return _check_key(f"{self.dataset_folder(dataset)}fluxfarm/manifest.json")

    def input_key(self, dataset: str, sha256: str) -> str:
        """A job input stored by digest (a control image): in the dataset's `fluxfarm/` subfolder, beside
        the manifest, where no job's objects can be."""
        return _check_key(f"{self.dataset_folder(dataset)}fluxfarm/inputs/{sha256}")

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

    def size(self, key: str) -> int:
        """The object's size in bytes, before reading it; ObjectNotFound when it is not there."""
        return self._size(_check_key(key))

    def put_file(self, key: str, source: Path, content_type: str) -> None:
        """Store a local file without reading it into memory (large exports: tar shards, parquet)."""
        self._put_file(_check_key(key), source, content_type)

    def fetch_to(self, key: str, dest: Path) -> Path:
        """Copy an object to a local file (atomically): large model files stream, never sit in memory."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(f".{dest.name}.partial")
        self._fetch_to(_check_key(key), partial)
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
        return self._path(_check_key(key)).as_uri()

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


class S3Store(ObjectStore):
    """Any S3-compatible store through boto3: AWS, MinIO, R2. Credentials come from boto3's chain."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        ca_file: Path | None = None,
    ) -> None:
        super().__init__(prefix)
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        config = Config(
            # boto3 >= 1.36 sends CRC checksums by default, which some S3-compatible stores reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 8, "mode": "standard"},
            signature_version="s3v4",  # presigned URLs too (SigV2 is deprecated)
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        verify = str(ca_file) if ca_file is not None else None  # None: boto3's own (AWS_CA_BUNDLE, certifi)
        self._client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region, config=config, verify=verify)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{_check_key(key)}"

    def share_url(self, key: str, expires_s: int) -> str:
        """A presigned GET: signed with the worker's or client's credentials, which it does not contain."""
        params = {"Bucket": self.bucket, "Key": _check_key(key)}
        with self._errors_for(key, "sign"):
            return str(self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s))

    @contextmanager
    def _errors_for(self, key: str, action: str) -> Iterator[None]:
        """botocore's errors as ours: a missing key is ObjectNotFound, anything else a StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code")
            if code in _MISSING_CODES:
                raise ObjectNotFound(key) from None
            if code in _CONFLICT_CODES:
                raise ObjectExists(key) from None
            raise StorageError(f"could not {action} {self.uri(key)}: {error}") from None
        except BotoCoreError as error:
            raise StorageError(f"could not {action} {self.uri(key)}: {error}") from None

    def _put(self, key: str, data: bytes, content_type: str, metadata: dict[str, str], if_absent: bool) -> None:
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        with self._errors_for(key, "store"):
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, Metadata=metadata, **condition
            )

    def _put_file(self, key: str, source: Path, content_type: str) -> None:
        with self._errors_for(key, "store"):  # multipart above boto3's threshold
            self._client.upload_file(str(source), self.bucket, key, ExtraArgs={"ContentType": content_type})

    def sizes_under(self, folder: str, limit: int) -> dict[str, int]:
        """Key -> size of at most `limit` objects under `folder`, from the listing itself (no request per
        object): what a download would cost, known before it starts."""
        sizes: dict[str, int] = {}
        with self._errors_for(folder.rstrip("/"), "list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
            for page in pages:
                for entry in page.get("Contents", []):
                    if len(sizes) >= limit:
                        return sizes
                    sizes[entry["Key"]] = int(entry["Size"])
        return sizes

    def _list(self, folder: str) -> Iterator[str]:
        with self._errors_for(folder.rstrip("/"), "list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
            for page in pages:
                for entry in page.get("Contents", []):
                    yield entry["Key"]

    def _get(self, key: str) -> bytes:
        with self._errors_for(key, "read"):
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def _size(self, key: str) -> int:
        with self._errors_for(key, "check"):
            return int(self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])

    def head_metadata(self, key: str) -> dict[str, str]:
        """The object's user metadata (S3 `x-amz-meta-*`)."""
        with self._errors_for(key, "check"):
            return self._client.head_object(Bucket=self.bucket, Key=_check_key(key))["Metadata"]

    def _exists(self, key: str) -> bool:
        try:
            self.size(key)
        except ObjectNotFound:
            return False
        return True

    def _delete(self, key: str) -> None:
        with self._errors_for(key, "delete"):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def _fetch_to(self, key: str, dest: Path) -> None:
        with self._errors_for(key, "download"):
            self._client.download_file(self.bucket, key, str(dest))


def open_store(settings: FarmSettings) -> ObjectStore:
    """The store named by `FLUXFARM_STORAGE_URL`."""
    return open_store_url(settings.storage_url, settings)


def open_store_url(url: str, settings: FarmSettings) -> ObjectStore:
    """A store at `url` (s3://bucket/prefix, file:///dir or a path), reached with `settings`' S3
    endpoint and region."""
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"storage URL {url!r} names no bucket")
        endpoint, region, ca_file = settings.s3_endpoint_url, settings.s3_region, settings.tls_ca_file
        return S3Store(bucket, prefix, endpoint_url=endpoint, region=region, ca_file=ca_file)
    return LocalStore(Path(url.removeprefix("file://")))
