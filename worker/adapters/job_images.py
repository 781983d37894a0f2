"""The images a job names (a control image, input images to edit): read from S3, a worker path, the job's
dataset (stored by digest) or inline in the job, bounded in bytes before they are read and in pixels
before they are decoded, and only as PNG, JPEG or WebP: every other decoder PIL carries is attack surface
a job does not need."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from fluxfarm.shared.adapters import MAX_CONTROL_IMAGE_BYTES, MAX_CONTROL_IMAGE_PIXELS, inline_png, stored_input_digest
from fluxfarm.shared.errors import JobInputError, ObjectNotFound, StorageError
from fluxfarm.shared.storage import ObjectStore, open_store
from fluxfarm.worker.model.sources import bucket_store, resolve_job_file
from fluxfarm.worker.settings import WorkerSettings

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
"""What PIL may decode a job's image as."""


@dataclass(frozen=True)
class JobImage:
    image: Image.Image
    """Decoded, RGB."""
    origin: str
    """Where it came from, for the metadata ('inline' for one in the job)."""
    sha256: str
    """Of the bytes read: what the metadata names it by."""


class JobImages:
    """Reads the images jobs name, within the limits (shared/adapters.py: MAX_CONTROL_IMAGE_*)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._settings = settings
        self._farm_store: ObjectStore | None = None

    def read(self, source: str, dataset: str, what: str) -> JobImage:
        """The image `source` names (`what` it is, for errors); `dataset` is the job's, where an image
        stored by digest is."""
        data, origin = self._bytes(source, dataset, what)
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = image.size
            if width * height > MAX_CONTROL_IMAGE_PIXELS:
                raise JobInputError(
                    f"{what} {origin} is {width}x{height}: more than the {MAX_CONTROL_IMAGE_PIXELS:,} pixels "
                    f"a {what} may have"
                )
            image = image.convert("RGB")
        except UnidentifiedImageError:
            raise JobInputError(f"{what} {origin} is not a readable image of {', '.join(IMAGE_FORMATS)}") from None
        except (OSError, Image.DecompressionBombError) as error:
            raise JobInputError(f"{what} {origin} is not a readable image: {error}") from None
        return JobImage(image, origin, hashlib.sha256(data).hexdigest())

    def _bytes(self, source: str, dataset: str, what: str) -> tuple[bytes, str]:
        """The image's bytes and where they came from, at most MAX_CONTROL_IMAGE_BYTES."""
        if source.startswith("data:"):
            try:
                return inline_png(source), "inline"
            except ValueError as error:
                raise JobInputError(f"{what}: {error}") from None
        if (digest := stored_input_digest(source)) is not None:
            return self._stored(source, digest, dataset, what), source
        limit = f"at most {MAX_CONTROL_IMAGE_BYTES >> 20} MiB"
        if source.startswith("s3://"):
            bucket, _, key = source.removeprefix("s3://").partition("/")
            store = bucket_store(bucket, self._settings)
            try:
                if store.size(key) > MAX_CONTROL_IMAGE_BYTES:
                    raise JobInputError(f"{what} {source} is larger than the {limit} a {what} may be")
                return store.get(key), source
            except ObjectNotFound:
                raise JobInputError(f"{what} {source} does not exist") from None
            except StorageError as error:  # unreachable: the next attempt tries again
                raise StorageError(f"could not read {what} {source}: {error}") from error
        path = resolve_job_file(source, self._settings, what)
        if path.stat().st_size > MAX_CONTROL_IMAGE_BYTES:
            raise JobInputError(f"{what} {source} is larger than the {limit} a {what} may be")
        return path.read_bytes(), source

    def _stored(self, source: str, digest: str, dataset: str, what: str) -> bytes:
        """An image the client stored in the job's dataset, checked against its digest."""
        if self._farm_store is None:
            self._farm_store = open_store(self._settings)
        store = self._farm_store
        key = store.input_key(dataset, digest)
        try:
            if store.size(key) > MAX_CONTROL_IMAGE_BYTES:
                raise JobInputError(f"{what} {source} is larger than {MAX_CONTROL_IMAGE_BYTES >> 20} MiB")
            data = store.get(key)
        except ObjectNotFound:
            raise JobInputError(f"{what} {source} is not stored for dataset {dataset}") from None
        except StorageError as error:  # unreachable: the next attempt tries again
            raise StorageError(f"could not read {what} {source}: {error}") from error
        if hashlib.sha256(data).hexdigest() != digest:
            raise JobInputError(f"the stored {what} {source} does not match its digest")
        return data
