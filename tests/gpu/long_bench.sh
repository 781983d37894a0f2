#!/usr/bin/env bash
# One `fluxfarm bench` run longer than the device tool's 10-minute command limit: the first call
# starts it in its own process session (setsid, so it outlives the call) and every call, the first
# included, waits up to WAIT_S for it and copies its rows and log to $OUT. Call again within the
# machine's 30 s warm window until it prints "bench finished". On the device, after installing the
# carried wheels:
#   bash tests/gpu/long_bench.sh start    # then, call after call:
#   bash tests/gpu/long_bench.sh wait
# The arguments of the acceptance run of issue 4 (docs/benchmarks.md) are below; BENCH_ARGS overrides them.
set -uo pipefail
run=${RUN_DIR:-/root/fluxfarm-bench}
wait_s=${WAIT_S:-540}
args=${BENCH_ARGS:---levels bf16,Q8_0,fp8,Q4_K --sizes 1024x1024,512x512 --batches 1 --vram-budget 12 \
--image-levels fp8 --image-batches 1,2 --images 4}
if [ "${1:-wait}" = start ]; then
  mkdir -p "$run"
  # shellcheck disable=SC2086
  setsid nohup python3 -u -m fluxfarm bench --out "$run/bench.jsonl" $args >"$run/bench.log" 2>&1 </dev/null &
  echo "bench started: $args"
fi
end=$((SECONDS + wait_s))
while [ $SECONDS -lt $end ] && pgrep -f "fluxfarm bench" >/dev/null; do sleep 10; done
cp "$run/bench.jsonl" "$run/bench.log" "${OUT:-.}/" 2>/dev/null
if pgrep -f "fluxfarm bench" >/dev/null; then echo "bench still running"; else echo "bench finished"; fi
tail -n 30 "$run/bench.log"
