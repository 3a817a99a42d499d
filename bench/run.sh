#!/usr/bin/env bash
# Side-by-side benchmark of dataverse-proxy against nginx and the direct path.
#
# Everything runs on 127.0.0.1, every run is bounded in time, and every
# process this script starts is stopped by its PID on exit. The load
# generator (wrk) is pinned to core 0 and the servers to core 1, so the CPU
# each proxy spends per request is comparable. Results: a Markdown table on
# stdout and in bench/results/<timestamp>.md.
#
#   bash bench/run.sh                 # 10 s per load run
#   DURATION=30s bash bench/run.sh
#   BENCH_DEBUG=1 bash bench/run.sh   # leave the servers and scratch files for
#                                     # profiling (stop them yourself afterwards)
#   BASELINE_BIN=/path/to/older/dataverse-proxy bash bench/run.sh
#                                     # also run an older build side by side
#                                     # ("baseline"), e.g. from a git worktree
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-10s}
WORK=$(mktemp -d /tmp/dvp-bench.XXXXXX)
# nginx workers run as nobody: they must be able to read the files.
chmod 755 "$WORK"
UP=18081 NGX=18082 DVP=18083 BARE=18084 BASE=18085 ADMIN=18093 BASE_ADMIN=18095
# The shipped logging: dataverse-proxy as the Kubernetes manifests set it
# (JSON lines, RUST_LOG=info), nginx with its buffered access log.
NGX_LOG=18087 DVP_LOG=18088 LOG_ADMIN=18098
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
if [ -n "${BENCH_DEBUG:-}" ]; then trap - EXIT; fi

# --- tools, from Debian's packages ---
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null || ! command -v taskset >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk util-linux curl >/dev/null
fi
NGINX=$(command -v nginx)
(cd "$ROOT" && cargo build --release --quiet && cargo build --release --quiet --example bare_proxy --example open_loop)
BIN="$ROOT/target/release/dataverse-proxy"
BARE_BIN="$ROOT/target/release/examples/bare_proxy"

# --- data ---
ORIGIN="http://127.0.0.1:$UP"
mkdir -p "$WORK/www/api/data/v9.2" "$WORK/logs" "$WORK/tmp"
python3 - "$WORK/www/api/data/v9.2" "$ORIGIN" <<'PY'
import json, sys
d, origin = sys.argv[1], sys.argv[2]
def row(i):
    return {"@odata.etag": f'W/"{7100000+i}"', "accountid": f"00000000-0000-0000-0000-{i:012d}",
            "name": f"Account {i}", "telephone1": "555-0100", "address1_city": "Redmond"}
page = {"@odata.context": f"{origin}/api/data/v9.2/$metadata#accounts(name,telephone1,address1_city)",
        "value": [row(i) for i in range(12)],
        "@odata.nextLink": f"{origin}/api/data/v9.2/accounts?$select=name&$skiptoken=%3Ccookie%20pagenumber=%222%22%20/%3E"}
open(f"{d}/accounts", "w").write(json.dumps(page))
big = {"@odata.context": f"{origin}/api/data/v9.2/$metadata#accounts", "value": []}
i = 0
while len(json.dumps(big)) < 1_000_000:
    r = row(i); r["@odata.id"] = f"{origin}/api/data/v9.2/accounts({r['accountid']})"
    big["value"].append(r); i += 1
text = json.dumps(big)
open(f"{d}/page1m", "w").write(text)
open(f"{d}/page1m.bin", "w").write(text)
# A typical page: links only in @odata.context and @odata.nextLink.
plain = {"@odata.context": big["@odata.context"], "value": []}
i = 0
while len(json.dumps(plain)) < 1_000_000:
    plain["value"].append(row(i)); i += 1
plain["@odata.nextLink"] = page["@odata.nextLink"]
text = json.dumps(plain)
open(f"{d}/plain1m", "w").write(text)
open(f"{d}/plain1m.bin", "w").write(text)
PY
head -c $((1024 * 1024 * 1024)) /dev/zero > "$WORK/www/api/data/v9.2/big"
chmod -R a+rX "$WORK/www"
SMALL_BYTES=$(stat -c %s "$WORK/www/api/data/v9.2/accounts")

# --- the upstream (Dataverse stand-in + token endpoint) and nginx as a proxy ---
cat > "$WORK/upstream.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/upstream.pid;
error_log $WORK/logs/upstream-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  keepalive_requests 1000000;
  sendfile on;
  server {
    listen 127.0.0.1:$UP backlog=4096;
    location = /tenant/oauth2/v2.0/token {
      access_log $WORK/logs/token.log;
      default_type application/json;
      return 200 '{"token_type":"Bearer","expires_in":3599,"access_token":"bench-token"}';
    }
    location /api/data/v9.2/ {
      if (\$http_authorization != "Bearer bench-token") { return 401; }
      root $WORK/www;
      default_type application/json;
    }
    location ~ \\.bin\$ {
      if (\$http_authorization != "Bearer bench-token") { return 401; }
      root $WORK/www;
      default_type application/octet-stream;
    }
  }
}
CONF
source "$ROOT/bench/nginx.sh"
nginx_proxy_conf "$WORK/nginx-proxy.conf" "$WORK" "$NGX" "$UP"
nginx_proxy_conf "$WORK/nginx-logged.conf" "$WORK" "$NGX_LOG" "$UP" "" log

start() { # name, command... -> LAST (its PID)
  local name=$1; shift
  taskset -c 1 "$@" >"$WORK/logs/$name.out" 2>&1 &
  LAST=$!
  PIDS+=("$LAST")
}
wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "port $1 never opened" >&2; return 1
}

start upstream "$NGINX" -p "$WORK" -c "$WORK/upstream.conf"
start nginx-proxy "$NGINX" -p "$WORK" -c "$WORK/nginx-proxy.conf"; NGX_PID=$LAST
start nginx-logged "$NGINX" -p "$WORK" -c "$WORK/nginx-logged.conf"; NGX_LOG_PID=$LAST
# The floor: the least a hyper-based proxy does (examples/bare_proxy.rs).
start bare "$BARE_BIN" 127.0.0.1:$BARE "http://127.0.0.1:$UP" "Bearer bench-token"; BARE_PID=$LAST
wait_port $UP; wait_port $NGX; wait_port $NGX_LOG; wait_port $BARE
# nginx's master forks one worker: measure the worker.
worker_of() {
  local worker=""
  for _ in $(seq 100); do
    worker=$(pgrep -P "$1" | head -1 || true)
    [ -n "$worker" ] && break
    sleep 0.05
  done
  echo "$worker"
}
NGX_WORKER=$(worker_of "$NGX_PID")
NGX_LOG_WORKER=$(worker_of "$NGX_LOG_PID")

export DATAVERSE_URL="$ORIGIN" AZURE_TENANT_ID=tenant AZURE_CLIENT_ID=bench AZURE_CLIENT_SECRET=bench
export DATAVERSE_PROXY_TOKEN_URL="$ORIGIN/tenant/oauth2/v2.0/token"
export DATAVERSE_PROXY_LISTEN=127.0.0.1:$DVP DATAVERSE_PROXY_ADMIN_LISTEN=127.0.0.1:$ADMIN
export RUST_LOG=warn TOKIO_WORKER_THREADS=1
# Run from the scratch directory: no ./config.toml is picked up there.
cd "$WORK"
start dataverse-proxy "$BIN" serve; DVP_PID=$LAST
DATAVERSE_PROXY_LISTEN=127.0.0.1:$DVP_LOG DATAVERSE_PROXY_ADMIN_LISTEN=127.0.0.1:$LOG_ADMIN \
  DATAVERSE_PROXY_LOG_FORMAT=json RUST_LOG=info \
  start dataverse-proxy-logged "$BIN" serve; DVP_LOG_PID=$LAST
wait_port $DVP; wait_port $DVP_LOG
TARGETS="dataverse-proxy nginx hyper-floor direct dataverse-proxy-logged nginx-logged"
if [ -n "${BASELINE_BIN:-}" ]; then
  DATAVERSE_PROXY_LISTEN=127.0.0.1:$BASE DATAVERSE_PROXY_ADMIN_LISTEN=127.0.0.1:$BASE_ADMIN \
    start baseline "$BASELINE_BIN" serve; BASE_PID=$LAST
  wait_port $BASE
  TARGETS="dataverse-proxy baseline nginx hyper-floor direct dataverse-proxy-logged nginx-logged"
fi

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)
RSS_REST=$(rss_kb "$DVP_PID")
RSS_REST_NGX=$(rss_kb "$NGX_WORKER")

to_ms() { # wrk latency value (us/ms/s) to milliseconds
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n = n; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

# run NAME PORT PATH CONNS PID -> sets RPS P50 P99 CPU_US REQS
run() {
  local port=$2 path=$3 conns=$4 pid=$5
  local before after out
  before=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0)
  out=$(taskset -c 0 wrk -t1 -c"$conns" -d"$DURATION" --latency "http://127.0.0.1:$port$path")
  after=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0)
  RPS=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  REQS=$(awk '/requests in/ {print $1}' <<<"$out")
  P50=$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")")
  P99=$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")
  local errs; errs=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  if [ -n "$errs" ]; then echo "WARNING: $1 had $errs non-2xx answers" >&2; fi
  if [ -n "$pid" ]; then
    CPU_US=$(awk -v t=$((after - before)) -v n="$REQS" -v hz="$TCK" 'BEGIN { printf "%.1f", t * 1e6 / hz / n }')
  else
    CPU_US="-"
  fi
}

RESULTS="$WORK/results.md"
{
  echo "| target | conns | req/s | p50 ms | p99 ms | proxy CPU µs/req |"
  echo "|---|---|---|---|---|---|"
} > "$RESULTS"

# Cold start: the first load run starts while the proxy may not have a token yet.
declare -A R
for conns in 16 256; do
  for target in $TARGETS; do
    case $target in
      baseline) port=$BASE; pid=$BASE_PID; path=/api/data/v9.2/accounts ;;
      direct) port=$UP; pid=""; path=/api/data/v9.2/accounts ;;
      hyper-floor) port=$BARE; pid=$BARE_PID; path=/api/data/v9.2/accounts ;;
      nginx) port=$NGX; pid=$NGX_WORKER; path=/api/data/v9.2/accounts ;;
      nginx-logged) port=$NGX_LOG; pid=$NGX_LOG_WORKER; path=/api/data/v9.2/accounts ;;
      dataverse-proxy-logged) port=$DVP_LOG; pid=$DVP_LOG_PID; path=/api/data/v9.2/accounts ;;
      dataverse-proxy) port=$DVP; pid=$DVP_PID; path=/api/data/v9.2/accounts ;;
    esac
    if [ "$target" = direct ]; then
      out=$(taskset -c 0 wrk -t1 -c"$conns" -d"$DURATION" --latency -H "Authorization: Bearer bench-token" "http://127.0.0.1:$port$path")
      if grep -q Non-2xx <<<"$out"; then echo "WARNING: direct had non-2xx answers" >&2; fi
      RPS=$(awk '/^Requests\/sec/ {print $2}' <<<"$out"); P50=$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")"); P99=$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")"); CPU_US="-"
    else
      if [ "$target" = dataverse-proxy ] && [ "$conns" = 256 ]; then
        ( sleep 3; rss_kb "$DVP_PID" > "$WORK/rss256" ) &
        SAMPLER=$!
      fi
      run "$target" "$port" "$path" "$conns" "$pid"
      if [ "$target" = dataverse-proxy ] && [ "$conns" = 16 ]; then COLD_REQS=$REQS; fi
    fi
    R[$target-$conns]="$RPS $P50 $P99 $CPU_US"
    echo "| $target | $conns | $RPS | $P50 | $P99 | $CPU_US |" >> "$RESULTS"
  done
done
wait "$SAMPLER"

# Added latency at a fixed rate: an open-loop load (examples/open_loop.rs)
# of RATE requests/s over 32 connections, each request's latency counted
# from when it was due (wrk's closed loop hides queueing behind the load).
RATE=${RATE:-5000}
SECS=$(awk -v d="$DURATION" 'BEGIN { sub(/s$/, "", d); print d }')
declare -A OL
for target in direct nginx hyper-floor dataverse-proxy; do
  case $target in
    direct) port=$UP; auth="Authorization: Bearer bench-token" ;;
    nginx) port=$NGX; auth="" ;;
    hyper-floor) port=$BARE; auth="" ;;
    dataverse-proxy) port=$DVP; auth="" ;;
  esac
  OL[$target]=$(taskset -c 0 "$ROOT/target/release/examples/open_loop" \
    "http://127.0.0.1:$port/api/data/v9.2/accounts" "$RATE" "$SECS" 32 ${auth:+"$auth"})
done
TOKENS=$(wc -l < "$WORK/logs/token.log")
LINES_DROPPED=$(curl -s "http://127.0.0.1:$LOG_ADMIN/metrics" | awk '/^dataverse_proxy_log_lines_dropped_total/ {print $2}')
RSS_256=$(cat "$WORK/rss256")

# Link rewriting on 1 MB pages: the same bytes as JSON (rewritten) and as
# octet-stream (passed through), through dataverse-proxy.
run rewrite $DVP /api/data/v9.2/page1m 16 "$DVP_PID"; REW_RPS=$RPS; REW_CPU=$CPU_US
run passthrough $DVP /api/data/v9.2/page1m.bin 16 "$DVP_PID"; RAW_RPS=$RPS; RAW_CPU=$CPU_US
run rewrite-plain $DVP /api/data/v9.2/plain1m 16 "$DVP_PID"; PREW_RPS=$RPS; PREW_CPU=$CPU_US
run passthrough-plain $DVP /api/data/v9.2/plain1m.bin 16 "$DVP_PID"; PRAW_RPS=$RPS; PRAW_CPU=$CPU_US

# Streaming 1 GiB: MB/s and the proxy's peak RSS during the transfer.
stream() { # port [auth]
  taskset -c 0 curl -s -o /dev/null -w '%{speed_download}' ${2:+-H "$2"} "http://127.0.0.1:$1/api/data/v9.2/big"
}
# A fresh dataverse-proxy for the streaming run, so its peak RSS is the
# transfer's and not what the load runs left in the allocator; nginx's
# worker peak is reset instead.
kill "$DVP_PID"; wait "$DVP_PID" 2>/dev/null || true
start dataverse-proxy "$BIN" serve; DVP_PID=$LAST
wait_port $DVP
curl -s -o /dev/null "http://127.0.0.1:$DVP/api/data/v9.2/accounts"
RSS_FRESH=$(rss_kb "$DVP_PID")
echo 5 > "/proc/$NGX_WORKER/clear_refs" 2>/dev/null || true
S_DIRECT=$(stream $UP "Authorization: Bearer bench-token")
S_NGX=$(stream $NGX)
S_DVP=$(stream $DVP)
PEAK_DVP=$(hwm_kb "$DVP_PID"); PEAK_NGX=$(hwm_kb "$NGX_WORKER")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0 || a == "-" || b == "-") print "-"; else printf "%.2f", a / b }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1e6 }'; }
{
  echo
  echo "| ratio (dataverse-proxy ÷ nginx) | 16 conns | 256 conns |"
  echo "|---|---|---|"
  # ratio_rows A B "FIELDS" SUFFIX: a row per field (1 req/s, 2 p50, 3 p99,
  # 4 CPU) of target A's figures over target B's, at 16 and 256 conns.
  ratio_rows() {
    local i name
    for i in $3; do
      name=$(echo "req/s p50 p99 CPU-µs/req" | cut -d' ' -f"$i")
      echo "| $name$4 | $(ratio "$(field "$1-16" "$i")" "$(field "$2-16" "$i")") | $(ratio "$(field "$1-256" "$i")" "$(field "$2-256" "$i")") |"
    done
  }
  field() { echo "${R[$1]}" | cut -d' ' -f"$2"; }
  ratio_rows dataverse-proxy nginx "1 2 3 4" ""
  ratio_rows dataverse-proxy-logged nginx-logged "1 4" ", both logging each request (shipped configuration ÷ nginx with buffered access log)"
  ratio_rows hyper-floor nginx "4" ", hyper-floor ÷ nginx"
  if [ -n "${BASELINE_BIN:-}" ]; then
    ratio_rows dataverse-proxy baseline "1 4" ", dataverse-proxy ÷ baseline"
  fi
  echo
  echo "| ratio to direct (req/s) | 16 conns | 256 conns |"
  echo "|---|---|---|"
  for t in dataverse-proxy nginx hyper-floor; do
    echo "| $t | $(ratio "$(echo "${R[$t-16]}" | cut -d' ' -f1)" "$(echo "${R[direct-16]}" | cut -d' ' -f1)") | $(ratio "$(echo "${R[$t-256]}" | cut -d' ' -f1)" "$(echo "${R[direct-256]}" | cut -d' ' -f1)") |"
  done
  echo
  echo "| streaming 1 GiB | MB/s | peak RSS of the proxy |"
  echo "|---|---|---|"
  echo "| direct | $(mb "$S_DIRECT") | - |"
  echo "| nginx | $(mb "$S_NGX") | $((PEAK_NGX / 1024)) MiB |"
  echo "| dataverse-proxy | $(mb "$S_DVP") ($(ratio "$S_DVP" "$S_NGX") × nginx) | $((PEAK_DVP / 1024)) MiB |"
  echo
  echo "| open loop, $RATE req/s, 32 conns | sent | p50 µs | p99 µs | p99.9 µs | max µs | errors | sent late (> 1 ms) | p99 above direct |"
  echo "|---|---|---|---|---|---|---|---|---|"
  d99=$(echo "${OL[direct]}" | cut -d' ' -f3)
  for t in direct nginx hyper-floor dataverse-proxy; do
    read -r n p50 p99 p999 max errs late <<<"${OL[$t]}"
    echo "| $t | $n | $p50 | $p99 | $p999 | $max | $errs | $late | $((p99 - d99)) µs |"
  done
  echo
  echo "| other | value |"
  echo "|---|---|"
  echo "| dataverse-proxy RSS at rest | $((RSS_REST / 1024)) MiB (nginx worker: $((RSS_REST_NGX / 1024)) MiB) |"
  echo "| dataverse-proxy RSS under 256 connections | $((RSS_256 / 1024)) MiB |"
  echo "| dataverse-proxy RSS of a fresh process after one request | $((RSS_FRESH / 1024)) MiB |"
  cost() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (1 - a / b) * 100 }'; }
  echo "| 1 MB page, links in every row (~11,000), rewritten vs passed through (req/s) | $REW_RPS vs $RAW_RPS ($(cost "$REW_RPS" "$RAW_RPS")% cost) |"
  echo "| 1 MB page, links in every row, CPU µs/req rewritten vs passed through | $REW_CPU vs $RAW_CPU |"
  echo "| 1 MB page, typical (context + nextLink), rewritten vs passed through (req/s) | $PREW_RPS vs $PRAW_RPS ($(cost "$PREW_RPS" "$PRAW_RPS")% cost) |"
  echo "| 1 MB page, typical, CPU µs/req rewritten vs passed through | $PREW_CPU vs $PRAW_CPU |"
  echo "| token requests during the cold-start run ($COLD_REQS requests) | $TOKENS |"
  echo "| small response body | $SMALL_BYTES bytes |"
  echo
  echo "Run: $(date -u +%Y-%m-%dT%H:%MZ), $DURATION per load run, $(nproc) cores, wrk on core 0, servers on core 1,"
  echo "dataverse-proxy with TOKIO_WORKER_THREADS=1, nginx $("$NGINX" -v 2>&1 | cut -d/ -f2) with worker_processes 1."
  echo "dataverse-proxy and nginx log nothing; dataverse-proxy-logged runs the shipped configuration"
  echo "(DATAVERSE_PROXY_LOG_FORMAT=json, RUST_LOG=info, stderr to a file), nginx-logged a JSON access line"
  echo "with access_log buffer=64k flush=1s; access lines written: dataverse-proxy $(grep -c dataverse_proxy::access "$WORK/logs/dataverse-proxy-logged.out" || true),"
  echo "nginx $(wc -l < "$WORK/logs/nginx-logged-access.log"); dataverse-proxy lines dropped: ${LINES_DROPPED:-?}."
} >> "$RESULTS"

mkdir -p "$ROOT/bench/results"
cp "$RESULTS" "$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ).md"
cat "$RESULTS"
