"""An export's lease lives as long as the gateway holding it (renewed past its own length), ends with the
export, and ends at once for exports a stopping gateway never started. Real Redis."""

from __future__ import annotations

import time

import redis

from fluxfarm.producer.gateway.exports_api import ExportLeases
from fluxfarm.shared import keys

LEASE_S = 0.6


def test_a_held_lease_outlives_its_length_and_ends_with_its_export_or_its_gateway(redis_client: redis.Redis) -> None:
    redis_client.flushdb()
    leases = ExportLeases(redis_client, LEASE_S).start()
    try:
        leases.hold("herons", "aaaa")
        leases.hold("herons", "bbbb")
        time.sleep(3 * LEASE_S)
        assert redis_client.exists(keys.export_lease("herons", "aaaa"), keys.export_lease("herons", "bbbb")) == 2
        leases.release("herons", "aaaa")
        assert not redis_client.exists(keys.export_lease("herons", "aaaa"))
    finally:
        leases.stop()
    assert not redis_client.exists(keys.export_lease("herons", "bbbb"))  # never started: interrupted at once

    lapsed = ExportLeases(redis_client, LEASE_S)  # held, never renewed: a gateway that died
    lapsed.hold("herons", "cccc")
    time.sleep(2 * LEASE_S)
    assert not redis_client.exists(keys.export_lease("herons", "cccc"))
