"""What the producer asks of the fleet: its report, and a warning when jobs went where no worker listens."""

from __future__ import annotations

import redis
from rich.console import Console

from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.fleet import FleetReport, fleet_report
from fluxfarm.shared.redis_conn import open_redis
from fluxfarm.shared.settings import redact_url


def read_fleet(settings: ProducerSettings) -> FleetReport:
    """The fleet as the broker's Redis sees it (or the gateway, with FLUXFARM_API_URL); FarmError when it
    cannot be reached."""
    if settings.api_url:
        from fluxfarm.producer.http_client import HttpFarmClient

        with HttpFarmClient(settings) as gateway:
            return gateway.fleet()
    client = open_redis(settings)
    try:
        return fleet_report(client)
    except redis.RedisError as error:
        raise FarmError(f"cannot reach the broker at {redact_url(settings.broker_url)}: {error}") from None
    finally:
        client.close()


def warn_unserved(queues: set[str], settings: ProducerSettings, err: Console) -> None:
    """Say at once when jobs went to a queue no live worker consumes, instead of letting them wait silently."""
    if not queues:
        return
    try:
        report = read_fleet(settings)
    except FarmError:
        return  # the jobs are queued; the fleet check is advice, not a condition
    for queue in report.unserved:
        if queue.name in queues:
            err.print(
                f"[yellow]warning:[/yellow] no live worker serves {queue.needs}: {queue.waiting} jobs wait "
                f"in {queue.name} until one starts (see `fluxfarm status`)",
                highlight=False,
            )
