"""kombu's Redis transport, changed twice: acknowledgement bookkeeping goes as plain pipelines, not `MULTI`
blocks, and an ack or reject that Redis cannot take still frees the worker's prefetch slot (`QoS.ack`).

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
from kombu.transport import virtual


class QoS(kombu_redis.QoS):
    @contextmanager
    def pipe_or_acquire(self, pipe: Any = None, client: Any = None) -> Iterator[Any]:
        if pipe:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as connection:
                yield connection.pipeline(transaction=False)

    def ack(self, delivery_tag: str) -> None:
        """kombu's ack, except that the delivery leaves this worker's prefetch window even when Redis cannot be
        written. kombu forgets a delivery only after Redis took its ack: each ack that failed while Redis
        restarted kept a prefetch slot for good, and once all were kept the worker stopped asking for messages,
        with no read in flight to notice the dead connection (a worker hung this way for good in
        tests/system/test_reliability.py). The message stays in `unacked` and comes back after its lease;
        the stored-result check answers it there. The error still reaches Celery, which logs it."""
        try:
            self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """kombu's reject, freeing the prefetch slot even when Redis cannot be written (see `ack`)."""
        try:
            if requeue:
                self.restore_by_tag(delivery_tag, leftmost=True)
            else:
                self._remove_from_indices(delivery_tag).execute()
        finally:
            virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
"""Celery's `broker_transport`: the broker URL's scheme no longer picks the transport (kombu parses the
redis:// or rediss:// URL as it did)."""
