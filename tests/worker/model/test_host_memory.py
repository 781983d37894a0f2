"""Host memory in the plan: a swap's pinned copies and a CPU encode's encoders must fit the host as the peaks
fit the card, read from /proc/meminfo and the cgroup's limit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fluxfarm.shared.errors import FarmError
from fluxfarm.shared.models import FluxModel
from fluxfarm.shared.units import GIB
from fluxfarm.worker.model.host_memory import (
    OwnMemoryPeak,
    ProcessHostMemory,
    available_host_gib,
    process_host_memory,
)
from fluxfarm.worker.model.plan import HOST_PROCESS_GIB, PlanInputs, make_plan
from tests.conftest import run_fluxfarm


def test_a_plan_says_what_it_keeps_on_the_host() -> None:
    swap = make_plan(PlanInputs(vram_gib=12, gpu_name="RTX 3060"))
    assert swap.text_encoders == "gpu-swap"
    parts = swap.components_gib
    assert swap.host_gib == pytest.approx(parts["transformer"] + parts["text_encoders"], abs=1e-3)
    cpu = make_plan(PlanInputs(vram_gib=8, gpu_name="RTX 3060"))
    assert cpu.text_encoders == "cpu" and cpu.host_gib == pytest.approx(cpu.components_gib["text_encoders"])
    assert make_plan(PlanInputs(vram_gib=80, gpu_name="H100")).host_gib == 0.0  # all resident


def test_a_small_host_moves_the_encoders_or_fails_saying_why() -> None:
    roomy = make_plan(PlanInputs(vram_gib=12, gpu_name="RTX 3060", host_gib=64))
    # 18.5 GiB pinned for the swap does not fit a 16 GiB host; the CPU encode's 9.4 GiB does.
    small = make_plan(PlanInputs(vram_gib=12, gpu_name="RTX 3060", host_gib=16))
    assert (roomy.text_encoders, small.text_encoders) == ("gpu-swap", "cpu") and small.level == roomy.level
    assert small.host_gib <= 16 - HOST_PROCESS_GIB
    assert any("would keep 18.5 GiB in host memory" in reason for reason in small.reasons)
    # FLUX.2 [dev] at 24 GiB: a 32 GiB host takes the Q4_K encoder's swap, not the fp8 one's.
    dev = [
        make_plan(PlanInputs(vram_gib=24, model=FluxModel.FLUX_2_DEV, gpu_name="RTX 4090", host_gib=h))
        for h in (64, 32)
    ]
    assert [plan.text_encoder_precision for plan in dev] == ["fp8", "Q4_K"]
    with pytest.raises(FarmError, match=r"host 16\.0 GiB") as refused:
        make_plan(PlanInputs(vram_gib=24, model=FluxModel.FLUX_2_DEV, gpu_name="RTX 4090", host_gib=16))
    assert "Q4_K: fits the card (20.20 GiB) but not the host" in str(refused.value)


def test_plan_command_takes_the_host_memory() -> None:
    args = ("plan", "--model", "flux.2-dev", "--vram-gib", "24", "--gpu", "RTX 4090")
    done = run_fluxfarm(*args, "--host-gib", "32", timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["host_gib"] <= 32 - HOST_PROCESS_GIB
    refused = run_fluxfarm(*args, "--host-gib", "16", timeout=60)
    assert refused.returncode != 0 and "in host memory" in refused.stderr


def _files(folder: Path, meminfo: str, limit: str, used: str) -> tuple[Path, Path]:
    cgroup = folder / "cgroup"
    cgroup.mkdir(parents=True)
    (folder / "meminfo").write_text(meminfo)
    (cgroup / "memory.max").write_text(limit)
    (cgroup / "memory.current").write_text(used)
    return folder / "meminfo", cgroup


def test_host_memory_is_what_is_available_capped_by_the_cgroup(tmp_path: Path) -> None:
    meminfo = f"MemTotal:       {64 * 1024 * 1024} kB\nMemAvailable:   {48 * 1024 * 1024} kB\n"
    assert available_host_gib(*_files(tmp_path / "unlimited", meminfo, "max\n", "1000\n")) == pytest.approx(48)
    limited = _files(tmp_path / "limited", meminfo, f"{20 * GIB}\n", f"{4 * GIB}\n")
    assert available_host_gib(*limited) == pytest.approx(16)
    nothing = tmp_path / "none"
    assert available_host_gib(nothing / "meminfo", nothing) is None  # not Linux: the plan counts the GPU only
    here = available_host_gib()
    assert here is not None and 0 < here < 4096  # this machine's own


def test_a_process_reads_its_resident_own_and_peak_memory(tmp_path: Path) -> None:
    status = tmp_path / "status"
    mib = 1024
    lines = ["Name:\tpython", f"VmHWM:\t{6 * mib * mib} kB", f"VmRSS:\t{3 * mib * mib} kB", f"RssAnon:\t{mib * mib} kB"]
    status.write_text("\n".join(lines) + "\n")
    assert process_host_memory(status) == ProcessHostMemory(resident=3.0, anonymous=1.0, peak=6.0)
    status.write_text("Name:\tpython\nVmRSS:\t12 kB\n")
    assert process_host_memory(status) is None  # no peak, no figure
    assert process_host_memory(tmp_path / "absent") is None
    here = process_host_memory()
    assert here is not None and 0 < here.anonymous <= here.resident <= here.peak < 64  # this test process


def test_the_own_memory_peak_of_a_block_is_sampled_and_outlives_what_it_freed(tmp_path: Path) -> None:
    """The kernel's peak counts mapped files too; a load's own need is RssAnon's peak, which only sampling sees."""
    before = process_host_memory()
    assert before is not None
    with OwnMemoryPeak(interval_s=0.01) as peak:
        block = b"\x01" * (256 * 1024 * 1024)  # written, so resident: 0.25 GiB of this process's own
        time.sleep(0.2)
        del block
    after = process_host_memory()
    assert after is not None and peak.gib is not None
    assert peak.gib >= before.anonymous + 0.24 and after.anonymous < peak.gib - 0.2
    with OwnMemoryPeak(status=tmp_path / "absent") as nothing:
        pass
    assert nothing.gib is None  # not Linux: no figure


def test_an_empty_setting_means_read_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """infra/worker-host.yml passes `${FLUXFARM_HOST_MEMORY_GIB:-}`: empty where the operator set no share."""
    from fluxfarm.worker.settings import WorkerSettings

    monkeypatch.setenv("FLUXFARM_HOST_MEMORY_GIB", "")
    assert WorkerSettings().host_memory_gib is None
    monkeypatch.setenv("FLUXFARM_HOST_MEMORY_GIB", "30")
    assert WorkerSettings().host_memory_gib == 30.0
