#!/usr/bin/env bash
# Validates the manifests against the Kubernetes API schemas (offline: the
# schemas ship inside the kubernetes-validate package from PyPI).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0
fi
kubernetes-validate --strict --kubernetes-version 1.33.0 ./*.yaml
