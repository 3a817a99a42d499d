#!/usr/bin/env bash
# The shared budget, measured: examples/governor_bench.rs against the
# simulator on loopback, five scenarios side by side in one run, with a
# redis-server of its own on a free port. SECS per scenario (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-10}"
command -v redis-server >/dev/null || { echo "redis-server is needed (Debian package redis-server)" >&2; exit 1; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
REDIS=$!
trap 'kill $REDIS 2>/dev/null || true' EXIT
cargo build --release --quiet --example governor_bench
mkdir -p bench/results
OUT="bench/results/governor-$(date -u +%Y%m%d-%H%M).md"
BENCH_REDIS_URL="redis://127.0.0.1:$PORT" ./target/release/examples/governor_bench --secs "$SECS" | tee "$OUT"
echo "written to $OUT"
