"""`/v1/datasets/{name}`: a dataset's record (counts, rate, ETA, failures) and its cancel."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.gateway.audit import audit
from fluxfarm.producer.gateway.auth import Caller, check_datasets
from fluxfarm.producer.gateway.errors import ApiError, ErrorResponse
from fluxfarm.shared.datasets import DatasetRecord
from fluxfarm.shared.jobs import parse_dataset_name

router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    responses={status: {"model": ErrorResponse} for status in (401, 403, 404, 422)},
)


class Cancelled(BaseModel):
    dataset: str
    cancelled: int
    """Queued jobs dropped; running ones finish."""


def _client(request: Request) -> FarmClient:
    client: FarmClient = request.app.state.client
    return client


def _dataset(record: Caller, name: str) -> str:
    dataset = parse_dataset_name(name)
    check_datasets(record, [dataset])
    return dataset


@router.get("/{name}")
def read_dataset(request: Request, record: Caller, name: str) -> DatasetRecord:
    """The dataset's progress now, as `fluxfarm status --dataset` shows it: counts, rate, ETA, failures."""
    dataset = _dataset(record, name)
    found = _client(request).datasets.record(dataset)
    if found.created_at is None:
        raise ApiError(404, "not_found", f"no dataset {dataset}")
    return found


@router.post("/{name}/cancel")
def cancel_dataset(request: Request, record: Caller, name: str) -> Cancelled:
    """Drop the dataset's queued jobs (workers discard their messages unrendered); running ones finish."""
    dataset = _dataset(record, name)
    count = _client(request).datasets.cancel(dataset)
    audit("cancel", record.name, dataset=dataset, cancelled=count)
    return Cancelled(dataset=dataset, cancelled=count)
