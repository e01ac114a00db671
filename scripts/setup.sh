#!/usr/bin/env bash
# Installs everything natbinder's build, lab demo and tests need on a fresh Debian/Ubuntu machine.
# Idempotent: each step checks first and does nothing when its part is already there.
# Run as root (or with sudo available). Every failure names the step that failed and what to try.
set -euo pipefail

say()  { printf '\033[1;34m[setup]\033[0m %s\n' "$*" >&2; }
fail() { printf '\033[1;31m[setup] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

# --no-packaging: only what building, the lab demo and the benchmarks need; without the packaging
# tools (lintian, rpm, cargo-deb, cargo-generate-rpm), which take minutes to build on a fresh machine.
PACKAGING=1
for arg in "$@"; do
    case "$arg" in
        --no-packaging) PACKAGING=0 ;;
        *) fail "unknown argument $arg (known: --no-packaging)" ;;
    esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || fail "not root and no sudo: run this script as root"
    SUDO="sudo"
fi

# --- 1. Debian packages: the lab gateway (miniupnpd), independent IGD/NAT-PMP clients, nftables, iproute2.
# rtorrent: a real port-searching program for the `natbinder run --wait` tests; gcc, libc6-dev and binutils
# build and inspect the static test program that binds with a raw syscall; dbus-daemon carries the
# stand-in for systemd's manager that `natbinder run`'s transient scopes are tested against.
APT_PACKAGES=(miniupnpd-nftables miniupnpc natpmpc nftables iproute2 util-linux procps python3 rtorrent gcc libc6-dev
              binutils dbus-daemon systemd man-db)
# lintian checks the .deb, rpm reads the .rpm back (the package tests).
if [ "$PACKAGING" = 1 ]; then APT_PACKAGES+=(lintian rpm); fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q >/dev/null || fail "apt-get update failed: check the package mirror in /etc/apt/sources.list"
    # miniupnpd's postinst asks debconf questions and may try to start the service: answer nothing, start nothing.
    echo 'exit 101' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null; $SUDO chmod +x /usr/sbin/policy-rc.d
    if ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
        $SUDO rm -f /usr/sbin/policy-rc.d
        fail "apt-get install ${missing[*]} failed: see apt's message above"
    fi
    $SUDO rm -f /usr/sbin/policy-rc.d
    # A machine-wide miniupnpd service has no business running: the lab starts its own inside a namespace.
    $SUDO systemctl disable --now miniupnpd >/dev/null 2>&1 || true
else
    say "apt packages present"
fi
command -v miniupnpd >/dev/null || [ -x /usr/sbin/miniupnpd ] || fail "miniupnpd is not installed after apt (package miniupnpd-nftables)"

# --- 2. Rust: stable toolchain with rust-src (the eBPF crate is built with -Z build-std=core under RUSTC_BOOTSTRAP=1).
command -v rustup >/dev/null || fail "rustup not found: install Rust with rustup (https://rustup.rs) first"
TOOLCHAIN="$(cd "$(dirname "$0")/.." && rustup show active-toolchain | cut -d' ' -f1)"
if ! rustup component list --installed --toolchain "$TOOLCHAIN" | grep -q '^rust-src'; then
    say "adding rust-src to $TOOLCHAIN"
    rustup component add rust-src --toolchain "$TOOLCHAIN" || fail "rustup component add rust-src failed"
else
    say "rust-src present on $TOOLCHAIN"
fi

# --- 2b. A nightly toolchain for the fuzz targets (cargo-fuzz builds with sanitizers).
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    say "installing the nightly toolchain for fuzzing"
    rustup toolchain install nightly --profile minimal || fail "rustup toolchain install nightly failed"
else
    say "nightly toolchain present ($(rustup run nightly rustc --version))"
fi

# --- 3. bpf-linker, built against the toolchain's own shared LLVM so that no system LLVM is needed.
SYSROOT="$(rustc +"$TOOLCHAIN" --print sysroot)"
LLVM_SO="$(ls "$SYSROOT"/lib/libLLVM.so.* 2>/dev/null | head -n1 || true)"
[ -n "$LLVM_SO" ] || fail "no libLLVM.so.* in $SYSROOT/lib: this toolchain does not ship a shared LLVM"
LLVM_MAJOR="$(basename "$LLVM_SO" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')"
PREFIX="${CARGO_HOME:-$HOME/.cargo}/natbinder-llvm-$(basename "$SYSROOT")"
if command -v bpf-linker >/dev/null && bpf-linker --version >/dev/null 2>&1 \
   && [ -f "$PREFIX/.built-for" ] && [ "$(cat "$PREFIX/.built-for")" = "$(basename "$LLVM_SO")" ]; then
    say "bpf-linker present ($(bpf-linker --version))"
else
    say "building bpf-linker against $(basename "$LLVM_SO") (LLVM $LLVM_MAJOR)"
    mkdir -p "$PREFIX/lib"
    ln -sf "$LLVM_SO" "$PREFIX/lib/libLLVM.so"
    ln -sf "$LLVM_SO" "$PREFIX/lib/$(basename "$LLVM_SO")"
    LLVM_PREFIX="$PREFIX" cargo +"$TOOLCHAIN" install --locked bpf-linker --force \
        --no-default-features --features "llvm-$LLVM_MAJOR" \
        || fail "cargo install bpf-linker failed (LLVM $LLVM_MAJOR from $LLVM_SO)"
    basename "$LLVM_SO" > "$PREFIX/.built-for"
    bpf-linker --version >/dev/null || fail "bpf-linker was built but does not run: check that $PREFIX/lib holds $(basename "$LLVM_SO")"
fi

if [ "$PACKAGING" = 1 ]; then
    # --- 4. cargo-deb for `cargo xtask deb` (pinned: the package's metadata is written for its keys).
    CARGO_DEB_VERSION=3.8.0
    if cargo deb --version 2>/dev/null | grep -qx "cargo-deb $CARGO_DEB_VERSION"; then
        say "cargo-deb present ($CARGO_DEB_VERSION)"
    else
        say "installing cargo-deb $CARGO_DEB_VERSION"
        cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION" --force \
            || fail "cargo install cargo-deb $CARGO_DEB_VERSION failed: see cargo's message above (needs crates.io access)"
    fi

    # --- 5. cargo-generate-rpm for `cargo xtask rpm` (pinned likewise).
    CARGO_GENERATE_RPM_VERSION=0.21.1
    if cargo generate-rpm --version 2>/dev/null | grep -qx "cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION"; then
        say "cargo-generate-rpm present ($CARGO_GENERATE_RPM_VERSION)"
    else
        say "installing cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION"
        cargo install --locked cargo-generate-rpm --version "$CARGO_GENERATE_RPM_VERSION" --force \
            || fail "cargo install cargo-generate-rpm $CARGO_GENERATE_RPM_VERSION failed: see cargo's message above (needs crates.io access)"
    fi
fi

# cargo-fuzz itself is installed on first use by scripts/fuzz.sh.
say "ready"
