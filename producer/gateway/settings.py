"""What only the gateway reads, on top of a producer's settings."""

from __future__ import annotations

from pydantic import Field

from fluxfarm.producer.settings import ProducerSettings


class GatewaySettings(ProducerSettings):
    """A producer's settings and the gateway's limits; every field is a `FLUXFARM_<NAME>` variable."""

    gateway_max_body_mib: float = Field(
        default=16,
        gt=0,
        description="Gateway: the largest JSON request body (a list of jobs); larger ones are refused (413).",
    )
    gateway_max_upload_mib: float = Field(
        default=1024,
        gt=0,
        description="Gateway: the largest dataset file a request may upload; larger uploads are refused (413).",
    )
