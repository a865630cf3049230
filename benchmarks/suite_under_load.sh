#!/usr/bin/env bash
# The whole CI suite N times in a row on one fresh clone, both cores kept busy by `yes` hogs:
# evidence that the suite does not fail by chance on a loaded machine (docs/reliability.md).
#   bash benchmarks/suite_under_load.sh [RUNS] [HOGS]      (as root, like CI; ~11 min a run here)
set -uo pipefail
runs="${1:-5}"; hogs="${2:-2}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/qlab-load-XXXXXX)"
git clone -q "$repo" "$work/qlab" || exit 2
cd "$work/qlab" || exit 2
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; }
trap cleanup EXIT
for _ in $(seq "$hogs"); do yes > /dev/null & pids+=("$!"); done
echo "commit $(git rev-parse --short HEAD), $hogs CPU hogs, logs in $work"
failed=0
for i in $(seq "$runs"); do
  start=$(date +%s)
  CI=true bash .ci/run > "$work/run-$i.log" 2>&1 < /dev/null
  rc=$?
  [ "$rc" = 0 ] || failed=$((failed + 1))
  echo "run $i: rc=$rc, $(( $(date +%s) - start )) s, $(grep -E '[0-9]+ (passed|failed)' "$work/run-$i.log" | tail -1)"
done
echo "$((runs - failed)) of $runs runs green"
[ "$failed" = 0 ]
