"""What only producers read (clients, submits, `fluxfarm status`, the exporter), on top of the farm's own."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from fluxfarm.shared.models import FluxModel
from fluxfarm.shared.routing import parse_tenant
from fluxfarm.shared.settings import FarmSettings, blank_is_none


class ProducerSettings(FarmSettings):
    """The farm's settings and a producer's: how it batches submits and how much of Redis it may fill."""

    default_model: FluxModel = Field(
        default=FluxModel.FLUX_1_DEV,
        description="The model of a job that names none (shared/models.py: flux.1-dev, flux.2-klein-4b, ...).",
    )
    submit_chunk: int = Field(
        default=500, ge=1, le=10_000, description="Jobs a file submit publishes per pipelined round trip to Redis."
    )
    api_url: str | None = Field(
        default=None,
        description=(
            "The gateway's URL (https://farm.example/): the client and the CLI submit and read through it with "
            "FLUXFARM_API_TOKEN, holding no Redis or S3 credentials. Unset: they use Redis and storage directly."
        ),
    )
    api_token: SecretStr | None = Field(default=None, description="A gateway token (`fluxfarm token create`).")
    tenant: str | None = Field(
        default=None,
        description=(
            "The fair-share tenant this producer's jobs queue under (lowercase letters, digits, '_', '-'): the "
            "workers take the tenants' jobs in turn, so a million-job dataset does not hold back another "
            "tenant's ten. The gateway sets it per token; unset, jobs go to the shared queues."
        ),
    )
    redis_maxmemory_mib: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Producers: the memory Redis may use where its own maxmemory is 0 (unlimited); submits stop "
            "before it. Redis' maxmemory wins when set."
        ),
    )
    redis_reserve_share: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Producers: the share of Redis' maxmemory submits leave for the workers' bookkeeping.",
    )

    _blank_producer_is_none = field_validator("redis_maxmemory_mib", "api_url", "api_token", "tenant", mode="before")(
        blank_is_none
    )

    @field_validator("tenant")
    @classmethod
    def _tenant_name(cls, value: str | None) -> str | None:
        return None if value is None else parse_tenant(value)
