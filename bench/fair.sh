#!/usr/bin/env bash
# A fair share of one budget, measured: examples/fair_bench.rs against the
# simulator on loopback (52 concurrent, 40 ± 10 ms), one greedy caller with
# 200 connections and ten with 2, through one proxy and three sharing a
# redis-server of its own on a free port. SECS per row (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-10}"
source bench/redis.sh
cargo build --release --quiet --example fair_bench
mkdir -p bench/results
OUT="bench/results/fair-$(date -u +%Y%m%d-%H%M).md"
RUST_LOG=warn ./target/release/examples/fair_bench --secs "$SECS" | tee "$OUT"
echo "written to $OUT"
