#!/usr/bin/env bash
# Checks the README's two commands and .ci/run on a fresh Debian 12 without
# redis-server, chromium or python3: a debootstrap chroot with only a C
# compiler and git added (and this machine's Rust toolchain bound in), a
# fresh clone of this repository's HEAD, then `bash .ci/run` (whose last
# step is the README's test command, `bash tests/run.sh`) and `cargo run
# --release -- demo`, asked for /api/data/v9.2/leads. Root only; not part of
# CI. Usage: sudo bash tests/fresh_debian.sh [/path/for/the/chroot]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
C="${1:-/var/tmp/dvp-fresh-debian}"
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
[ -x "$C/bin/bash" ] || debootstrap --variant=minbase bookworm "$C" http://deb.debian.org/debian
cp /etc/resolv.conf "$C/etc/resolv.conf"
# The chroot trusts what this machine trusts: where the network inspects
# TLS (as here), Debian's own CA list would refuse PyPI and crates.io.
cp /etc/ssl/certs/ca-certificates.crt "$C/root/host-ca-certificates.crt"
# Services installed in the chroot must not start (they would share this
# machine's ports).
printf '#!/bin/sh\nexit 101\n' > "$C/usr/sbin/policy-rc.d"; chmod +x "$C/usr/sbin/policy-rc.d"
mkdir -p "$C/root/.rustup" "$C/root/.cargo" "$C/src"
mountpoint -q "$C/proc" || mount -t proc proc "$C/proc"
mountpoint -q "$C/dev" || mount --rbind /dev "$C/dev"
mountpoint -q "$C/root/.rustup" || mount --bind "$HOME/.rustup" "$C/root/.rustup"
mountpoint -q "$C/root/.cargo" || mount --bind "$HOME/.cargo" "$C/root/.cargo"
mountpoint -q "$C/src" || mount --bind "$REPO" "$C/src"
chroot "$C" /bin/bash -c '
  set -e
  export HOME=/root PATH=/root/.cargo/bin:/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq gcc libc6-dev git ca-certificates >/dev/null
  cp /root/host-ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
  echo "before: redis-server=$(command -v redis-server || echo absent) chromium=$(command -v chromium || echo absent)"
  rm -rf /root/dvp && git clone -q /src /root/dvp && cd /root/dvp
  git log --oneline -1
  echo "before: python3=$(command -v python3 || echo absent)"
  time bash .ci/run
  cargo run --release -- demo >/tmp/demo.log 2>&1 &
  demo=$!
  for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/8080) 2>/dev/null && break; sleep 1; done
  exec 3<>/dev/tcp/127.0.0.1/8080
  printf "GET /api/data/v9.2/leads HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" >&3
  status=$(head -1 <&3); exec 3<&-
  kill "$demo"
  echo "demo: $status"
  case "$status" in "HTTP/1.1 200"*) ;; *) echo "the demo did not answer 200" >&2; exit 1 ;; esac
'
