# Sourced by bench/governor.sh: a Redis Cluster of three masters of its own
# on free loopback ports (nothing kept on disk, made with redis-cli
# --cluster create), stopped when the script exits; exports
# BENCH_REDIS_CLUSTER_URL (one node: the proxy finds the others).
command -v redis-cli >/dev/null || { echo "redis-cli is needed (Debian package redis-tools)" >&2; exit 1; }
CLUSTER_DIR=$(mktemp -d)
CLUSTER_PIDS=()
CLUSTER_NODES=()
for _ in 1 2 3; do
  P=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$CLUSTER_DIR/$P"
  redis-server --port "$P" --bind 127.0.0.1 --save "" --appendonly no --dir "$CLUSTER_DIR/$P" \
    --cluster-enabled yes --cluster-node-timeout 2000 >/dev/null &
  CLUSTER_PIDS+=($!)
  CLUSTER_NODES+=("127.0.0.1:$P")
done
trap 'kill ${REDIS:-} "${CLUSTER_PIDS[@]}" 2>/dev/null || true; rm -rf "$CLUSTER_DIR"' EXIT
for n in "${CLUSTER_NODES[@]}"; do
  until redis-cli -p "${n##*:}" ping >/dev/null 2>&1; do sleep 0.1; done
done
redis-cli --cluster create "${CLUSTER_NODES[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
until redis-cli -p "${CLUSTER_NODES[0]##*:}" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
export BENCH_REDIS_CLUSTER_URL="redis://${CLUSTER_NODES[0]}"
