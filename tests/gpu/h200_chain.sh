#!/usr/bin/env bash
# The H200 measurements still open, chained in one process session so that no call has to start the next part
# inside the machine's 30 s warm window: the farm of issues 21 and 22 (farm_measure.py: FARM_PHASES, default every
# phase, throughput first; calibrate before budget12, whose images then cite it), then issue 20's FLUX.2 runs
# (flux2_measure.sh: PHASES, default "plans dev": the quality-first plans and the bench). The farm comes first: its
# short phases give the warm-start figure even when the session's device time ends inside the long FLUX.2 bench.
# Every call, `start` included, waits up to WAIT_S, packs both run folders' rows and logs into $OUT/rows.tgz (one
# file, so the device tool's limit of 8 files never drops a log; a call cut short still returns what was there) and
# prints how far it got. Call `wait` again until it prints "chain finished". What runs 13-18 left for the H200
# (docs/benchmarks.md): FLUX.2 [dev]'s whole bench in one run (its step rows have never run on the H200; the 24 GiB
# rows ran on an H100; runs 17 and 18 timed its steps with fp8 attention and the step baselines on an H100, no
# [dev] image with fp8 attention yet; run 16 measured the warm start), ~25 minutes with the step baselines:
# FARM_PHASES= PHASES=dev (DEV_BUDGET= leaves the 24 GiB
# rows out when less device time is left),
# carrying .whl and .bnb (bitsandbytes and torchao wheels unpacked, the bench's baselines alone; torchao without
# its .so files and test/, which its fp8 does not use and the 64 MiB a call carries has no room for). On the device,
# after installing the carried wheels (and the project's own wheel rebuilt: the farm imports the installed package):
#   bash tests/gpu/h200_chain.sh start
#   bash tests/gpu/h200_chain.sh wait
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
flux2=${FLUX2_RUN_DIR:-/root/fluxfarm-flux2}
farm=${FARM_RUN_DIR:-/root/fluxfarm-farm}
wait_s=${WAIT_S:-540}
mkdir -p "$flux2" "$farm"
cd "$farm" || exit # not the repository root, whose fluxfarm/ would shadow the installed package
case "${1:-wait}" in
  chain)
    {
      # FARM_PHASES= (set, empty) skips the farm: farm_measure.py with no phase named runs them all.
      farm_phases=${FARM_PHASES-model throughput warm quality calibrate budget12 rerender}
      # The carried wheels install with --no-compile: bytecode now, once, so that no worker's time to its first
      # image pays for compiling diffusers, Celery and botocore (a deployed image has it from pip install).
      # The machine's own site-packages (torch, transformers, triton) too: with PYTHONDONTWRITEBYTECODE set there,
      # a package installed without bytecode is compiled again by every process that imports it.
      # Only for the farm, whose warm start it is for: the bench's one process pays its imports once.
      if [ -n "$farm_phases" ]; then
        echo "== bytecode $(date +%T) (PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE-unset})"
        site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))')
        # shellcheck disable=SC2086
        pythonpath=${PYTHONPATH-}
        for dir in ${pythonpath//:/ } $site; do python3 -m compileall -q -j 0 "$dir" >/dev/null 2>&1; done
        # What a worker's imports cost on this machine (its first log line says the total): one line a module.
        # Without the carried baselines' packages (.bnb: bitsandbytes for the bench's 4-bit recipe, torchao for its
        # torchao-fp8-compile steps): diffusers imports them when they are there, ~1.7 s of every worker's start
        # that a worker image (neither the [baselines] nor the [torchao] extra) does not pay.
        farm_path=$(echo "$pythonpath" | tr ':' '\n' | grep -v '/\.bnb$' | paste -sd:)
        (cd / && PYTHONPATH=$farm_path python3 -X importtime -c "import fluxfarm.cli, fluxfarm.worker.main" \
          2>"$farm/importtime.log" >/dev/null)
        echo "== bytecode done $(date +%T)"
        echo "== farm $(date +%T)"
        # shellcheck disable=SC2086
        PYTHONPATH=$farm_path RUN_DIR=$farm python3 -u "$here/farm_measure.py" $farm_phases >"$farm/farm.log" 2>&1
      fi
      echo "== flux2 $(date +%T)"
      if [ -n "${PHASES-plans dev}" ]; then
        PHASES=${PHASES-plans dev} KLEIN_BUDGETS=${KLEIN_BUDGETS-} DEV_BUDGETS=${DEV_BUDGETS-} \
          RUN_DIR=$flux2 bash "$here/flux2_measure.sh" sequence
      fi
      echo "chain finished $(date +%T)"
    } >"$farm/chain.log" 2>&1
    exit
    ;;
  start)
    # A chain that ran before on this machine left "chain finished" in the log, which would end the wait below at
    # once: the new chain's log starts empty.
    : >"$farm/chain.log"
    setsid nohup bash "$here/h200_chain.sh" chain </dev/null >/dev/null 2>&1 &
    echo "chain started"
    ;;
  wait) ;;
  *)
    echo "usage: $0 start|wait" >&2
    exit 2
    ;;
esac
pack() {
  (cd / && find "${flux2#/}" "${farm#/}" -maxdepth 1 -type f \( -name '*.jsonl' -o -name '*.log' \) -print0 |
    tar czf "${OUT:-.}/rows.tgz" --null -T - 2>/dev/null)
}
end=$((SECONDS + wait_s))
while [ $SECONDS -lt $end ] && ! grep -q "chain finished" "$farm/chain.log" 2>/dev/null; do
  pack
  sleep 20
done
pack
cat "$farm/chain.log" 2>/dev/null
for log in "$flux2"/plans.log "$flux2"/dev.log; do
  [ -f "$log" ] && { echo "--- $log"; tail -n 8 "$log"; }
done
grep -E '^(==|\{)' "$farm/farm.log" 2>/dev/null | cut -c1-1200 | tail -n 20
