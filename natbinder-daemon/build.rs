//! Builds the eBPF object (natbinder-ebpf) for bpfel-unknown-none and leaves it in OUT_DIR, where
//! `src/kernel.rs` embeds it. The eBPF crate is its own workspace with its own lock file, built by the
//! same toolchain as this crate with `-Z build-std=core` (allowed on stable through RUSTC_BOOTSTRAP=1,
//! as distributions do). Needs rust-src and bpf-linker: `scripts/setup.sh` installs both.
//!
//! NATBINDER_SKIP_EBPF=1 writes an empty stub instead, for `cargo check`/clippy on machines without
//! bpf-linker; a daemon built that way refuses to start and says why.
use std::{env, fs, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let ebpf_dir = root.join("natbinder-ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let object = out_dir.join("natbinder.bpf.o");

    println!("cargo:rerun-if-env-changed=NATBINDER_SKIP_EBPF");
    for dir in [
        "natbinder-ebpf/src",
        "natbinder-ebpf/Cargo.toml",
        "natbinder-ebpf/Cargo.lock",
        "natbinder-ebpf/.cargo/config.toml",
        "natbinder-common/src",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }

    if env::var("NATBINDER_SKIP_EBPF").is_ok_and(|v| v == "1") {
        println!("cargo:warning=NATBINDER_SKIP_EBPF=1: building without the eBPF object; `natbinder daemon` will refuse to start");
        fs::write(&object, b"").unwrap();
        return;
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf_dir)
        .args(["build", "--release", "--locked", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "1");
    // Settings meant for the host build must not leak into the eBPF build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_PROFILE_RELEASE_DEBUG",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().unwrap_or_else(|e| panic!("could not run cargo for the eBPF build: {e}"));
    if !status.success() {
        panic!(
            "building the eBPF programs (natbinder-ebpf) failed: see the errors above.\n\
             If rust-src or bpf-linker is missing, run `scripts/setup.sh` (it installs both), \
             or set NATBINDER_SKIP_EBPF=1 to build without the kernel programs."
        );
    }
    let built = target_dir.join("bpfel-unknown-none/release/natbinder");
    fs::copy(&built, &object).unwrap_or_else(|e| panic!("copying {} to {}: {e}", built.display(), object.display()));
}
