"""kombu's Redis transport with its acknowledgement bookkeeping sent as plain pipelines, not `MULTI` blocks.

kombu records each delivered message in two keys (the `unacked` hash and its `unacked_index` sorted set)
and clears both on the ack, each pair in a `MULTI`/`EXEC` transaction: 4 of a job's commands were those
wrappers. They bought nothing the farm needs. Redis runs a pipeline's commands in order from one
connection; another client may only act between them, and the one that reads these keys (the visibility
sweep, `restore_visible`) takes only entries older than the visibility timeout, so it never sees a
half-written fresh delivery, and an ack half done (index entry gone, hash entry left) leaves nothing it
would restore. Restores keep kombu's own WATCH transaction (they pass their pipeline in). The keys and
their contents are kombu's, so Flower, `celery inspect` and a stock kombu read this farm's broker as ever.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis


class QoS(kombu_redis.QoS):
    @contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        if pipe:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as connection:
                yield connection.pipeline(transaction=False)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
"""Celery's `broker_transport`: the broker URL's scheme no longer picks the transport (kombu parses the
redis:// or rediss:// URL as it did)."""
