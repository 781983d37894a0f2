"""`fluxfarm gateway` as a process in front of a test farm, and the tokens tests make for it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from fluxfarm.producer.local_stack import free_port
from tests.conftest import farm_env, run_fluxfarm
from tests.fault_farm import wait_until
from tests.host_settings import HostSettings

REQUEST_TIMEOUT_S = 90


class Gateway:
    def __init__(self, url: str, log: Path, env: dict[str, str]) -> None:
        self.url, self.log, self.env = url, log, env

    def token(self, name: str, *options: str) -> str:
        """A token made as an operator makes it: `fluxfarm token create NAME OPTIONS`."""
        made = run_fluxfarm("token", "create", name, *options, env=self.env)
        assert made.returncode == 0, made.stderr
        return made.stdout.strip()

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=REQUEST_TIMEOUT_S)


@contextmanager
def running_gateway(settings: HostSettings, log: Path, extra_env: dict[str, str] | None = None) -> Iterator[Gateway]:
    """The gateway on a free port of 127.0.0.1 with the farm's producer-side settings, once /healthz answers."""
    port = free_port()
    env = {**os.environ, **farm_env(settings), "PATH": str(Path(sys.executable).parent), **(extra_env or {})}
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "fluxfarm", "gateway", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, 60, "the gateway to answer /healthz", poll_s=0.2)
        yield Gateway(url, log, env)
    finally:
        process.terminate()
        process.wait(timeout=30)
