# Sourced by bench/governor.sh: a Redis Cluster of three masters of its own
# on free loopback ports (nothing kept on disk, made with redis-cli
# --cluster create), stopped when the script exits; exports
# BENCH_REDIS_CLUSTER_URL (one node: the proxy finds the others).
command -v redis-cli >/dev/null || { echo "redis-cli is needed (Debian package redis-tools)" >&2; exit 1; }
CLUSTER_DIR=$(mktemp -d)
CLUSTER_PIDS=()
CLUSTER_NODES=()
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for _ in 1 2 3; do
  P=$(free_port)
  mkdir -p "$CLUSTER_DIR/$P"
  # The bus port of its own: the default (port + 10000) passes 65535 for
  # an ephemeral port above 55535.
  redis-server --port "$P" --bind 127.0.0.1 --save "" --appendonly no --dir "$CLUSTER_DIR/$P" \
    --cluster-enabled yes --cluster-node-timeout 2000 --cluster-port "$(free_port)" >/dev/null &
  CLUSTER_PIDS+=($!)
  CLUSTER_NODES+=("127.0.0.1:$P")
done
trap 'kill ${REDIS:-} "${CLUSTER_PIDS[@]}" 2>/dev/null || true; rm -rf "$CLUSTER_DIR"' EXIT
# Bounded waits: a node that did not start (its port, or its bus port at
# port + 10000, taken meanwhile) ends the script instead of hanging it.
wait_for() {
  for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "the Redis Cluster for the benchmark did not come up ($*)" >&2; exit 1
}
for n in "${CLUSTER_NODES[@]}"; do
  wait_for redis-cli -p "${n##*:}" ping
done
redis-cli --cluster create "${CLUSTER_NODES[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
cluster_ok() { redis-cli -p "${CLUSTER_NODES[0]##*:}" cluster info | grep -q cluster_state:ok; }
wait_for cluster_ok
export BENCH_REDIS_CLUSTER_URL="redis://${CLUSTER_NODES[0]}"
