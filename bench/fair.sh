#!/usr/bin/env bash
# A fair share of one budget, measured: examples/fair_bench.rs against the
# simulator on loopback (52 concurrent, 40 ± 10 ms), one greedy caller with
# 200 connections and ten with 2, through one proxy and three sharing a
# redis-server of its own on a free port. SECS per row (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-10}"
command -v redis-server >/dev/null || { echo "redis-server is needed (Debian package redis-server)" >&2; exit 1; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
REDIS=$!
trap 'kill $REDIS 2>/dev/null || true' EXIT
cargo build --release --quiet --example fair_bench
mkdir -p bench/results
OUT="bench/results/fair-$(date -u +%Y%m%d-%H%M).md"
BENCH_REDIS_URL="redis://127.0.0.1:$PORT" RUST_LOG=warn ./target/release/examples/fair_bench --secs "$SECS" | tee "$OUT"
echo "written to $OUT"
