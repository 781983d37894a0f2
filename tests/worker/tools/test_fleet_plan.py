"""`fluxfarm plan FILE --fleet fleet.toml` (issue 21, point 4): each card class's level from its VRAM plan,
its images/hour from the measured table or the fleet file (never invented), and the dataset's ETA,
GPU-hours and cost by arithmetic the test redoes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fluxfarm.worker.tools.fleet_plan import MEASURED_S_PER_IMAGE
from tests.conftest import run_fluxfarm

FLEET = """
[[cards]]
name = "H200"
count = 4
vram_gib = 141
price_per_hour = 3.5

[[cards]]
name = "RTX 3060"
count = 12
vram_gib = 12
host_gib = 16
images_per_hour = 95
price_per_hour = 0.2

[[cards]]
name = "RTX 4090"
count = 2
vram_gib = 24
"""


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"a lighthouse at dawn, study {i}\n" for i in range(10_000)))
    return path


def _plan(*args: str) -> dict:
    done = run_fluxfarm("plan", *args, "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_mixed_fleet_gets_levels_rates_and_an_eta(prompts: Path, tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    plan = _plan(str(prompts), "--fleet", str(fleet))
    rows = {row["name"]: row for row in plan["classes"]}
    assert {name: row["level"] for name, row in rows.items()} == {"H200": "fp8", "RTX 3060": "Q6_K", "RTX 4090": "fp8"}
    # The 3060's 16 GiB host cannot pin the transformer and the encoders for a swap: they encode on its CPU.
    assert {name: row["text_encoders"] for name, row in rows.items()} == {
        "H200": "gpu",
        "RTX 3060": "cpu",
        "RTX 4090": "gpu-swap",
    }
    h200 = 3600 / MEASURED_S_PER_IMAGE[("H200", "fp8")][0]
    assert rows["H200"]["images_per_hour_per_card"] == pytest.approx(h200)
    assert rows["H200"]["rate_source"].startswith("measured")
    assert rows["RTX 3060"]["images_per_hour"] == 95 * 12
    assert rows["RTX 4090"]["images_per_hour"] is None, "no measured rate, none given: none printed"
    assert any("RTX 4090" in note for note in plan["notes"])
    rate = 4 * h200 + 12 * 95
    assert (plan["jobs"], plan["work_images"]) == (10_000, 10_000)
    assert plan["eta_hours"] == pytest.approx(10_000 / rate)
    assert plan["gpu_hours"] == pytest.approx(10_000 / rate * 16)
    assert plan["cost"] == pytest.approx(10_000 / rate * (4 * 3.5 + 12 * 0.2))
    cheaper = _plan(str(prompts), "--fleet", str(fleet), "--price", "H200=2.0")
    assert cheaper["cost"] == pytest.approx(10_000 / rate * (4 * 2.0 + 12 * 0.2))
    table = run_fluxfarm("plan", str(prompts), "--fleet", str(fleet), timeout=120)
    assert table.returncode == 0 and "ETA" in table.stdout and "RTX 3060" in table.stdout


def test_smaller_jobs_count_as_less_work_and_bad_input_is_refused(tmp_path: Path) -> None:
    jobs = tmp_path / "small.jsonl"
    jobs.write_text(
        "".join(json.dumps({"prompt": f"p{i}", "width": 512, "height": 512, "steps": 14}) + "\n" for i in range(8))
    )
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    plan = _plan(str(jobs), "--fleet", str(fleet))
    assert plan["work_images"] == pytest.approx(8 * 0.5 * 0.25), "14 steps at 512²: an eighth of the reference"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[cards]]\nname = "H200"\ncount = 0\nvram_gib = 141\n')
    refused = run_fluxfarm("plan", str(jobs), "--fleet", str(bad), timeout=60)
    assert refused.returncode == 1 and "not a fleet file" in refused.stderr and "Traceback" not in refused.stderr
    alone = run_fluxfarm("plan", str(jobs), timeout=60)
    assert alone.returncode == 1 and "needs both a prompt FILE and --fleet" in alone.stderr
