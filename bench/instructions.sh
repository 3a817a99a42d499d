#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind, for
# dataverse-proxy, the hyper floor (examples/bare_proxy.rs) and nginx as a
# reverse proxy, side by side in one run, at 16 and at 256 connections.
# Callgrind counts instructions, not seconds: the same binary and load give
# the same count whatever else the machine does, so the ratios are exact
# where CPU time on two noisy cores is not.
#
#   BENCH_DEBUG=1 DURATION=1s bash bench/run.sh   # leaves the upstream nginx on 18081
#   bash bench/instructions.sh                    # this build, the floor, nginx
#   bash bench/instructions.sh /path/to/older/dataverse-proxy   # and an older build
#
# For each target: start it under callgrind (nginx with `master_process off;
# daemon off;`, so its one process is the one measured), warm up with wrk
# (2 s), zero the counters, run 5 s, dump; prints the measured window's
# instructions divided by its requests. Every process it starts is stopped
# by its PID; the upstream is left to the caller.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v valgrind >/dev/null || { echo "valgrind is needed (Debian package valgrind)" >&2; exit 2; }
(exec 3<>/dev/tcp/127.0.0.1/18081) 2>/dev/null || {
  echo "no upstream on 127.0.0.1:18081: run BENCH_DEBUG=1 DURATION=1s bash bench/run.sh first" >&2; exit 2; }
(cd "$ROOT" && cargo build --release --quiet && cargo build --release --quiet --example bare_proxy)
PORT=18086 ADMIN=18096
WORK=$(mktemp -d /tmp/dvp-instr.XXXXXX)
chmod 755 "$WORK"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
export DATAVERSE_URL=http://127.0.0.1:18081 AZURE_TENANT_ID=tenant AZURE_CLIENT_ID=bench AZURE_CLIENT_SECRET=bench
export DATAVERSE_PROXY_TOKEN_URL=http://127.0.0.1:18081/tenant/oauth2/v2.0/token
export DATAVERSE_PROXY_LISTEN=127.0.0.1:$PORT DATAVERSE_PROXY_ADMIN_LISTEN=127.0.0.1:$ADMIN
export RUST_LOG=warn TOKIO_WORKER_THREADS=1
URL="http://127.0.0.1:$PORT/api/data/v9.2/accounts"
mkdir -p "$WORK/tmp" "$WORK/logs"
# nginx's one process is the one measured: no master, no daemon.
source "$ROOT/bench/nginx.sh"
nginx_proxy_conf "$WORK/nginx.conf" "$WORK" "$PORT" 18081 "master_process off;"

# measure NAME CONNS COMMAND... -> one table row
measure() {
  local name=$1 conns=$2; shift 2
  (cd "$WORK" && exec valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" "$@") \
    >"$WORK/valgrind.log" 2>&1 &
  PID=$!
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  wrk -t1 -c"$conns" -d2s "$URL" >/dev/null
  callgrind_control -z "$PID" >/dev/null 2>&1
  local out reqs non2xx
  out=$(wrk -t1 -c"$conns" -d5s "$URL")
  reqs=$(awk '/requests in/ {print $1}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  callgrind_control -d "$PID" >/dev/null 2>&1
  sleep 1
  local dump total
  dump=$(ls -t "$WORK"/cg.out* | head -1)
  total=$(awk '/^summary:/ {print $2}' "$dump")
  echo "| $name | $conns | $reqs | ${non2xx:-0} | $(( total / reqs )) |"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  rm -f "$WORK"/cg.out*
}

echo "| target | conns | requests measured | non-2xx | instructions per request |"
echo "|---|---|---|---|---|"
for conns in 16 256; do
  measure dataverse-proxy "$conns" "$ROOT/target/release/dataverse-proxy" serve
  for bin in "$@"; do measure "$(realpath "$bin")" "$conns" "$(realpath "$bin")" serve; done
  measure hyper-floor "$conns" "$ROOT/target/release/examples/bare_proxy" 127.0.0.1:$PORT http://127.0.0.1:18081 "Bearer bench-token"
  measure nginx "$conns" "$(command -v nginx)" -p "$WORK" -c "$WORK/nginx.conf"
done
