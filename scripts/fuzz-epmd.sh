#!/usr/bin/env bash
# Fuzz the epmd protocol layer (beamredir/src/erlang/epmd.rs) for SECONDS seconds:
#   scripts/fuzz-epmd.sh 30
# Installs nightly and cargo-fuzz if missing (a second run only checks), then runs the
# `epmd_conversation` target. Exits non-zero if libFuzzer finds a crash; the input is then in
# fuzz/artifacts/epmd_conversation/. The corpus grows in fuzz/corpus/ (git-ignored).
set -euo pipefail

log() { printf 'fuzz-epmd: %s\n' "$*" >&2; }

SECONDS_TO_RUN=${1:-}
if ! [[ "$SECONDS_TO_RUN" =~ ^[0-9]+$ ]] || [ "$SECONDS_TO_RUN" -eq 0 ]; then
  echo "usage: $0 SECONDS" >&2; exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

# cargo-fuzz needs nightly for -Z sanitizer.
if ! rustup toolchain list | grep -q '^nightly'; then
  log "installing the nightly toolchain"; rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"; cargo install cargo-fuzz --locked
fi

cargo +nightly fuzz run epmd_conversation -- \
  -max_total_time="$SECONDS_TO_RUN" -dict=fuzz/epmd.dict -print_final_stats=1
