#!/usr/bin/env bash
# The H200 runs of issue 20 (acceptance 2 and 4), one phase a device call; each phase ends inside the
# 10-minute command limit or, for the benches, runs on through tests/gpu/long_bench.sh (call `wait` again).
# On the device, after installing the carried wheels (../shared/device/wheels.sh, carry [".whl"]):
#   bash tests/gpu/flux2_measure.sh plans         # probe-vram: FLUX.2 [dev] at 24/48/80/141 GiB, klein-4B at 8/12
#   bash tests/gpu/flux2_measure.sh klein         # bench klein-4B: diffusers bf16 vs the engine, 4 steps
#   bash tests/gpu/flux2_measure.sh dev           # bench FLUX.2 [dev]: diffusers bf16 vs fp8, and a 24 GiB budget
#   bash tests/gpu/flux2_measure.sh wait          # a bench still running: its rows so far, and whether it ended
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-.}
case "${1:-}" in
  plans)
    python3 -u -m fluxfarm probe-vram --model flux.2-klein-4b --plans 8,12 --sizes 1024x1024 --out "$out/plans-klein4b.jsonl"
    python3 -u -m fluxfarm probe-vram --model flux.2-dev --plans 24,48,80,141 --sizes 1024x1024 --out "$out/plans-flux2-dev.jsonl"
    ;;
  klein)
    BENCH_ARGS="--model flux.2-klein-4b --levels bf16,fp8,Q8_0 --sizes 1024x1024,512x512 --batches 1,2,4 \
--vram-budget 8,12 --image-levels bf16,fp8 --image-batches 1,2,4 --steps 4 --images 8" bash "$here/long_bench.sh" start
    ;;
  dev)
    BENCH_ARGS="--model flux.2-dev --levels bf16,fp8 --sizes 1024x1024 --batches 1 --vram-budget 24 \
--image-levels fp8 --image-batches 1 --steps 28 --images 2" bash "$here/long_bench.sh" start
    ;;
  wait)
    bash "$here/long_bench.sh" wait
    ;;
  *)
    echo "usage: $0 plans|klein|dev|wait" >&2
    exit 2
    ;;
esac
