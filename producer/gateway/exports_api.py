"""`/v1/datasets/{name}/exports`: a dataset exported (producer/export.py's formats) into the farm's own
storage, beside the dataset, by the gateway in the background; asked for by id, with URLs when done.

An export's state lives in Redis for a week after it ends. While queued or running, the gateway that runs it
renews its lease (`keys.export_lease`): one whose gateway stopped reads as `failed` once the lease lapses
(within LEASE_S), so a program waiting on it is told to ask for a new one (the files of a finished export are
never rewritten)."""

from __future__ import annotations

import json
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

import redis
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.export import ExportFormat, export_dataset
from fluxfarm.producer.gateway.audit import audit
from fluxfarm.producer.gateway.auth import Caller, check_datasets
from fluxfarm.producer.gateway.errors import ApiError, error_responses
from fluxfarm.producer.gateway.settings import GatewaySettings
from fluxfarm.producer.gateway.state import farm_client
from fluxfarm.shared import keys
from fluxfarm.shared.jobs import parse_dataset_name
from fluxfarm.shared.periodic import Periodic
from fluxfarm.shared.redis_conn import text
from fluxfarm.shared.storage import open_store_url
from fluxfarm.shared.units import MIB

log = logging.getLogger(__name__)
KEEP_S = 7 * 24 * 3600
URL_EXPIRES_S = 3600
EXPORTS_AT_ONCE = 2
"""Exports a gateway runs at once; more wait their turn (an export reads the whole dataset)."""
LEASE_S = 60
"""How long an export's lease outlives its gateway's last renewal (renewed every third of it)."""
INTERRUPTED = "the gateway running this export stopped before it ended; ask for a new one"

router = APIRouter(
    prefix="/v1/datasets",
    tags=["exports"],
    responses=error_responses(401, 403, 404, 422),
)


class ExportRequest(BaseModel):
    format: ExportFormat
    count: Annotated[int, Field(ge=1, le=10_000, description="contact-sheet: how many images.")] = 64
    shard_mb: Annotated[int, Field(ge=1, le=65_536, description="webdataset: shard size in MiB.")] = 1024


class ExportView(BaseModel):
    export_id: str
    dataset: str
    format: ExportFormat
    state: Literal["queued", "running", "done", "failed"]
    rows: int | None = None
    location: str | None = None
    """Where the export's files are (s3://... or file://...)."""
    urls: list[str] = []
    """Fetch its files without credentials for an hour (presigned on S3); an imagefolder's images sit
    beside its metadata.jsonl."""
    error: str | None = None


def export_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(EXPORTS_AT_ONCE, thread_name_prefix="gateway-export")


class ExportLeases:
    """The leases of the exports this gateway holds, renewed by one thread until it stops."""

    def __init__(self, client: redis.Redis, lease_s: float = LEASE_S) -> None:
        self._client = client
        self._lease_ms = int(lease_s * 1000)
        self._held: set[str] = set()
        self._lock = threading.Lock()
        self._renewal = Periodic("gateway-export-leases", lease_s / 3, self.renew)

    def start(self) -> ExportLeases:
        self._renewal.start()
        return self

    def stop(self) -> None:
        """Once the exports pool has shut down: what is still held was cancelled, unstarted, so it reads as
        interrupted at once."""
        self._renewal.stop()
        with self._lock:
            held, self._held = list(self._held), set()
        if held:
            self._client.delete(*held)

    def hold(self, dataset: str, export_id: str) -> None:
        key = keys.export_lease(dataset, export_id)
        with self._lock:
            self._held.add(key)
        self._client.set(key, "1", px=self._lease_ms)

    def release(self, dataset: str, export_id: str) -> None:
        key = keys.export_lease(dataset, export_id)
        with self._lock:
            self._held.discard(key)
        self._client.delete(key)

    def renew(self) -> None:
        """Extend every held lease that is still there (XX: one released meanwhile is not made again)."""
        with self._lock:
            held = list(self._held)
        with self._client.pipeline(transaction=False) as pipe:
            for key in held:
                pipe.set(key, "1", px=self._lease_ms, xx=True)
            pipe.execute()


def _run(
    client: FarmClient,
    settings: GatewaySettings,
    leases: ExportLeases,
    dataset: str,
    export_id: str,
    order: ExportRequest,
) -> None:
    key = keys.export(dataset, export_id)
    client.redis.hset(key, "state", "running")
    try:
        location = f"{settings.storage_url.rstrip('/')}/{dataset}/fluxfarm/exports/{export_id}"
        dest = open_store_url(location, settings)
        summary = export_dataset(
            client.store,
            dataset,
            order.format,
            dest,
            shard_bytes=order.shard_mb * MIB,
            limit=order.count if order.format == "contact-sheet" else None,
        )
        client.redis.hset(
            key, mapping={"state": "done", "rows": summary.rows, "keys": json.dumps(summary.keys), "location": location}
        )
    except Exception as error:  # the export's failure is its state, not the gateway's crash
        log.exception("export %s of %s failed", export_id, dataset)
        client.redis.hset(key, mapping={"state": "failed", "error": str(error)[:500]})
    finally:
        client.redis.expire(key, KEEP_S)
        leases.release(dataset, export_id)


@router.post("/{name}/exports", status_code=202)
def start_export(request: Request, record: Caller, name: str, order: ExportRequest) -> ExportView:
    """Export the dataset's finished jobs into storage; ask `GET .../exports/{export_id}` for its state."""
    dataset = parse_dataset_name(name)
    check_datasets(record, [dataset])
    export_id = secrets.token_hex(8)
    state = request.app.state
    state.client.redis.hset(
        keys.export(dataset, export_id), mapping={"state": "queued", "format": order.format, "token": record.name}
    )
    state.client.redis.expire(keys.export(dataset, export_id), KEEP_S)
    state.export_leases.hold(dataset, export_id)
    state.exports.submit(_run, state.client, state.settings, state.export_leases, dataset, export_id, order)
    audit(state.client.redis, "export", record.name, dataset=dataset, export_id=export_id, format=order.format)
    return ExportView(export_id=export_id, dataset=dataset, format=order.format, state="queued")


@router.get("/{name}/exports/{export_id}")
def read_export(request: Request, record: Caller, name: str, export_id: str) -> ExportView:
    dataset = parse_dataset_name(name)
    check_datasets(record, [dataset])
    client = farm_client(request)
    with client.redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.export(dataset, export_id))
        pipe.exists(keys.export_lease(dataset, export_id))
        found, leased = pipe.execute()
    fields = {text(k): text(v) for k, v in found.items()}
    if not fields:
        raise ApiError(404, "not_found", f"dataset {dataset}: no export {export_id}")
    if fields["state"] in ("queued", "running") and not leased:
        fields.update(state="failed", error=INTERRUPTED)
    urls = []
    if "location" in fields:
        dest = open_store_url(fields["location"], request.app.state.settings)
        urls = [dest.share_url(key, URL_EXPIRES_S) for key in json.loads(fields.get("keys", "[]"))]
    return ExportView.model_validate(
        {
            "export_id": export_id,
            "dataset": dataset,
            "format": fields["format"],
            "state": fields["state"],
            "rows": fields.get("rows"),
            "location": fields.get("location"),
            "urls": urls,
            "error": fields.get("error"),
        }
    )
