"""The gateway's Prometheus metrics at `/metrics` (an admin token's read): requests by route and status,
their latency, and each token's usage, read from Redis at every scrape."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from fluxfarm.producer.gateway.tokens import TokenBook
from fluxfarm.producer.gateway.usage import TokenUsage


class TokenCollector(Collector):
    """Each live token's usage, as the token book and its usage records hold it now."""

    def __init__(self, book: TokenBook, usage: TokenUsage) -> None:
        self._book, self._usage = book, usage

    def collect(self) -> Iterator[Metric]:
        jobs = CounterMetricFamily(
            "fluxfarm_gateway_token_jobs_submitted", "Jobs each token enqueued through the gateway.", labels=["token"]
        )
        images = CounterMetricFamily(
            "fluxfarm_gateway_token_images", "Images rendered of each token's datasets.", labels=["token"]
        )
        gpu = CounterMetricFamily(
            "fluxfarm_gateway_token_gpu_seconds", "GPU time the images of each token's datasets took.", labels=["token"]
        )
        for record in self._book.records():
            use = self._usage.usage(record.name)
            jobs.add_metric([record.name], use.jobs_submitted)
            images.add_metric([record.name], use.images)
            gpu.add_metric([record.name], use.gpu_seconds)
        yield from (jobs, images, gpu)


class GatewayMetrics:
    """The registry /metrics serves, and the middleware that counts every request."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fluxfarm_gateway_requests",
            "Requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "fluxfarm_gateway_request_seconds",
            "Time to answer a request (a long-poll wait included), by route template.",
            ["route"],
            registry=self.registry,
        )

    def watch_tokens(self, book: TokenBook, usage: TokenUsage) -> None:
        self.registry.register(TokenCollector(book, usage))

    def install(self, app: FastAPI) -> None:
        @app.middleware("http")
        async def count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            start = time.perf_counter()
            response = await call_next(request)
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")  # the template, never the caller's raw path
            self.requests.labels(template, request.method, str(response.status_code)).inc()
            self.seconds.labels(template).observe(time.perf_counter() - start)
            return response

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
