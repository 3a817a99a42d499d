#!/usr/bin/env bash
# Checks the README's test command on a fresh Debian 12 without
# redis-server or chromium: a debootstrap chroot with only a C compiler and
# git added (and this machine's Rust toolchain bound in), a fresh clone of
# this repository's HEAD, then `bash tests/run.sh`. Root only; not part of
# CI. Usage: sudo bash tests/fresh_debian.sh [/path/for/the/chroot]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
C="${1:-/var/tmp/dvp-fresh-debian}"
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
[ -x "$C/bin/bash" ] || debootstrap --variant=minbase bookworm "$C" http://deb.debian.org/debian
cp /etc/resolv.conf "$C/etc/resolv.conf"
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
  echo "before: redis-server=$(command -v redis-server || echo absent) chromium=$(command -v chromium || echo absent)"
  rm -rf /root/dvp && git clone -q /src /root/dvp && cd /root/dvp
  git log --oneline -1
  time bash tests/run.sh
'
