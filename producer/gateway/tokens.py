"""Gateway tokens: who may submit to and read which datasets, with what quotas.

A token is shown once, when it is made; Redis keeps only its sha256 (a token is 256 random bits, so a
plain hash is as strong as a slow one, as GitHub's and PyPI's API tokens are kept). Scopes are dataset
names or prefixes (`moths-*`), matched as text: never a regex or a glob a caller can shape."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated

import redis
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from fluxfarm.shared import keys
from fluxfarm.shared.celery_app import Priority
from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.jobs import parse_dataset_name
from fluxfarm.shared.redis_conn import text
from fluxfarm.shared.routing import parse_tenant
from fluxfarm.shared.validation_errors import describe_validation_error

TOKEN_PREFIX = "ffk_"
"""What every gateway token begins with, so a secret scanner (and a person) can tell one."""
MAX_SCOPES = 64
DEFAULT_PRIORITIES: list[Priority] = ["normal", "low"]
"""A token may not jump the queue (`high`) unless it is made to."""


class TokenError(FarmError):
    """A token command that cannot be done (a name taken, an unknown name, a bad scope)."""


def _scope(value: str) -> str:
    """A dataset name, or a prefix of one followed by `*`; `*` alone is every dataset."""
    if value == "*":
        return value
    name = value[:-1] if value.endswith("*") else value
    parse_dataset_name(name)
    return value


DatasetScope = Annotated[str, AfterValidator(_scope)]
TokenName = Annotated[str, AfterValidator(parse_tenant)]
"""A token's name is its tenant's (shared/routing.py): its jobs wait in queues of their own, which the
workers take in turn with other tokens'."""


class TokenGrant(BaseModel):
    """What a token may do: the datasets it sees and touches, its quotas and the priorities it may use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    datasets: list[DatasetScope] = Field(min_length=1, max_length=MAX_SCOPES)
    max_queued: int | None = Field(default=None, ge=1, description="Jobs queued or running at once, at most.")
    priorities: list[Priority] = Field(default_factory=DEFAULT_PRIORITIES.copy, min_length=1)
    admin: bool = Field(default=False, description="Sees the whole farm and manages tokens.")

    def allows(self, dataset: str) -> bool:
        """Whether the dataset is in scope: an exact name, or one that starts with a `prefix*` scope."""
        return self.admin or any(
            scope == dataset or (scope.endswith("*") and dataset.startswith(scope[:-1])) for scope in self.datasets
        )


class TokenRecord(BaseModel):
    """A token as Redis keeps it: its name, its grant and when it was made; not the token."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: TokenName
    grant: TokenGrant
    created_at: datetime


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenBook:
    """The tokens of one farm, in its Redis (shared/keys.py: TOKENS, TOKEN_NAMES)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, name: str, grant: Mapping[str, object] | TokenGrant) -> str:
        """Make a token named `name` and return it: the only time it is seen. A name is taken once."""
        try:
            record = TokenRecord(name=name, grant=grant, created_at=datetime.now(UTC))
        except ValidationError as error:
            raise TokenError(describe_validation_error(error)) from None
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        digest = token_digest(token)
        if not self.redis.hsetnx(keys.TOKEN_NAMES, record.name, digest):
            raise TokenError(f"a token named {name!r} exists: revoke it first, or choose another name")
        self.redis.hset(keys.TOKENS, digest, record.model_dump_json())
        return token

    def find(self, token: str) -> TokenRecord | None:
        """The record of a presented token; None for an unknown or revoked one."""
        if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
            return None
        raw = self.redis.hget(keys.TOKENS, token_digest(token))
        return None if raw is None else TokenRecord.model_validate_json(raw)

    def records(self) -> list[TokenRecord]:
        """Every live token's record, by name."""
        raws = self.redis.hvals(keys.TOKENS)
        return sorted((TokenRecord.model_validate_json(raw) for raw in raws), key=lambda record: record.name)

    def revoke(self, name: str) -> None:
        """Revoke the token named `name`: the next request that presents it is refused."""
        digest = self.redis.hget(keys.TOKEN_NAMES, name)
        if digest is None:
            raise TokenError(f"no token named {name!r}")
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.TOKENS, text(digest))
            pipe.hdel(keys.TOKEN_NAMES, name)
            pipe.execute()


class TokenUse(BaseModel):
    """One token's usage: jobs it submitted, images rendered of its datasets and their GPU time."""

    token: str
    jobs_submitted: int
    images: int
    gpu_seconds: float
