# Sourced by the bench scripts that share a governor through Redis: starts
# a redis-server of their own on a free loopback port (nothing kept on
# disk), stops it when the script exits, and exports BENCH_REDIS_URL.
command -v redis-server >/dev/null || { echo "redis-server is needed (Debian package redis-server)" >&2; exit 1; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
REDIS=$!
trap 'kill $REDIS 2>/dev/null || true' EXIT
export BENCH_REDIS_URL="redis://127.0.0.1:$PORT"
