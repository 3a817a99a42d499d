#!/usr/bin/env bash
# Instructions per request of one or more dataverse-proxy builds, counted by
# valgrind's callgrind: repeatable whatever else the machine does, so two
# builds compare exactly where wall-clock CPU on two noisy cores does not.
#
#   BENCH_DEBUG=1 DURATION=1s bash bench/run.sh     # leaves the upstream nginx on 18081
#   bash bench/instructions.sh target/release/dataverse-proxy /path/to/older/dataverse-proxy
#
# For each binary: start it under callgrind on 127.0.0.1:18086, warm up with
# wrk (16 connections, 2 s), zero the counters, run 5 s more, dump; prints the
# instructions of the measured window divided by its requests. Every process
# it starts is stopped by its PID; the upstream is left to the caller.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 BIN [BIN...]" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is needed (Debian package valgrind)" >&2; exit 2; }
(exec 3<>/dev/tcp/127.0.0.1/18081) 2>/dev/null || {
  echo "no upstream on 127.0.0.1:18081: run BENCH_DEBUG=1 DURATION=1s bash bench/run.sh first" >&2; exit 2; }
PORT=18086 ADMIN=18096
WORK=$(mktemp -d /tmp/dvp-instr.XXXXXX)
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
export DATAVERSE_URL=http://127.0.0.1:18081 AZURE_TENANT_ID=tenant AZURE_CLIENT_ID=bench AZURE_CLIENT_SECRET=bench
export DATAVERSE_PROXY_TOKEN_URL=http://127.0.0.1:18081/tenant/oauth2/v2.0/token
export DATAVERSE_PROXY_LISTEN=127.0.0.1:$PORT DATAVERSE_PROXY_ADMIN_LISTEN=127.0.0.1:$ADMIN
export RUST_LOG=warn TOKIO_WORKER_THREADS=1
URL="http://127.0.0.1:$PORT/api/data/v9.2/accounts"
echo "| build | requests measured | instructions | instructions per request |"
echo "|---|---|---|---|"
for bin in "$@"; do
  bin=$(realpath "$bin")
  (cd "$WORK" && exec valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" "$bin" serve) \
    >"$WORK/valgrind.log" 2>&1 &
  PID=$!
  for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
  wrk -t1 -c16 -d2s "$URL" >/dev/null
  callgrind_control -z "$PID" >/dev/null
  reqs=$(wrk -t1 -c16 -d5s "$URL" | awk '/requests in/ {print $1}')
  callgrind_control -d "$PID" >/dev/null
  sleep 1
  dump=$(ls -t "$WORK"/cg.out.* | head -1)
  total=$(awk '/^summary:/ {print $2}' "$dump")
  echo "| $bin | $reqs | $total | $(( total / reqs )) |"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  rm -f "$WORK"/cg.out*
done
