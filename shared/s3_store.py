"""The S3 backend of shared/storage.py: AWS and every S3-compatible store (MinIO, R2) through boto3."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fluxfarm.shared.errors import ObjectExists, ObjectNotFound, StorageError
from fluxfarm.shared.storage import ObjectStore, check_key

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_CONFLICT_CODES = {"412", "PreconditionFailed", "409", "ConditionalRequestConflict"}
"""A conditional put lost: the object exists (412), or another conditional write was in flight (409)."""


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
        return f"s3://{self.bucket}/{check_key(key)}"

    def share_url(self, key: str, expires_s: int) -> str:
        """A presigned GET: signed with the worker's or client's credentials, which it does not contain."""
        params = {"Bucket": self.bucket, "Key": check_key(key)}
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

    def _names_after(self, folder: str, start_after: str | None, count: int) -> list[str]:
        after = {"StartAfter": start_after} if start_after else {}
        with self._errors_for(folder.rstrip("/"), "list"):
            page = self._client.list_objects_v2(
                Bucket=self.bucket, Prefix=folder, Delimiter="/", MaxKeys=count, **after
            )  # Delimiter: the `fluxfarm/` subfolder comes back as one CommonPrefix, not its objects
        return [entry["Key"][len(folder) :] for entry in page.get("Contents", [])]

    def _get(self, key: str) -> bytes:
        with self._errors_for(key, "read"):
            return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def _size(self, key: str) -> int:
        with self._errors_for(key, "check"):
            return int(self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])

    def head_metadata(self, key: str) -> dict[str, str]:
        """The object's user metadata (S3 `x-amz-meta-*`)."""
        with self._errors_for(key, "check"):
            return self._client.head_object(Bucket=self.bucket, Key=check_key(key))["Metadata"]

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
