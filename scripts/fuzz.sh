#!/usr/bin/env bash
# Build and run one fuzz target of fuzz/ for SECONDS (libFuzzer via libfuzzer-sys on the
# stable toolchain: rustc's sanitizer-coverage passes instead of cargo-fuzz's nightly flags).
#
#   scripts/fuzz.sh TARGET SECONDS [LIBFUZZER_FLAG...]   run TARGET (0 s: only build it)
#   scripts/fuzz.sh list                                 list the targets
#
# New inputs go to fuzz/target/corpus/TARGET (the committed seeds in fuzz/corpus/TARGET are
# read, never written); a crash leaves fuzz/artifacts/TARGET/crash-*, re-run it with
#   fuzz/target/x86_64-unknown-linux-gnu/release/TARGET fuzz/artifacts/TARGET/crash-...
# Nothing to install: libFuzzer is built from source by the libfuzzer-sys crate (needs a C++
# compiler, which the Rust toolchain's linker setup already requires here).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
TRIPLE=x86_64-unknown-linux-gnu
TARGETS=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^splitvisor-fuzz$')

usage() {
    echo "usage: scripts/fuzz.sh TARGET SECONDS [LIBFUZZER_FLAG...]; targets:" $TARGETS >&2
    exit 2
}
[ "${1:-}" = list ] && { echo "$TARGETS"; exit 0; }
[ $# -ge 2 ] || usage
target=$1 seconds=$2
shift 2
grep -qx "$target" <<<"$TARGETS" || { echo "fuzz.sh: no target '$target'" >&2; usage; }
[[ $seconds =~ ^[0-9]+$ ]] || { echo "fuzz.sh: SECONDS must be a whole number, got '$seconds'" >&2; usage; }
command -v c++ >/dev/null || { echo "fuzz.sh: libFuzzer needs a C++ compiler: apt-get install g++" >&2; exit 1; }

# Coverage for libFuzzer from stable rustc: inline 8-bit counters, PC table and comparison
# tracing (what cargo-fuzz passes, minus the nightly-only sanitizer). `--target` keeps the
# flags off build scripts and proc macros; debug assertions and overflow checks stay on so
# that arithmetic surprises crash instead of wrapping.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=3 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --locked --release --target "$TRIPLE" --bin "$target"
[ "$seconds" -gt 0 ] || exit 0

mkdir -p "target/corpus/$target" "artifacts/$target"
# -timeout: an input that runs this long is a hang (a spinning worker), reported as a crash.
exec "target/$TRIPLE/release/$target" "target/corpus/$target" "corpus/$target" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=8192 \
    -artifact_prefix="artifacts/$target/" -print_final_stats=1 "$@"
