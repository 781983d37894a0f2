"""Who is calling: the bearer token of every request, checked against the token book, and what it may
touch. A token travels only in the Authorization header, never in a URL (URLs reach logs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from fluxfarm.producer.gateway.errors import ApiError
from fluxfarm.producer.gateway.state import token_book
from fluxfarm.producer.gateway.tokens import TokenBook, TokenRecord
from fluxfarm.shared.celery_app import Priority

_bearer = HTTPBearer(auto_error=False, description="A token made by `fluxfarm token create`.")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    book: Annotated[TokenBook, Depends(token_book)],
) -> TokenRecord:
    """The token's record; 401 without a token, or with one that is unknown or revoked."""
    if credentials is None:
        raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>", _CHALLENGE)
    record = book.find(credentials.credentials)
    if record is None:
        raise ApiError(401, "unauthenticated", "unknown or revoked token", _CHALLENGE)
    return record


Caller = Annotated[TokenRecord, Depends(caller)]


def check_datasets(record: TokenRecord, datasets: Iterable[str]) -> None:
    """403 unless every dataset is in the token's scope."""
    for dataset in sorted(set(datasets)):
        if not record.grant.allows(dataset):
            raise ApiError(
                403,
                "forbidden",
                f"token {record.name} may not touch dataset {dataset!r} (scope: {', '.join(record.grant.datasets)})",
            )


def check_priority(record: TokenRecord, priority: Priority) -> None:
    if priority not in record.grant.priorities:
        raise ApiError(
            403,
            "forbidden",
            f"token {record.name} may not use priority {priority!r} (allowed: {', '.join(record.grant.priorities)})",
        )
