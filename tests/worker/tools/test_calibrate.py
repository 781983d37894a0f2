"""`fluxfarm calibrate` on the tiny model (issue 22, point 1, first step): the probe set rendered at bf16 and
at each level as a worker loads it (the catalog names the GGUF files), a row per level with PSNR and SSIM
against bf16, no perceptual number where its weights are absent, and the rows kept in the farm's Redis."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from fluxfarm.producer.local_stack import RedisServer
from fluxfarm.shared.calibration import read_calibrations
from fluxfarm.shared.ladder import QuantLevel
from fluxfarm.shared.local_store import LocalStore
from tests.conftest import run_fluxfarm
from tests.job_runner_harness import in_process_runner


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
        "FLUXFARM_STORAGE_URL": f"file://{tmp_path / 'store'}",
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
    store = LocalStore(tmp_path / "store")  # the farm's storage keeps them too, where they outlive Redis
    for row in rows:
        assert json.loads(store.get(store.calibration_key(row["id"]))) == kept[row["id"]].model_dump(mode="json")

    again = run_fluxfarm(*args, "--size", "256x256", "--steps", "2", "--device", "cpu", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Q2_K" in again.stdout and "SSIM" in again.stdout
    assert {row.id for row in read_calibrations(client)} == set(kept)  # the same calibrations, replaced


def test_a_worker_cites_its_level_s_calibration_and_exports_carry_it(
    tiny_model: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    from fluxfarm.producer.export import export_dataset
    from fluxfarm.shared.calibration import keep_calibration
    from fluxfarm.shared.jobs import parse_job
    from fluxfarm.shared.local_store import LocalStore
    from fluxfarm.shared.metadata import WorkerInfo
    from fluxfarm.worker.serve.calibration_cites import CalibrationCites
    from fluxfarm.worker.serve.engine_loader import EngineLoader
    from fluxfarm.worker.serve.metrics import WorkerMetrics
    from fluxfarm.worker.settings import WorkerSettings
    from fluxfarm.worker.tools.calibrate import calibrate
    from fluxfarm.worker.tools.tiny_model import gguf_path

    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[models."{tiny_model}"]\nQ8_0 = "{gguf_path(tiny_model, QuantLevel.Q8_0)}"\n')
    settings = WorkerSettings(
        broker_url=redis_server.url, storage_url=f"file://{tmp_path / 'out'}", cache_dir=tmp_path / "c", catalog=catalog
    )
    client = redis.Redis.from_url(redis_server.url)
    client.delete("fluxfarm:calibrations")
    rows = calibrate(settings, str(tiny_model), [QuantLevel.Q8_0], ["a lighthouse"], 256, 256, 2, "cpu", lambda _: None)
    for row in rows:
        keep_calibration(client, row)
    q8 = rows[1]

    at_q8 = settings.model_copy(update={"level": QuantLevel.Q8_0})
    worker = WorkerInfo(node="w-cite", hostname="here", device="cpu", gpu_name=None, vram_gib=None)
    engine, _ = EngineLoader(at_q8, str(tiny_model), None, "cpu", worker, WorkerMetrics()).load()
    farm = in_process_runner(engine, client, tmp_path / "out", "w-cite", cites=CalibrationCites(client))
    job = parse_job({"prompt": "a fox", "width": 256, "height": 256, "steps": 2, "dataset": "cited"})
    farm.queue(job)
    try:
        result = farm.run(job)
    finally:
        farm.batcher.close()
    assert result.calibration is not None and result.calibration.id == q8.id
    assert (result.calibration.psnr_db, result.calibration.ssim) == (q8.psnr_db, q8.ssim)

    export_dataset(LocalStore(tmp_path / "out"), "cited", "parquet", LocalStore(tmp_path / "export"))
    (table_file,) = (tmp_path / "export").rglob("*.parquet")
    table = pq.read_table(table_file).to_pylist()
    assert [(r["calibration_id"], r["calibration_psnr_db"], r["calibration_ssim"]) for r in table] == [
        (q8.id, q8.psnr_db, q8.ssim)
    ]
