#!/usr/bin/env bash
# The README's test command. The tests start what they need themselves
# (redis-server instances on ephemeral ports, headless Chromium for the
# status page, haproxy as the ingress of the rolling-restart test, real
# Dataverse clients in Python and Node.js), so this installs Debian's
# redis-server, chromium, haproxy, python3-venv and nodejs/npm where they
# are missing, the clients themselves (pinned, under target/clients, by
# tests/clients/install.sh), then runs the whole suite: `bash tests/run.sh
# [cargo test arguments]`. .ci/run calls it after the format and lint checks.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ -x /usr/bin/chromium ] || [ -x /usr/bin/chromium-browser ] || need+=(chromium)
[ -x /usr/sbin/haproxy ] || [ -x /usr/bin/haproxy ] || need+=(haproxy)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "the tests need ${need[*]}; install them with your package manager (this script knows Debian's apt-get)" >&2
    exit 1
  fi
  echo "installing ${need[*]} (Debian packages) for the tests"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
bash tests/clients/install.sh
exec cargo test --workspace --locked "$@"
