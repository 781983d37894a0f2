"""What the gateway's app holds for its routes (set up in app.py's lifespan), read with its type."""

from __future__ import annotations

from fastapi import Request

from fluxfarm.producer.client import FarmClient
from fluxfarm.producer.gateway.tokens import TokenBook
from fluxfarm.producer.gateway.usage import TokenUsage


def farm_client(request: Request) -> FarmClient:
    """The gateway's one FarmClient: the farm's Redis and storage."""
    client: FarmClient = request.app.state.client
    return client


def token_book(request: Request) -> TokenBook:
    book: TokenBook = request.app.state.tokens
    return book


def token_usage(request: Request) -> TokenUsage:
    usage: TokenUsage = request.app.state.usage
    return usage
