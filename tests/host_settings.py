"""The settings of a test host that plays both sides of the farm: a client and its workers on one machine."""

from __future__ import annotations

from fluxfarm.producer.gateway.settings import GatewaySettings
from fluxfarm.worker.settings import WorkerSettings


class HostSettings(WorkerSettings, GatewaySettings):
    """Every FLUXFARM_* setting: what a worker, a producer and the gateway read, as one object for tests
    that start them all (a deployment gives each process its own class)."""
