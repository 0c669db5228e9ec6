#!/usr/bin/env bash
# Runs the Criterion micro-benchmarks (mesh-proto and meshd) and prints a markdown table
# of their medians, with the date and the machine's load; also saved under
# bench-results/micro-<UTC time>.md. Arguments go to Criterion as a filter, e.g.
#   scripts/bench/micro.sh policy_evaluate
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
mkdir -p bench-results
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOG="bench-results/micro-$STAMP.log"
OUT="bench-results/micro-$STAMP.md"

# Build first, so that the load noted below is the load while measuring.
timeout 1800 cargo bench -p mesh-proto -p meshd --no-run -q
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
timeout 900 cargo bench -q -p mesh-proto -p meshd -- "$@" >"$LOG" 2>&1 ||
    { tail -20 "$LOG" >&2; echo "micro.sh: cargo bench failed (log: $LOG)" >&2; exit 1; }
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

{
    echo "# meshd micro-benchmarks, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Host: $(nproc) CPUs ($(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)), $(rustc --version)."
    echo "Load average (1/5/15 min) before: $LOAD_BEFORE; after: $LOAD_AFTER."
    echo
    echo "| benchmark | median time | throughput |"
    echo "|---|---|---|"
    # Criterion prints "name  time: [lo mid hi]" (the name sometimes on the line
    # before) and, for some, "thrpt: [lo mid hi]" on the next line; then, if an
    # earlier run exists, the change in percent (skipped).
    awk '
        function flush() { if (name != "") printf "| %s | %s | %s |\n", name, t, (thr == "" ? "-" : thr); name = ""; t = ""; thr = "" }
        /^[A-Za-z0-9_]+\/[^ ]+/ && !/^Benchmarking/ { cand = $1 }
        /time:/ && !/%/ { flush(); name = cand; sub(/.*time: *\[/, ""); split($0, v, " "); t = v[3] " " v[4] }
        /thrpt:/ && !/%/ { sub(/.*thrpt: *\[/, ""); split($0, v, " "); thr = v[3] " " v[4] }
        END { flush() }' "$LOG"
} >"$OUT"
cat "$OUT"
echo "micro.sh: saved $OUT" >&2
