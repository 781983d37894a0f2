"""FarmClient over the gateway: the same methods, handles and errors as the Redis client, for programs
that hold a gateway token (FLUXFARM_API_URL, FLUXFARM_API_TOKEN) and neither Redis nor S3 credentials.

`FarmClient(settings)` returns one of these when `settings.api_url` is set, as `pathlib.Path()` returns
a `PosixPath`; a handle's `result()` waits with the gateway's long-poll, not a loop of its own."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from fluxfarm.producer.client import FarmClient, JobOutcome, StreamCounts
from fluxfarm.producer.dataset_stream import FINISHED_PAGE, DatasetOutcome, stream_outcomes
from fluxfarm.producer.gateway.tokens import TokenUse
from fluxfarm.producer.job_handles import JobBatch, JobHandle, owned_result
from fluxfarm.producer.redis_room import RedisFull, Room
from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.celery_app import Priority
from fluxfarm.shared.datasets import DatasetRecord
from fluxfarm.shared.errors import (
    AccessDenied,
    FarmError,
    InvalidJob,
    JobCancelled,
    JobConflict,
    JobFailed,
    QuotaExceeded,
)
from fluxfarm.shared.fleet import FleetReport
from fluxfarm.shared.jobs import DEFAULT_DATASET, RenderJob, parse_job, parse_jobs
from fluxfarm.shared.metadata import RenderResult

MAX_JOBS_PER_POST = 1000
"""The gateway's bound on one POST /v1/jobs (producer/gateway/jobs_api.py)."""
LONG_POLL_S = 30.0
"""How long one request waits for a job server-side; a longer wait asks again."""
ROOM_POLL_S = 2.0
EXPORT_POLL_S = 1.0


class GatewayApi:
    """The gateway's JSON API: each refusal raised as the Redis client raises it."""

    def __init__(self, url: str, token: str, ca_file: Path | None = None) -> None:
        """`ca_file`: the CA that signed the gateway's certificate (FLUXFARM_TLS_CA_FILE); the system's CAs
        when None. The certificate is always checked."""
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=LONG_POLL_S + 30,
            verify=ssl.create_default_context(cafile=str(ca_file)) if ca_file else True,
        )

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, **options: Any) -> Any:
        try:
            answer = self._http.request(method, path, **options)
        except httpx.HTTPError as error:
            raise FarmError(f"could not reach the gateway: {error}") from None
        if answer.is_success:
            return answer.json()
        raise _refusal(answer)

    def job_view(self, dataset: str, job_id: str, wait: float = 0) -> dict[str, Any]:
        view: dict[str, Any] = self.call("GET", f"/v1/jobs/{job_id}", params={"dataset": dataset, "wait": wait})
        return view


def _refusal(answer: httpx.Response) -> FarmError:
    try:
        error = answer.json()["error"]
        code, message = str(error["code"]), str(error["message"])
        problems = tuple((str(p["field"]), str(p["reason"])) for p in error.get("problems", []))
    except (ValueError, KeyError, TypeError):
        return FarmError(f"the gateway answered {answer.status_code}: {answer.text[:200]}")
    if code == "job_conflict":
        return JobConflict(message, problems)
    if code in ("invalid_job", "invalid_request"):
        return InvalidJob(message, problems)
    if answer.status_code in (401, 403):
        return AccessDenied(message)
    if answer.status_code == 429:
        return QuotaExceeded(message)
    if code == "farm_full":
        return RedisFull(message)
    if code == "farm_full_idle":
        return RedisFull(message, drains=False)
    return FarmError(message)


def _chunks(body: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    """A file read a MiB at a time: the upload never holds it whole (a FIFO included)."""
    while chunk := body.read(size):
        yield chunk


class HttpWaiter:
    """A job's outcome from the gateway: each request waits up to LONG_POLL_S server-side."""

    def __init__(self, api: GatewayApi, job: RenderJob) -> None:
        self._api, self.job = api, job

    def ready(self) -> bool:
        return self._api.job_view(self.job.dataset, self.job.id)["state"] not in ("queued", "running")

    def wait(self, timeout: float | None) -> RenderResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL_S if deadline is None else max(0.0, min(LONG_POLL_S, deadline - time.monotonic()))
            view = self._api.job_view(self.job.dataset, self.job.id, wait=left)
            state = view["state"]
            if state == "done":
                return owned_result(self.job, RenderResult.model_validate(view["result"]))
            if state == "failed":
                raise JobFailed(self.job.id, view.get("failure") or "failed")
            if state == "cancelled":
                raise JobCancelled(f"job {self.job.id}: its dataset {self.job.dataset} was cancelled")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.job.id} did not finish within {timeout}s")


class HttpFarmClient(FarmClient):
    """A FarmClient whose every call goes through the gateway (see the module's docstring)."""

    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self.settings = settings or ProducerSettings()
        if not self.settings.api_url or self.settings.api_token is None:
            raise FarmError("the gateway client needs FLUXFARM_API_URL and FLUXFARM_API_TOKEN")
        token = self.settings.api_token.get_secret_value()
        self._api = GatewayApi(self.settings.api_url, token, self.settings.tls_ca_file)

    def close(self) -> None:
        self._api.close()

    def _post(self, jobs: list[RenderJob], priority: Priority) -> dict[str, Any]:
        body = [job.model_dump(mode="json") for job in jobs]
        answer: dict[str, Any] = self._api.call("POST", "/v1/jobs", json=body, params={"priority": priority})
        return answer

    def _handles(self, jobs: list[RenderJob], answer: dict[str, Any]) -> list[JobHandle]:
        handles = []
        for job, sent in zip(jobs, answer["jobs"], strict=True):
            outcome: JobOutcome = sent["outcome"]
            stored = self.stored_result(job) if outcome == "stored" else None
            waiter = HttpWaiter(self._api, job) if stored is None else None
            handles.append(JobHandle(job, stored=stored, waiter=waiter))
        return handles

    def submit(self, job: RenderJob | Mapping[str, Any], priority: Priority = "normal") -> JobHandle:
        valid = parse_job(dict(job) if isinstance(job, Mapping) else job, self.settings.default_model)
        return self._handles([valid], self._post([valid], priority))[0]

    def submit_many(self, jobs: Iterable[RenderJob | Mapping[str, Any]], priority: Priority = "normal") -> JobBatch:
        valid = parse_jobs(jobs, self.settings.default_model)
        handles: list[JobHandle] = []
        for start in range(0, len(valid), MAX_JOBS_PER_POST):
            chunk = valid[start : start + MAX_JOBS_PER_POST]
            handles += self._handles(chunk, self._post(chunk, priority))
        return JobBatch(None, handles)

    def submit_stream(
        self,
        jobs: Iterable[RenderJob | Mapping[str, Any]],
        on_progress: Callable[[StreamCounts], None] | None = None,
        priority: Priority = "normal",
        wait_for_room: bool = False,
        on_wait: Callable[[Room], None] | None = None,
        on_outcome: Callable[[RenderJob, JobOutcome], object] | None = None,
    ) -> StreamCounts:
        """As FarmClient.submit_stream, a POST of up to MAX_JOBS_PER_POST jobs at a time. Waiting for
        room (`wait_for_room`) retries a chunk the gateway found no room for while something queued or running
        can free it (`farm_full`), and stops at `farm_full_idle`; `on_wait` is not called."""
        counts = StreamCounts()
        chunk: list[RenderJob] = []

        def send() -> None:
            while True:
                try:
                    answer = self._post(chunk, priority)
                    break
                except RedisFull as error:
                    if not wait_for_room or not error.drains:
                        raise
                    time.sleep(ROOM_POLL_S)
            counts.enqueued += answer["enqueued"]
            counts.already_stored += answer["already_stored"]
            counts.already_waiting += answer["already_waiting"]
            if on_outcome is not None:
                for job, sent in zip(chunk, answer["jobs"], strict=True):
                    on_outcome(job, sent["outcome"])
            if on_progress is not None:
                on_progress(counts)

        for item in jobs:
            chunk.append(parse_job(dict(item) if isinstance(item, Mapping) else item, self.settings.default_model))
            if len(chunk) >= MAX_JOBS_PER_POST:
                send()
                chunk = []
        if chunk:
            send()
        return counts

    def upload_file(
        self,
        path: Path,
        dataset: str,
        defaults: Mapping[str, Any],
        seeds: int = 1,
        dry_run: bool = False,
        skip_invalid: bool = False,
        priority: Priority = "normal",
    ) -> dict[str, Any]:
        """Upload a prompt file as jobs of `dataset` (POST /v1/datasets/{name}/files), streamed as it is read;
        the gateway's answer: valid and invalid rows, the first bad rows, and what was enqueued."""
        params = {
            "format": path.suffix.lower().removeprefix("."),
            "seeds": seeds,
            "dry_run": dry_run,
            "skip_invalid": skip_invalid,
            "priority": priority,
            "defaults": json.dumps(dict(defaults)),
        }
        with path.open("rb") as body:
            answer: dict[str, Any] = self._api.call(
                "POST", f"/v1/datasets/{dataset}/files", params=params, content=_chunks(body)
            )
        return answer

    def export(self, dataset: str, fmt: str, count: int = 64, shard_mb: int = 1024) -> dict[str, Any]:
        """Export the dataset through the gateway (into the farm's storage, beside it) and wait for it; its
        view: rows, location and URLs. FarmError if it failed."""
        body = {"format": fmt, "count": count, "shard_mb": shard_mb}
        started = self._api.call("POST", f"/v1/datasets/{dataset}/exports", json=body)
        while True:
            view: dict[str, Any] = self._api.call("GET", f"/v1/datasets/{dataset}/exports/{started['export_id']}")
            if view["state"] == "done":
                return view
            if view["state"] == "failed":
                raise FarmError(f"export of {dataset} failed: {view['error']}")
            time.sleep(EXPORT_POLL_S)

    def stored_result(self, job: RenderJob) -> RenderResult | None:
        result = self.dataset_result(job.dataset, job.id)
        return owned_result(job, result) if result is not None else None

    def dataset_result(self, dataset: str, job_id: str) -> RenderResult | None:
        try:
            view = self._api.job_view(dataset, job_id)
        except FarmError as error:
            if "no job" in str(error):
                return None
            raise
        return RenderResult.model_validate(view["result"]) if view["state"] == "done" else None

    def image_url(self, result: RenderResult, expires_s: int = 3600) -> str:
        """A URL for the PNG, presigned by the gateway for an hour (`expires_s` is the gateway's to choose)."""
        url: str = self._api.job_view(result.job.dataset, result.job_id)["image_url"]
        return url

    def store_input(self, data: bytes, dataset: str = DEFAULT_DATASET) -> str:
        raise FarmError("over the gateway, send a control image inline (a data: URL in the job); it stores it")

    def as_completed(
        self,
        dataset: str,
        timeout: float | None = None,
        with_results: bool = True,
        on_poll: Callable[[DatasetRecord], None] | None = None,
    ) -> Iterator[DatasetOutcome]:
        return stream_outcomes(self, dataset, timeout, with_results, on_poll)

    def dataset_record(self, dataset: str) -> DatasetRecord:
        try:
            return DatasetRecord.model_validate(self._api.call("GET", f"/v1/datasets/{dataset}"))
        except FarmError as error:
            if "no dataset" not in str(error):
                raise
        return DatasetRecord(
            name=dataset, created_at=None, updated_at=None, queued=0, running=0, done=0, failed=0,
            defaults={}, levels=[], failures={},
        )  # fmt: skip

    def finished_since(self, dataset: str, since: float, limit: int | None = None) -> list[tuple[str, float]]:
        """As FarmClient.finished_since, in pages of at most the gateway's page size (FINISHED_PAGE)."""
        params = {"since": since, "limit": min(limit or FINISHED_PAGE, FINISHED_PAGE)}
        answer = self._api.call("GET", f"/v1/datasets/{dataset}/finished", params=params)
        return [(str(job_id), float(at)) for job_id, at in answer["jobs"]]

    def cancel(self, dataset: str) -> int:
        return int(self._api.call("POST", f"/v1/datasets/{dataset}/cancel")["cancelled"])

    def dataset_names(self) -> list[str]:
        return [str(name) for name in self._api.call("GET", "/v1/datasets")["datasets"]]

    def usage(self) -> list[TokenUse]:
        """This token's usage (an admin token: every token's)."""
        return [TokenUse.model_validate(use) for use in self._api.call("GET", "/v1/usage")]

    def fleet(self) -> FleetReport:
        return FleetReport.model_validate(self._api.call("GET", "/v1/fleet"))

    def store_manifest(self, record: DatasetRecord) -> None:
        """The gateway writes the manifest at each upload; a client through it writes nothing to storage."""
