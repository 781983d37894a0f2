"""The gateway's ASGI application: one FarmClient (the producer-side Redis and S3 credentials live
here, and only here), the token book, and the `/v1` routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.gateway import datasets_api, jobs_api, uploads_api
from fluxfarm.producer.gateway.errors import install_error_handlers
from fluxfarm.producer.gateway.settings import GatewaySettings
from fluxfarm.producer.gateway.tokens import TokenBook
from fluxfarm.producer.gateway.usage import TokenUsage
from fluxfarm.shared import __version__

READS_IN_FLIGHT = 16
"""Storage reads one request makes at once (a page of results' metadata)."""


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = FarmClient(settings)
        app.state.settings = settings
        app.state.client = client
        app.state.tokens = TokenBook(client.redis)
        app.state.usage = TokenUsage(client.redis, client.datasets)
        app.state.pool = ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="gateway-read")
        try:
            yield
        finally:
            app.state.pool.shutdown(cancel_futures=True)
            client.close()

    app = FastAPI(
        title="fluxfarm gateway",
        version=__version__,
        description="Submit FLUX render jobs to a shared farm and read their results, with a bearer token.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(jobs_api.router)
    app.include_router(datasets_api.router)
    app.include_router(uploads_api.router)

    @app.get("/healthz", tags=["operations"])
    def healthz(request: Request) -> JSONResponse:
        """200 while the gateway reaches Redis; 503 otherwise (no token needed: for load balancers)."""
        try:
            request.app.state.client.redis.ping()
        except Exception as error:  # any failure to reach Redis is unhealthy
            return JSONResponse({"ok": False, "reason": type(error).__name__}, status_code=503)
        return JSONResponse({"ok": True})

    return app
