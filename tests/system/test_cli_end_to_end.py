"""`fluxfarm submit` against a real worker: single prompts, prompt files, --wait with progress; the first
two straight to Redis and through the gateway (issue 19, acceptance 2)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from fluxfarm.producer.settings import ProducerSettings
from fluxfarm.shared.fleet import fleet_report
from tests.adapter_files import write_peft_lora
from tests.conftest import Farm, client_env, run_fluxfarm, via

pytestmark = pytest.mark.slow


def _fluxfarm(farm: Farm, *args: str) -> subprocess.CompletedProcess[str]:
    return run_fluxfarm(*args, env=farm.worker_env())


def _producer(settings: ProducerSettings, *args: str) -> subprocess.CompletedProcess[str]:
    return run_fluxfarm(*args, env=client_env(settings))


def test_submit_a_prompt_and_wait(farm: Farm, client_settings: ProducerSettings) -> None:
    dataset = f"cli-one-{via(client_settings)}"  # each transport its own dataset
    job = ["--prompt", "a castle in fog", *f"--width 256 --height 320 --steps 2 --seed 9 --dataset {dataset}".split()]
    done = _producer(client_settings, "submit", *job, "--wait", "--timeout", "240")
    assert done.returncode == 0, done.stderr
    assert "queued 1 jobs (0 already stored)" in done.stderr
    job_id, uri = done.stdout.strip().split("\t")
    assert uri == f"s3://{farm.bucket}/{farm.prefix}/{dataset}/{job_id}.png"
    meta_key = f"{farm.prefix}/{dataset}/{job_id}.json"
    meta = json.loads(farm.s3.client().get_object(Bucket=farm.bucket, Key=meta_key)["Body"].read())
    assert meta["job"] | {"prompt": "a castle in fog", "width": 256, "height": 320, "seed": 9} == meta["job"]

    again = _producer(client_settings, "submit", *job)
    assert again.returncode == 0
    assert "queued 0 jobs (1 already stored)" in again.stderr
    assert again.stdout.strip() == job_id


def test_submit_a_prompt_file_with_cli_defaults(farm: Farm, client_settings: ProducerSettings, tmp_path: Path) -> None:
    dataset = f"cli-file-{via(client_settings)}"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comments and blank lines are skipped\na red kite\n\na blue kite\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a green kite", "seed": 3, "width": 320}) + "\n")
    defaults = ("--width", "256", "--height", "256", "--steps", "1", "--dataset", dataset, "--wait")
    for path in (prompts, rows):
        done = _producer(client_settings, "submit", str(path), *defaults)
        assert done.returncode == 0, done.stderr
    folder = f"{farm.prefix}/{dataset}/"
    keys = [k for k in farm.s3.keys(farm.bucket, folder) if "/" not in k[len(folder) :]]  # not the manifest
    assert len([k for k in keys if k.endswith(".png")]) == 3
    metas = [
        json.loads(farm.s3.client().get_object(Bucket=farm.bucket, Key=k)["Body"].read())
        for k in keys
        if k.endswith(".json")
    ]
    by_prompt = {meta["job"]["prompt"]: meta["job"] for meta in metas}
    assert set(by_prompt) == {"a red kite", "a blue kite", "a green kite"}
    assert by_prompt["a green kite"]["width"] == 320 and by_prompt["a green kite"]["seed"] == 3
    assert by_prompt["a red kite"]["width"] == 256 and by_prompt["a red kite"]["steps"] == 1


def test_wait_gives_up_after_its_timeout_with_a_clear_error(farm: Farm, tmp_path: Path) -> None:
    # 30 steps at 512x512 take the CPU worker seconds, far longer than the half-second timeout.
    job = "--prompt slow --width 512 --height 512 --steps 30 --dataset cli-slow".split(" ")
    done = _fluxfarm(farm, "submit", *job, "--wait", "--timeout", "0.5")
    assert done.returncode == 1
    assert "did not finish within 0.5s" in done.stderr
    assert "Traceback" not in done.stderr


def test_submit_with_a_lora_and_clear_errors_for_bad_adapter_options(
    farm: Farm, tiny_model: Path, tmp_path: Path
) -> None:
    lora = write_peft_lora(tiny_model, tmp_path / "style")
    farm.s3.client().upload_file(str(lora), farm.bucket, "loras/style.safetensors")
    source = f"s3://{farm.bucket}/loras/style.safetensors"
    job = ["--prompt", "a kite", "--width", "256", "--height", "256", "--steps", "1", "--dataset", "cli-lora"]
    done = _fluxfarm(farm, "submit", *job, "--lora", f"{source}=0.7", "--wait", "--timeout", "240")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split("\t")[0]
    meta_key = f"{farm.prefix}/cli-lora/{job_id}.json"
    meta = json.loads(farm.s3.client().get_object(Bucket=farm.bucket, Key=meta_key)["Body"].read())
    assert meta["job"]["loras"] == [{"source": source, "weight": 0.7}]
    assert [(info["source"], info["weight"]) for info in meta["loras"]] == [(source, 0.7)]
    for options, reason in (
        (["--lora", f"{source}=strong"], "the weight after '=' must be a number"),
        (["--controlnet", f"s3://{farm.bucket}/controlnets/canny"], "--controlnet needs --control-image"),
        (["--control-scale", "0.5"], "--control-image and --control-scale need --controlnet"),
    ):
        refused = _fluxfarm(farm, "submit", *job, *options)
        assert refused.returncode != 0 and reason in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


def test_submit_an_img2img_job_with_its_image_and_strength(farm: Farm, tmp_path: Path) -> None:
    """`--image` and `--strength` (issue 20, point 2): the worker renders from the stored image, and the
    metadata keeps the strength and names the image by its bytes' sha256."""
    start = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(start)
    farm.s3.client().upload_file(str(start), farm.bucket, "inputs/start.png")
    source = f"s3://{farm.bucket}/inputs/start.png"
    job = ["--prompt", "a kite", "--width", "256", "--height", "256", "--steps", "2", "--dataset", "cli-img2img"]
    done = _fluxfarm(farm, "submit", *job, "--image", source, "--strength", "0.5", "--wait", "--timeout", "240")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split("\t")[0]
    meta_key = f"{farm.prefix}/cli-img2img/{job_id}.json"
    meta = json.loads(farm.s3.client().get_object(Bucket=farm.bucket, Key=meta_key)["Body"].read())
    assert (meta["job"]["images"], meta["job"]["strength"]) == ([source], 0.5)
    assert [info["sha256"] for info in meta["input_images"]] == [hashlib.sha256(start.read_bytes()).hexdigest()]
    refused = _fluxfarm(farm, "submit", *job, "--strength", "0.5")
    assert refused.returncode != 0 and "strength: only a FLUX.1 img2img job" in refused.stderr


def test_a_fleet_plan_on_the_live_farm_uses_the_workers_measured_rate(farm: Farm, tmp_path: Path) -> None:
    """Issue 21, point 4, acceptance 4: `fluxfarm plan FILE --fleet live` takes the live worker's own
    images/hour while rendering, the rate it measured over its last minutes and publishes in its heartbeat
    (the plan's lies between the beats read just before and just after it), and the ETA is the file's jobs at
    that rate. Idle time does not lower it: the worker sits idle while the plan is made."""
    job = ["--width", "256", "--height", "256", "--steps", "2", "--dataset", "cli-fleet-live"]
    batch = tmp_path / "batch.txt"
    batch.write_text("".join(f"a lantern, take {i}\n" for i in range(6)))
    done = _fluxfarm(farm, "submit", str(batch), *job, "--wait", "--timeout", "240")
    assert done.returncode == 0, done.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a lighthouse at dawn, study {i}\n" for i in range(10_000)))
    client = redis.Redis.from_url(farm.settings.broker_url)
    before = {w.node: w.busy_images_per_hour for w in fleet_report(client).workers}
    planned = _fluxfarm(farm, "plan", str(prompts), "--fleet", "live", "--json")
    report = fleet_report(client)
    after = {w.node: w.busy_images_per_hour for w in report.workers}
    (idle_rate,) = [w.images_per_hour for w in report.workers]
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    (row,) = plan["classes"]
    assert (row["name"], row["level"], row["count"]) == ("cpu", "Q8_0", 1)
    (rate_before,), (rate_after,) = before.values(), after.values()
    low, high = sorted((rate_before, rate_after))
    assert low <= row["images_per_hour"] <= high, (rate_before, row["images_per_hour"], rate_after)
    assert row["images_per_hour"] > 0
    assert idle_rate is not None and idle_rate < row["images_per_hour"], "the idle-inclusive rate is the lower"
    assert plan["eta_hours"] == pytest.approx(10_000 / row["images_per_hour"])
