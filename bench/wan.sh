#!/usr/bin/env bash
# The WAN hop, measured: examples/wan_bench.rs against the simulator behind
# an emulated link (user-space relay: this kernel has no netem), direct and
# through the proxy, side by side in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --example wan_bench
mkdir -p bench/results
OUT="bench/results/wan-$(date -u +%Y%m%d-%H%M).md"
./target/release/examples/wan_bench | tee "$OUT"
echo "written to $OUT"
