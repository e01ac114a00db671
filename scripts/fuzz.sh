#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for N seconds each (default 30): ./scripts/fuzz.sh [SECONDS]
# Installs cargo-fuzz when it is missing (idempotent). Needs a nightly toolchain (cargo-fuzz builds with
# sanitizers); does not need bpf-linker or root: the targets link natbinder's library without the eBPF object.
# Exits non-zero when any target crashes, leaks, or takes over 10 s on one input; the input that did it is
# left in fuzz/artifacts/TARGET/ (reproduce: cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/FILE).
set -euo pipefail

say()  { printf '\033[1;34m[fuzz]\033[0m %s\n' "$*" >&2; }
fail() { printf '\033[1;31m[fuzz] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

SECONDS_PER_TARGET="${1:-30}"
[[ "$SECONDS_PER_TARGET" =~ ^[1-9][0-9]*$ ]] || fail "usage: $0 [SECONDS_PER_TARGET] (a positive integer, default 30)"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NIGHTLY="${NATBINDER_FUZZ_TOOLCHAIN:-nightly}"

command -v rustup >/dev/null || fail "rustup not found: install Rust with rustup (https://rustup.rs)"
rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1 \
    || fail "no $NIGHTLY toolchain: install it with 'rustup toolchain install $NIGHTLY --profile minimal'"

if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked || fail "cargo install cargo-fuzz failed: see cargo's message above (needs crates.io access)"
    cargo fuzz --version >/dev/null 2>&1 || fail "cargo-fuzz installed but 'cargo fuzz' does not run: is ~/.cargo/bin on PATH?"
fi

# From inside fuzz/ so that fuzz/.cargo/config.toml applies too; exported for good measure.
cd "$ROOT/fuzz"
export NATBINDER_SKIP_EBPF=1

say "building all targets ($(cargo fuzz --version), $(rustup run "$NIGHTLY" rustc --version))"
cargo "+$NIGHTLY" fuzz build || fail "building the fuzz targets failed: see the errors above"

mapfile -t TARGETS < <(cargo "+$NIGHTLY" fuzz list)
[ "${#TARGETS[@]}" -gt 0 ] || fail "cargo fuzz list found no targets in $ROOT/fuzz"

failed=()
for target in "${TARGETS[@]}"; do
    say "$target: ${SECONDS_PER_TARGET}s"
    mkdir -p "corpus/$target" "seeds/$target"
    # The first directory collects what the fuzzer finds; seeds/ (committed) are read only.
    if ! cargo "+$NIGHTLY" fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -print_final_stats=1; then
        failed+=("$target")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    fail "crashes in: ${failed[*]} (inputs in $ROOT/fuzz/artifacts/)"
fi
say "all ${#TARGETS[@]} targets ran ${SECONDS_PER_TARGET}s each without a crash"
