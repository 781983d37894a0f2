"""The audit log: one JSON line per submit, cancel and token change, on the `fluxfarm.audit` logger (the
gateway's stderr unless the operator routes it). Names and counts only: never a token, never a prompt."""

from __future__ import annotations

import json
import logging

log = logging.getLogger("fluxfarm.audit")


def audit(action: str, token: str, **facts: object) -> None:
    log.info(json.dumps({"action": action, "token": token, **facts}, sort_keys=True, default=str))
