"""The settings of a test host that plays both sides of the farm: a client and its workers on one machine."""

from __future__ import annotations

from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.worker.settings import WorkerSettings


class HostSettings(WorkerSettings, ProducerSettings):
    """Every FLUXFARM_* setting: what a worker reads and what a producer reads, as one object for tests
    that start both (a deployment gives each process its own side's class)."""
