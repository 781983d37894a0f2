"""How every fluxfarm process reaches Redis: the one place that knows TLS (rediss://) and its CA.

Celery's broker and result backend take the same options (shared/celery_app.py), so a farm behind a
private CA needs one setting, FLUXFARM_TLS_CA_FILE, on every host.
"""

from __future__ import annotations

import logging
import ssl
import time
from pathlib import Path

import redis
from redis.exceptions import AuthenticationError, AuthorizationError

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.settings import FarmSettings

log = logging.getLogger(__name__)


def tls_options(url: str, ca_file: Path | None) -> dict[str, object] | None:
    """rediss:// verifies the server's certificate (against `ca_file` when given, else the system's
    CAs) unless the URL itself says otherwise (ssl_cert_reqs=...); None for plain redis://."""
    if not url.startswith("rediss://") or "ssl_cert_reqs" in url:
        return None
    options: dict[str, object] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if ca_file is not None:
        options["ssl_ca_certs"] = str(ca_file)
    return options


def text(value: bytes | str) -> str:
    """A Redis reply as text, whether the client decodes replies (decode_responses) or not."""
    return value.decode() if isinstance(value, bytes) else value


def redis_now(client: redis.Redis) -> float:
    """Redis' clock, in seconds: one clock for every worker and producer, whatever each host's says."""
    seconds, micros = client.time()
    return seconds + micros / 1e6


def open_redis(settings: FarmSettings, url: str | None = None) -> redis.Redis:
    """A client of the broker's Redis (or of `url`), with the farm's TLS options."""
    url = url or settings.broker_url
    return redis.Redis.from_url(url, **(tls_options(url, settings.tls_ca_file) or {}))


def wait_until_reachable(client: redis.Redis, retry_s: float = 2.0) -> None:
    """Block until Redis answers PING, saying so every `retry_s`: a worker started while Redis restarts
    (or before it, as a compose file may start them) waits for it as Celery's own connection does, where
    its first read of the queue registry used to end the process with a traceback. A refusal that waiting
    cannot mend (a wrong password or user, a certificate that does not verify: redis-py raises both as
    ConnectionErrors) is one FarmError at once."""
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError as error:
            if isinstance(error, AuthenticationError | AuthorizationError) or isinstance(
                error.__context__, ssl.SSLCertVerificationError
            ):
                raise FarmError(f"Redis refused this worker: {error}") from None
            log.warning("Redis unreachable (%s); next try in %.0fs", error, retry_s)
            time.sleep(retry_s)
