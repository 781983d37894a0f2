"""`/v1/datasets/{name}/exports`: a dataset exported (producer/export.py's formats) into the farm's own
storage, beside the dataset, by the gateway in the background; asked for by id, with URLs when done.

An export's state lives in Redis for a week after it ends. One that was running when the gateway
stopped stays `running`: ask for a new one (the files of a finished export are never rewritten)."""

from __future__ import annotations

import json
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

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
from fluxfarm.shared.redis_conn import text
from fluxfarm.shared.storage import open_store_url
from fluxfarm.shared.units import MIB

log = logging.getLogger(__name__)
KEEP_S = 7 * 24 * 3600
URL_EXPIRES_S = 3600
EXPORTS_AT_ONCE = 2
"""Exports a gateway runs at once; more wait their turn (an export reads the whole dataset)."""

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


def _run(client: FarmClient, settings: GatewaySettings, dataset: str, export_id: str, order: ExportRequest) -> None:
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
    state.exports.submit(_run, state.client, state.settings, dataset, export_id, order)
    audit(state.client.redis, "export", record.name, dataset=dataset, export_id=export_id, format=order.format)
    return ExportView(export_id=export_id, dataset=dataset, format=order.format, state="queued")


@router.get("/{name}/exports/{export_id}")
def read_export(request: Request, record: Caller, name: str, export_id: str) -> ExportView:
    dataset = parse_dataset_name(name)
    check_datasets(record, [dataset])
    client = farm_client(request)
    fields = {text(k): text(v) for k, v in client.redis.hgetall(keys.export(dataset, export_id)).items()}
    if not fields:
        raise ApiError(404, "not_found", f"dataset {dataset}: no export {export_id}")
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
