#!/usr/bin/env bash
# Validates the manifests against the Kubernetes API schemas (offline: the
# schemas ship inside the kubernetes-validate package from PyPI). The
# package goes into a virtual environment under target/, so that neither
# PATH nor a system Python that refuses pip installs (PEP 668, Debian 12)
# matters; Debian's python3-venv is installed with apt-get where missing,
# as tests/run.sh does for the tests' packages.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${CARGO_TARGET_DIR:-$ROOT/target}/kubernetes-validate-venv"
if ! "$VENV/bin/python" -c 'import kubernetes_validate' >/dev/null 2>&1; then
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || {
      echo "the manifest check needs python3 with venv; install it with your package manager" >&2; exit 1; }
    echo "installing python3-venv (Debian package) for the manifest check"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv
    rm -rf "$VENV"
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi
cd "$ROOT/deploy/kubernetes"
"$VENV/bin/python" -m kubernetes_validate --strict --kubernetes-version 1.33.0 ./*.yaml
