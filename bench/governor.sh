#!/usr/bin/env bash
# The shared budget, measured: examples/governor_bench.rs against the
# simulator on loopback, six scenarios side by side in one run, with a
# redis-server of its own on a free port and a three-master Redis Cluster
# (bench/redis-cluster.sh). SECS per scenario (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-10}"
source bench/redis.sh
source bench/redis-cluster.sh
cargo build --release --quiet --example governor_bench
mkdir -p bench/results
OUT="bench/results/governor-$(date -u +%Y%m%d-%H%M).md"
./target/release/examples/governor_bench --secs "$SECS" | tee "$OUT"
echo "written to $OUT"
