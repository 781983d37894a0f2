"""A real redis-server started as the compose file starts it: infra/redis/start.sh with the ACL users of
infra/redis/users.acl, each with a test password (the `acl_redis` fixture in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from fluxfarm.producer.local_stack import free_port

START = Path(__file__).resolve().parents[1] / "infra" / "redis" / "start.sh"
USERS = ("admin", "worker", "producer", "gateway", "exporter", "flower")
PASSWORDS = {user: f"{user}-test-secret" for user in USERS}


def password_env() -> dict[str, str]:
    """REDIS_<USER>_PASSWORD of every user, as compose passes them to the redis service."""
    return {f"REDIS_{user.upper()}_PASSWORD": password for user, password in PASSWORDS.items()}


class AclRedis:
    def __init__(self, port: int) -> None:
        self.port = port

    def url(self, user: str) -> str:
        return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{self.port}/0"

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user))


def run_acl_redis(work: Path) -> Iterator[AclRedis]:
    port = free_port()
    env = {**os.environ, **password_env(), "REDIS_ACL_FILE": str(work / "users.acl")}
    command = [str(START), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", ""]
    with (work / "redis.log").open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = AclRedis(port)
    deadline = time.monotonic() + 30
    while True:
        try:
            server.client("admin").ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError((work / "redis.log").read_text()) from None
            time.sleep(0.1)
    yield server
    process.terminate()
    process.wait(timeout=30)
