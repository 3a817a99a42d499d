#!/usr/bin/env bash
# The access line's own cost in instructions, counted by valgrind's
# callgrind in the proxy process alone: 1,000 sequential GETs of a small
# `leads` page through the built-in simulator after a warm-up, with the JSON
# line, the text line and no line (`RUST_LOG=warn`), same build. Callgrind
# counts instructions, not seconds, so the figures do not depend on what
# else the machine does.
#
#   bash bench/access-line.sh            # this build
#   bash bench/access-line.sh OLD_BIN    # and an older build, side by side
#   KEEP=/tmp/profiles bash bench/access-line.sh   # keep the callgrind
#                                        # dumps for callgrind_annotate
#
# Every process it starts is stopped by its PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v valgrind >/dev/null || { echo "valgrind is needed (Debian package valgrind)" >&2; exit 2; }
(cd "$ROOT" && cargo build --release --quiet)
BIN="$ROOT/target/release/dataverse-proxy"
REQUESTS=${REQUESTS:-1000}
WORK=$(mktemp -d /tmp/dvp-line.XXXXXX)
ENTRA=18121 DV=18122 PORT=18123 ADMIN=18124
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
wait_port() {
  for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "port $1 never opened" >&2; return 1
}

export DATAVERSE_PROXY_LISTEN=127.0.0.1:$PORT DATAVERSE_PROXY_ADMIN_LISTEN=127.0.0.1:$ADMIN
export TOKIO_WORKER_THREADS=1

# get N: N sequential GETs on one kept-alive connection.
get() {
  python3 - "$PORT" "$1" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for _ in range(n):
    c.request("GET", "/api/data/v9.2/leads?$top=2")
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
}

# measure BIN FORMAT RUST_LOG -> instructions per request
measure() {
  local bin=$1 format=$2 filter=$3
  # A fresh simulator each time: its service protection limits count
  # requests per five minutes.
  "$BIN" sim --entra-listen 127.0.0.1:$ENTRA --dataverse-listen 127.0.0.1:$DV >"$WORK/sim.env" 2>"$WORK/sim.log" &
  local sim=$!
  PIDS+=($sim)
  wait_port $DV
  # The simulator prints the settings a proxy needs as `export` lines.
  source <(grep '^export ' "$WORK/sim.env")
  (cd "$WORK" && DATAVERSE_PROXY_LOG_FORMAT=$format RUST_LOG=$filter \
    exec valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out" "$bin" serve) \
    >/dev/null 2>"$WORK/proxy.log" &
  local pid=$!
  PIDS+=($pid)
  wait_port $PORT
  get 200
  callgrind_control -z "$pid" >/dev/null 2>&1
  get "$REQUESTS"
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  local dump total
  dump=$(ls -t "$WORK"/cg.out* | head -1)
  total=$(awk '/^summary:/ {print $2}' "$dump")
  kill "$pid" "$sim"; wait "$pid" "$sim" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then cp "$dump" "$KEEP/callgrind.$(basename "$bin").$format.$filter"; fi
  rm -f "$WORK"/cg.out*
  echo $(( total / REQUESTS ))
}

row() { # NAME BIN
  local off json text
  off=$(measure "$2" json warn)
  json=$(measure "$2" json info)
  text=$(measure "$2" text info)
  echo "| $1 | $off | $json | $text | $((json - off)) | $((text - off)) |"
}

{
  echo "| build | no line (warn) | JSON line | text line | JSON line's cost | text line's cost |"
  echo "|---|---|---|---|---|---|"
  row "this build" "$BIN"
  if [ -n "${1:-}" ]; then row "$1" "$1"; fi
  echo
  echo "Instructions per request in the proxy process ($REQUESTS sequential GETs of leads?\$top=2"
  echo "through the simulator, one worker thread, after 200 to warm up), $(date -u +%Y-%m-%dT%H:%MZ)."
} | tee "$WORK/results.md"
mkdir -p "$ROOT/bench/results"
cp "$WORK/results.md" "$ROOT/bench/results/access-line-$(date -u +%Y%m%dT%H%MZ).md"
