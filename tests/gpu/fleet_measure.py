"""Issue 23 on a machine of two GPUs: a mixed fleet, one `fluxfarm worker` per card, through a real farm
(farm_measure.py's private redis-server, local storage and full-size random FLUX.1-dev, in the same folder).

The fleet: `fast` holds all of GPU 0 under the throughput policy (fp8 on an fp8 card), `small` holds GPU 1
capped at 12 GiB (the plan's GGUF level). Phases, each appending JSON lines to $RUN_DIR/fleet.jsonl:
  model   farm_measure.py's: the random pipeline and its GGUF files (skipped when there)
  alone   each worker alone on its card: a first job, then IMAGES auto jobs: its level and steady images/hour
  fleet   both at once: for each worker an `exact:` job of its level, `min:` jobs of the fast one's level (only
          it serves them) and, once both have rendered, 2 x IMAGES auto jobs: every constrained job's level
          against its constraint (from the metadata), which workers took the auto jobs, the fleet's
          images/hour while both were busy against the sum of the two alone, and what the fleet planner
          predicts for these two cards (`fluxfarm plan --fleet` of a fleet file and of the live workers)

    python3 tests/gpu/fleet_measure.py [PHASE ...]     # on a machine of two GPUs; no phase: all of them
    TINY=1 python3 tests/gpu/fleet_measure.py           # two CPU workers of the tiny model (bf16 and Q6_K):
                                                        # a check of this script, no figure
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import farm_measure
from farm_measure import IMAGES, READY_S, RUN, SIDE, STEPS, TINY, Farm, fluxfarm, job, phase_model

from fluxfarm.producer.local_stack import WorkerProcess
from fluxfarm.shared.routing import parse_constraint

WORKERS: dict[str, tuple[list[str], dict[str, str]]] = {
    "fast": (["--level", "bf16"] if TINY else ["--optimize", "throughput"], {"CUDA_VISIBLE_DEVICES": "0"}),
    "small": (["--level", "Q6_K"] if TINY else ["--vram-budget", "12"], {"CUDA_VISIBLE_DEVICES": "1"}),
}
"""Each worker's arguments and card. On the CPU the tiny model has no budget to plan against: levels are forced."""
alone: dict[str, dict[str, Any]] = {}
"""Each worker's alone row, for the fleet phase: its level and images/hour."""


def emit(row: dict[str, Any]) -> None:
    farm_measure.emit(row, "fleet.jsonl")


def start(farm: Farm, name: str) -> WorkerProcess:
    args, env = WORKERS[name]
    return farm.worker(name, args, env)


def images_per_hour(times: list[float]) -> float:
    """Steady rate from finishing times: the images after the first, over the span since the first."""
    return 3600 * (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def phase_alone(farm: Farm) -> None:
    for name in WORKERS:
        worker = start(farm, name)
        try:
            first = farm.client.submit(job(1000, f"alone-{name}")).result(timeout=READY_S)
            done = farm.finished([job(i, f"alone-{name}") for i in range(IMAGES)])
        finally:
            worker.stop()
        row = {"level": first.quant.value, "images_per_hour": images_per_hour([at for at, _, _ in done]),
               "gpu": first.worker.gpu_name, "vram_gib": first.worker.vram_gib}  # fmt: skip
        alone[name] = row
        emit({"phase": "alone", "worker": name, **row, "levels": sorted({r.quant.value for _, _, r in done})})


def fleet_plan(farm: Farm, fleet: str) -> dict[str, Any]:
    """`fluxfarm plan` of the auto jobs' prompt file on `fleet` (a fleet file or `live`), as its JSON."""
    prompts = RUN / "fleet-prompts.jsonl"
    prompts.write_text("".join(json.dumps(job(i, "fleet")) + "\n" for i in range(2 * IMAGES)))
    done = fluxfarm("plan", str(prompts), "--fleet", fleet, "--json", env=farm.command_env())
    return json.loads(done.stdout) if done.returncode == 0 else {"rc": done.returncode, "err": done.stderr[-2000:]}


def fleet_file() -> Path:
    """The two cards as a fleet file: a class each (the card's name, its memory or the cap), no rate given,
    so the planner takes its measured table's."""
    cards = []
    for name, row in alone.items():
        vram = 12 if name == "small" else row["vram_gib"] or 24  # a CPU worker (TINY) has no memory figure
        gpu = row["gpu"] or "cpu"
        cards.append(f"[[cards]]\nname = {json.dumps(f'{gpu} {name}')}\ngpu = {json.dumps(gpu)}\ncount = 1\n")
        cards[-1] += f"vram_gib = {vram}\n"
    path = RUN / "fleet.toml"
    path.write_text("\n".join(cards))
    return path


def phase_fleet(farm: Farm) -> None:
    if set(alone) != set(WORKERS):
        raise RuntimeError("the fleet phase needs the alone phase's rows from this run")
    fast, small = alone["fast"]["level"], alone["small"]["level"]
    workers = [start(farm, name) for name in WORKERS]
    try:
        constrained = [job(4000, "fleet", f"exact:{fast}"), job(4001, "fleet", f"exact:{small}")]
        constrained += [job(4002 + i, "fleet", f"min:{fast}") for i in range(4)]
        routed = farm.finished(constrained)
        auto = farm.finished([job(i, "fleet") for i in range(2 * IMAGES)])
        planned = {"file": fleet_plan(farm, str(fleet_file())), "live": fleet_plan(farm, "live")}
    finally:
        for worker in workers:
            worker.stop()
    by_worker: dict[str, list[float]] = {}
    for at, _, result in auto:
        by_worker.setdefault(result.worker.node, []).append(at)
    both_busy_until = min(times[-1] for times in by_worker.values())
    together = [at for at, _, _ in auto if at <= both_busy_until]
    fleet_rate = images_per_hour(together)
    alone_sum = sum(row["images_per_hour"] for row in alone.values())
    wrong = [
        {"constraint": constraint, "level": result.quant.value, "worker": result.worker.node}
        for _, constraint, result in routed
        if not parse_constraint(constraint).allows(result.quant)
    ]
    emit({"phase": "fleet", "levels": {"fast": fast, "small": small}, "constrained_jobs": len(routed),
          "constrained_wrong": wrong,
          "constrained_by": sorted({f"{c} -> {r.worker.node} {r.quant.value}" for _, c, r in routed}),
          "auto_by_worker": {node: len(times) for node, times in by_worker.items()},
          "fleet_images_per_hour": fleet_rate, "alone_sum_images_per_hour": alone_sum,
          "fleet_over_sum": fleet_rate / alone_sum, "images_while_both_busy": len(together),
          "size": SIDE, "steps": STEPS, "planned": planned})  # fmt: skip


PHASES = {"model": phase_model, "alone": phase_alone, "fleet": phase_fleet}


if __name__ == "__main__":
    farm_measure.main(sys.argv[1:], PHASES, emit)
