#!/usr/bin/env bash
# Lanes, measured: examples/lanes_bench.rs against the simulator on
# loopback (52 concurrent per application user, 40 ± 10 ms), 400 callers
# over three replicas sharing a redis-server of its own on a free port:
# one lane against three. SECS per row (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-10}"
source bench/redis.sh
cargo build --release --quiet --example lanes_bench
mkdir -p bench/results
OUT="bench/results/lanes-$(date -u +%Y%m%d-%H%M).md"
# The issue's stand-in (40 ms), then a slower one (200 ms) where the load
# does not need every core of a small machine.
for MS in 40 200; do
  BENCH_LATENCY_MS=$MS RUST_LOG=warn \
    ./target/release/examples/lanes_bench --secs "$SECS" | tee -a "$OUT"
  echo | tee -a "$OUT"
done
echo "written to $OUT"
