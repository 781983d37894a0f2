"""`fluxfarm calibrate` on the tiny model (issue 22, point 1, first step): the probe set rendered at bf16 and
at each level as a worker loads it (the catalog names the GGUF files), a row per level with PSNR and SSIM
against bf16, no perceptual number where its weights are absent, and the rows kept in the farm's Redis."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.worker.tools.calibrate import read_calibrations
from tests.conftest import run_fluxfarm


def test_levels_are_measured_against_bf16_and_kept(tiny_model: Path, redis_server: RedisServer, tmp_path: Path) -> None:
    from fluxfarm.worker.tools.tiny_model import gguf_path

    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        f'[models."{tiny_model}"]\n'
        + "".join(f'{level.value} = "{gguf_path(tiny_model, level)}"\n' for level in (QuantLevel.Q8_0, QuantLevel.Q2_K))
    )
    prompts = tmp_path / "probe.txt"
    prompts.write_text("a lighthouse at dawn\na bowl of figs\na red fox in snow\n")
    client = redis.Redis.from_url(redis_server.url)
    client.delete("fluxfarm:calibrations")
    env = {
        "FLUXFARM_BROKER_URL": redis_server.url,
        "FLUXFARM_CATALOG": str(catalog),
        "FLUXFARM_CACHE_DIR": str(tmp_path / "cache"),
    }
    args = ["calibrate", "--model", str(tiny_model), "--levels", "Q8_0,Q2_K", "--prompts", str(prompts)]
    done = run_fluxfarm(*args, "--size", "256x256", "--steps", "2", "--device", "cpu", "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [row["level"] for row in rows] == ["bf16", "Q8_0", "Q2_K"]
    bf16, q8, q2 = rows
    assert bf16["psnr_db"] is None and bf16["ssim"] == 1.0  # bf16 against itself
    assert q8["psnr_db"] > q2["psnr_db"] > 0 and 1.0 >= q8["ssim"] > q2["ssim"]  # errors grow as levels drop
    assert all(row["images"] == 3 and row["base_transformer_sha256"] == bf16["transformer_sha256"] for row in rows)
    assert len({row["transformer_sha256"] for row in rows}) == 3
    for row in rows:  # a number only where LPIPS' weights are on the machine; never one made up
        assert (row["perceptual"] is None) == (row["perceptual_metric"] is None)
        assert (
            row["perceptual"] is not None
            or "not measured" in row["perceptual_note"]
            or "unavailable" in row["perceptual_note"]
        )
    kept = {row.id: row for row in read_calibrations(client)}
    assert set(kept) == {row["id"] for row in rows}

    again = run_fluxfarm(*args, "--size", "256x256", "--steps", "2", "--device", "cpu", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Q2_K" in again.stdout and "SSIM" in again.stdout
    assert {row.id for row in read_calibrations(client)} == set(kept)  # the same calibrations, replaced
