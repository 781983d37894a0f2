"""Reading /metrics as Prometheus does, and starting `fluxfarm exporter`: what the metrics and full-Redis
tests share."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.fault_farm import wait_until


def scrape(port: int) -> dict[str, list[Sample]]:
    """Family name -> its samples, as Prometheus would parse them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    matches = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {matches} in {samples}"
    return matches[0]


def start_exporter(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`fluxfarm exporter` on 127.0.0.1:`port`, once it accepts connections."""
    exporter = subprocess.Popen(
        [sys.executable, "-m", "fluxfarm", "exporter", "--port", str(port), "--address", "127.0.0.1"],
        env={**env, "PATH": str(Path(sys.executable).parent)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        assert exporter.poll() is None, "the exporter exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    wait_until(listening, 60, "the exporter to listen", poll_s=0.2)
    return exporter
