#!/usr/bin/env bash
# The H200 runs of issue 20 (acceptance 2 and 4) as one sequence that outlives the device tool's 10-minute
# command limit: `start` runs it in its own process session (setsid) and every call, `start` included,
# waits up to WAIT_S for it, copies its rows and logs to $OUT and prints how far it got. Call `wait` again
# within the machine's warm window until it prints "sequence finished". In order, most needed first:
#   1. probe-vram plans: klein-4B at 8/12 GiB, FLUX.2 [dev] at 24/48/80/141 GiB and 16 (its Q4_K encoder swapped in),
#      and [dev]'s quality-first plans at 80/141 GiB
#   2. bench klein-4B: diffusers bf16 beside the engine at bf16 and fp8, 4 steps
#   3. bench FLUX.2 [dev]: diffusers bf16 beside the engine's fp8 and the 24 GiB plan, 28 steps; its step rows with
#      the step baselines (compiled diffusers bf16, torchao fp8 compiled)
#   bars (not in the default sequence): the step baselines beside the worker's steps for klein 4B, 9B and FLUX.1
# On the device, after installing the carried wheels (../shared/device/wheels.sh, carry [".whl"]):
#   bash tests/gpu/flux2_measure.sh start
#   bash tests/gpu/flux2_measure.sh wait
# One phase alone, in the foreground: bash tests/gpu/flux2_measure.sh plans|dev|klein|bars. PHASES picks the
# sequence's phases; KLEIN_BUDGETS, DEV_BUDGETS and DEV_QUALITY_BUDGETS the plans (each may be empty; an 80 GB
# card: PHASES="plans klein" DEV_BUDGETS=24,48,80 DEV_QUALITY_BUDGETS=). Run 13 left for the next H200 run the
# bench's 24 GiB row and the 4-bit recipe beside it (the host ran out of memory there in runs 11 and 13):
#   PHASES=dev bash tests/gpu/flux2_measure.sh start
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
run=${RUN_DIR:-/root/fluxfarm-flux2}
wait_s=${WAIT_S:-540}
mkdir -p "$run"
cd "$run" || exit  # not the repository root, whose fluxfarm/ would shadow the installed package
phase() {
  case "$1" in
    plans)
      klein=${KLEIN_BUDGETS-8,12} dev=${DEV_BUDGETS-24,48,80,141,16} quality=${DEV_QUALITY_BUDGETS-80,141}
      if [ -n "$klein" ]; then
        python3 -u -m fluxfarm probe-vram --model flux.2-klein-4b --plans "$klein" --sizes 1024x1024 \
          --out "$run/plans-klein4b.jsonl"
      fi
      if [ -n "$dev" ]; then
        python3 -u -m fluxfarm probe-vram --model flux.2-dev --plans "$dev" --sizes 1024x1024 \
          --out "$run/plans-flux2-dev.jsonl"
      fi
      if [ -n "$quality" ]; then  # the quality-first plans (bf16 transformer), as FLUXFARM_OPTIMIZE=quality makes them
        python3 -u -m fluxfarm probe-vram --model flux.2-dev --plans "$quality" --optimize quality \
          --sizes 1024x1024 --out "$run/plans-flux2-dev-quality.jsonl"
      fi
      ;;
    dev)
      # DEV_STEP_LEVELS and DEV_IMAGE_LEVELS may be empty, DEV_BASELINES name some, for a partial run: run 14b
      # measured only the 24 GiB rows on an H100 (DEV_STEP_LEVELS= DEV_IMAGE_LEVELS= DEV_BASELINES=diffusers-nf4-offload).
      # Issue 20 wants the whole bench in one H200 run: the defaults. DEV_BUDGET= leaves the 24 GiB plan's row out.
      python3 -u -m fluxfarm bench --out "$run/bench-flux2-dev.jsonl" --model flux.2-dev \
        --levels "${DEV_STEP_LEVELS-fp8,bf16}" --sizes 1024x1024 --batches 1 --vram-budget "${DEV_BUDGET-24}" \
        --image-levels "${DEV_IMAGE_LEVELS-fp8}" --image-batches 1 --steps 28 --images 2 \
        --baselines "${DEV_BASELINES-all}"
      ;;
    bars)
      # The bar a user reaches without fluxfarm, step for step in the same process as the worker's steps:
      # diffusers' bf16 transformer compiled, and torchao's fp8 compiled (the step baselines; torchao carried in
      # .bnb), beside the worker's bf16 and fp8 steps, for each family at 1024², batch 1 (~3-5 minutes a model).
      for model in ${BAR_MODELS-flux.2-klein-4b flux.2-klein-9b flux.1-dev}; do
        python3 -u -m fluxfarm bench --out "$run/bars-$model.jsonl" --model "$model" --levels fp8,bf16 \
          --sizes 1024x1024 --batches 1 --vram-budget= --image-levels= \
          --baselines diffusers-bf16-compile,torchao-fp8-compile
      done
      ;;
    klein)
      # KLEIN_BASELINES=diffusers-bf16 leaves out the step baselines that the bars phase already ran.
      python3 -u -m fluxfarm bench --out "$run/bench-klein4b.jsonl" --model flux.2-klein-4b --levels fp8,bf16 \
        --sizes 1024x1024 --batches 1,4 --vram-budget 8 --image-levels bf16,fp8 --image-batches 1,4 --steps 4 \
        --images 8 --baselines "${KLEIN_BASELINES-all}"
      ;;
  esac
}
case "${1:-wait}" in
  plans | dev | klein | bars)
    phase "$1" 2>&1 | tee -a "$run/$1.log"
    exit
    ;;
  sequence)
    for name in ${PHASES:-plans klein dev}; do
      echo "== $name $(date +%T)"
      phase "$name" >"$run/$name.log" 2>&1
      echo "== $name ended $? $(date +%T)"
    done
    echo "sequence finished"
    exit
    ;;
  start)
    setsid nohup bash "$here/flux2_measure.sh" sequence >"$run/sequence.log" 2>&1 </dev/null &
    echo "sequence started"
    ;;
  wait) ;;
  *)
    echo "usage: $0 start|wait|plans|dev|klein|bars" >&2
    exit 2
    ;;
esac
end=$((SECONDS + wait_s))
# Rows are copied as they come: a call cut short (the session's device time spent) still returns them.
while [ $SECONDS -lt $end ] && ! grep -q "sequence finished" "$run/sequence.log" 2>/dev/null; do
  cp "$run"/*.jsonl "$run"/*.log "${OUT:-.}/" 2>/dev/null
  sleep 5
done
cp "$run"/*.jsonl "$run"/*.log "${OUT:-.}/" 2>/dev/null
cat "$run/sequence.log"
for log in "$run"/plans.log "$run"/dev.log "$run"/klein.log "$run"/bars.log; do
  [ -f "$log" ] && { echo "--- $log"; tail -n 12 "$log"; }
done
