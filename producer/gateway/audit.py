"""The audit log: one record per submit, upload, cancel, export and token change, kept in the farm's
Redis (the stream `fluxfarm:audit`, the newest AUDIT_KEEP) and logged on the `fluxfarm.audit` logger.
Names and counts only: never a token, never a prompt. Read it with
`redis-cli --user admin XREVRANGE fluxfarm:audit + - COUNT 20`."""

from __future__ import annotations

import json
import logging

import redis

from fluxfarm.shared import keys

AUDIT_KEEP = 100_000
log = logging.getLogger("fluxfarm.audit")


def audit(client: redis.Redis, action: str, token: str, **facts: object) -> None:
    entry = json.dumps({"action": action, "token": token, **facts}, sort_keys=True, default=str)
    log.info(entry)
    client.xadd(keys.AUDIT, {"entry": entry}, maxlen=AUDIT_KEEP, approximate=True)
