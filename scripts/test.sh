#!/usr/bin/env bash
# The project's test command: every unit test and every end-to-end test (real processes, real
# /dev/kvm, real sockets, QEMU interop), in one cargo invocation. Run .ci/install-deps.sh once
# first on a fresh machine (the README's setup line does both).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --all-targets
# --no-fail-fast: one failing test binary must not hide the results of the ones after it.
cargo test --workspace --no-fail-fast -- --test-threads=2 "$@"
