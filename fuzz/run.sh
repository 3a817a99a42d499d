#!/usr/bin/env bash
# Runs each fuzz target for a bounded time (default 60 s each). Not part of
# CI. cargo-fuzz wants nightly flags; RUSTC_BOOTSTRAP lets the machine's one
# stable toolchain accept them. Findings land in fuzz/artifacts/<target>/.
#
#   cargo install cargo-fuzz      # once
#   bash fuzz/run.sh              # every target, 60 s each
#   SECONDS_EACH=600 bash fuzz/run.sh batch_parser
set -euo pipefail
cd "$(dirname "$0")/.."
EACH=${SECONDS_EACH:-60}
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(path_guard batch_parser rewriter_chunks config_load)
fi
export RUSTC_BOOTSTRAP=1
for t in "${TARGETS[@]}"; do
  echo "== $t: ${EACH}s"
  mkdir -p "fuzz/corpus/$t"
  cargo fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$EACH" -max_len=65536 2>&1 \
    | grep -E "^(#[0-9]+[[:space:]]+DONE|==[0-9]+==|SUMMARY|Done|artifact_prefix|Test unit written)" || true
done
