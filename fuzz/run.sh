#!/usr/bin/env bash
# Runs one fuzz target (or all: no target given) for a number of seconds, from its corpus in
# fuzz/corpus/<target>/, with the limits that make a slow or greedy input a finding.
# Used by .ci/run and by hand (docs/reliability.md, "Fuzzing"):
#
#   fuzz/run.sh [target] [seconds]        (default: every target, 30 s each)
#
# New inputs go to a scratch directory, not into the kept corpus (minimise before adding them:
# `cargo +nightly fuzz cmin <target>`). A crash, a hang or an oversized allocation saves the
# input under fuzz/artifacts/<target>/ and exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=${1:-$(cargo +nightly fuzz list)}
seconds=${2:-30}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

for target in $targets; do
    mkdir -p "$scratch/$target" "fuzz/corpus/$target"
    echo "fuzz: $target for ${seconds}s"
    # -timeout: one input that takes seconds is a hang (decoders must return in bounded time);
    # -malloc_limit_mb: one allocation over 64 MiB is a finding (decoders must never trust a
    # stored or sent length; the largest legitimate allocation of these inputs is ~16 MiB).
    cargo +nightly fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -malloc_limit_mb=64 -print_final_stats=1
done
