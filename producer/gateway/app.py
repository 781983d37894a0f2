"""The gateway's ASGI application: one FarmClient (the producer-side Redis and S3 credentials live
here, and only here), the token book, and the `/v1` routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.gateway import datasets_api, exports_api, jobs_api, pages, uploads_api
from fluxfarm.producer.gateway.auth import Caller
from fluxfarm.producer.gateway.body_limit import BodyLimit
from fluxfarm.producer.gateway.errors import ApiError, error_responses, install_error_handlers
from fluxfarm.producer.gateway.metrics import GatewayMetrics
from fluxfarm.producer.gateway.settings import GatewaySettings
from fluxfarm.producer.gateway.state import farm_client, token_book, token_usage
from fluxfarm.producer.gateway.tokens import TokenBook, TokenUse
from fluxfarm.producer.gateway.usage import TokenUsage
from fluxfarm.shared import __version__
from fluxfarm.shared.fleet import FleetReport, fleet_report
from fluxfarm.shared.units import MIB

READS_IN_FLIGHT = 16
"""Storage reads one request makes at once (a page of results' metadata)."""


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = FarmClient(settings.model_copy(update={"api_url": None}))  # the farm itself, never a gateway
        app.state.settings = settings
        app.state.client = client
        app.state.tokens = TokenBook(client.redis)
        app.state.usage = TokenUsage(client.redis, client.datasets)
        metrics.watch_tokens(app.state.tokens, app.state.usage)
        app.state.pool = ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="gateway-read")
        app.state.exports = exports_api.export_pool()
        app.state.export_leases = exports_api.ExportLeases(client.redis).start()
        try:
            yield
        finally:
            app.state.pool.shutdown(cancel_futures=True)
            app.state.exports.shutdown(cancel_futures=True)
            app.state.export_leases.stop()
            client.close()

    app = FastAPI(
        title="fluxfarm gateway",
        version=__version__,
        description="Submit FLUX render jobs to a shared farm and read their results, with a bearer token.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=int(settings.gateway_max_body_mib * MIB))
    metrics = GatewayMetrics()
    metrics.install(app)
    app.include_router(jobs_api.router)
    app.include_router(datasets_api.router)
    app.include_router(uploads_api.router)
    app.include_router(exports_api.router)
    app.include_router(pages.router)

    @app.exception_handler(pages.LoginNeeded)
    async def login_needed(_: Request, __: pages.LoginNeeded) -> Response:
        return RedirectResponse("/ui/login", status_code=303)

    @app.get("/healthz", tags=["operations"])
    def healthz(request: Request) -> JSONResponse:
        """200 while the gateway reaches Redis; 503 otherwise (no token needed: for load balancers)."""
        try:
            farm_client(request).redis.ping()
        except Exception as error:  # any failure to reach Redis is unhealthy
            return JSONResponse({"ok": False, "reason": type(error).__name__}, status_code=503)
        return JSONResponse({"ok": True})

    @app.get("/v1/fleet", tags=["operations"], responses=error_responses(401))
    def fleet(request: Request, record: Caller) -> FleetReport:
        """The live workers (cards, levels, images/hour, heartbeats) and the queues, unserved ones marked.
        Where a worker serves its metrics is an operator's concern: an admin token's answer only."""
        report = fleet_report(farm_client(request).redis)
        if record.grant.admin:
            return report
        workers = [worker.model_copy(update={"metrics_url": None}) for worker in report.workers]
        return report.model_copy(update={"workers": workers})

    @app.get("/v1/usage", tags=["operations"], responses=error_responses(401))
    def usage(request: Request, record: Caller) -> list[TokenUse]:
        """The calling token's usage: jobs submitted, images rendered of its datasets and their GPU time
        (an admin token: every token's)."""
        names = [token.name for token in token_book(request).records()] if record.grant.admin else [record.name]
        return [token_usage(request).usage(name) for name in names]

    @app.get("/metrics", tags=["operations"], responses=error_responses(401, 403))
    def prometheus(record: Caller) -> Response:
        """Prometheus metrics of the gateway and each token's usage: an admin token's read (token names
        are not every tenant's to see). Prometheus sends it with `authorization: {credentials_file: ...}`."""
        if not record.grant.admin:
            raise ApiError(403, "forbidden", f"token {record.name}: /metrics needs an admin token")
        return metrics.exposition()

    return app
