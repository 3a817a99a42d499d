#!/usr/bin/env bash
# Installs the real Dataverse clients the test suite runs through the proxy,
# pinned, under target/clients: Microsoft's Python SDK in a virtual
# environment (python/requirements.txt) and DynamicsWebApi with npm
# (node/package-lock.json). Does nothing when the installed pins are the
# committed ones. tests/run.sh calls it; tests/it/clients.rs uses what it made.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=target/clients
mkdir -p "$dest"
pins=$(cat tests/clients/python/requirements.txt tests/clients/node/package-lock.json | sha256sum | cut -d' ' -f1)
if [ -f "$dest/pins" ] && [ "$(cat "$dest/pins")" = "$pins" ]; then
  exit 0
fi
for tool in python3 node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "the real-client tests need $tool (Debian: python3-venv, nodejs, npm)" >&2
    exit 1
  fi
done
rm -rf "$dest/venv" "$dest/node"
echo "installing the real-client test suite's clients under $dest (PyPI, npm)"
python3 -m venv "$dest/venv"
"$dest/venv/bin/pip" install --quiet --disable-pip-version-check -r tests/clients/python/requirements.txt
mkdir -p "$dest/node"
cp tests/clients/node/package.json tests/clients/node/package-lock.json "$dest/node/"
(cd "$dest/node" && npm ci --silent --ignore-scripts --no-audit --no-fund)
echo "$pins" > "$dest/pins"
