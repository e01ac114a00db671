//! `cargo xtask <command>`: natbinder's developer entry points.
//!
//! * `setup`: installs what building and testing need (scripts/setup.sh; idempotent).
//! * `demo`:  setup, release build, then the lab demo: an unmodified server on a LAN host becomes
//!   reachable from a WAN peer through a real miniupnpd gateway, and stops being so when it exits.
//! * `test`:  setup, formatting and lint checks, then every test (the kernel/lab ones as root).
//! * `bench`: bind() overhead and bind-to-reachable latency in the lab, against a same-run baseline.
//! * `deb`:   setup, release build, man pages and completions, then the Debian package in target/debian/.
//! * `rpm`:   the same, then an RPM in target/rpm/.
mod bench;
mod demo;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the build and lab dependencies (apt packages, rust-src, bpf-linker).
    Setup,
    /// Run the self-contained lab demo (installs what it needs first).
    Demo {
        /// Skip setup and the build (use the binaries already in target/release).
        #[arg(long)]
        no_build: bool,
    },
    /// Run the whole test suite (installs what it needs first; builds the Debian package, which its
    /// package tests check).
    Test,
    /// Build the Debian package into target/debian/ (installs cargo-deb first).
    Deb {
        /// Skip setup (use the cargo-deb already installed).
        #[arg(long)]
        no_setup: bool,
    },
    /// Build the RPM into target/rpm/ (installs cargo-generate-rpm first).
    Rpm {
        /// Skip setup (use the cargo-generate-rpm already installed).
        #[arg(long)]
        no_setup: bool,
    },
    /// Measure bind() overhead and bind-to-reachable latency in the lab.
    Bench {
        #[arg(long)]
        no_build: bool,
        /// Samples per latency distribution (natbinder's; the floor takes as many, half before and half after).
        #[arg(long, default_value_t = 200)]
        samples: usize,
        /// The protocols whose latency is measured (repeatable). Default: all three.
        #[arg(long = "protocol", value_name = "PROTOCOL", value_parser = ["upnp", "pcp", "natpmp"])]
        protocols: Vec<String>,
        /// The natbinder binary to measure (another build, to compare). Default: target/release/natbinder.
        #[arg(long, value_name = "PATH")]
        natbinder: Option<PathBuf>,
        /// Run only these parts (repeatable): overhead, latency, burst, run, scale. Default: all. A partial
        /// run (this or --protocol) writes its report to target/bench/, leaving the committed
        /// BENCHMARKS.md and benchmarks.svg, which hold a whole run, as they are.
        #[arg(long, value_name = "PART", value_parser = ["overhead", "latency", "burst", "run", "scale"])]
        only: Vec<String>,
        /// Listeners in the larger burst (the smaller has 100).
        #[arg(long, default_value_t = 1000)]
        burst: u16,
    },
}

/// Fuzzing time per target in `cargo xtask test` (seven targets).
const FUZZ_SECONDS_PER_TARGET: u32 = 20;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("\x1b[1;34m[xtask]\x1b[0m {}", describe(cmd));
    let status = cmd.status().with_context(|| format!("could not start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|s| s.to_string_lossy()).collect::<Vec<_>>().join(" ")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Where cargo puts build output: CARGO_TARGET_DIR, or the workspace's target/.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// The release binary, and what both packages take from it: a stripped copy (for the RPM; cargo-deb
/// strips its own and keeps the symbols for -dbgsym), and its man pages and completions, generated
/// from its own command line so that they are never written twice. All in target/release/natbinder-package/.
fn package_inputs() -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "natbinder-daemon"]))?;
    let binary = target_dir().join("release/natbinder");
    let staging = target_dir().join("release/natbinder-package");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).with_context(|| format!("removing the old {}", staging.display()))?;
    }
    let man = staging.join("man");
    run(Command::new(&binary)
        .arg("generate-docs")
        .arg("--man")
        .arg(&man)
        .arg("--completions")
        .arg(staging.join("completions")))?;
    // Debian policy: man pages compressed with gzip -9, without a timestamp (-n) so builds reproduce.
    let mut gzip = Command::new("gzip");
    gzip.args(["-9", "-n", "-f"]);
    for page in std::fs::read_dir(&man).with_context(|| format!("reading {}", man.display()))? {
        gzip.arg(page?.path());
    }
    run(&mut gzip)?;
    run(Command::new("strip").arg("--strip-unneeded").arg("-o").arg(staging.join("natbinder")).arg(&binary))
}

fn package(no_setup: bool, build: fn() -> Result<()>) -> Result<()> {
    if !no_setup {
        setup()?;
    }
    package_inputs()?;
    build()
}

/// `cargo deb` with natbinder-daemon's [package.metadata.deb], into target/debian/.
fn deb() -> Result<()> {
    let out = target_dir().join("debian");
    run(cargo().args(["deb", "-p", "natbinder-daemon", "--no-build", "-o"]).arg(&out))?;
    println!("Debian packages in {}", out.display());
    Ok(())
}

/// `cargo generate-rpm` with natbinder-daemon's [package.metadata.generate-rpm], into target/rpm/.
fn rpm() -> Result<()> {
    let out = target_dir().join("rpm");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    run(cargo().args(["generate-rpm", "-p", "natbinder-daemon", "-o"]).arg(&out))?;
    println!("RPM in {}", out.display());
    Ok(())
}

fn setup() -> Result<()> {
    run(Command::new("bash").arg(workspace_root().join("scripts/setup.sh")))
}

/// What the demo and the benchmarks need: setup without the packaging tools, minutes of building on
/// a fresh machine that neither uses.
fn setup_without_packaging() -> Result<()> {
    run(Command::new("bash").arg(workspace_root().join("scripts/setup.sh")).arg("--no-packaging"))
}

/// Re-runs this xtask command under sudo when not root (builds stay owned by the user).
fn escalate(args: &[&str]) -> Result<()> {
    let exe = std::env::current_exe()?;
    run(Command::new("sudo").arg("--preserve-env").arg(exe).args(args))
}

fn test() -> Result<()> {
    setup()?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args(["fmt", "--check", "--manifest-path", "natbinder-ebpf/Cargo.toml"]))?;
    run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    // Every parser that reads the network, fuzzed for a bounded time (before the tests, so that the
    // test summary stays the last line).
    run(Command::new("bash").arg(workspace_root().join("scripts/fuzz.sh")).arg(FUZZ_SECONDS_PER_TARGET.to_string()))?;
    // The lab tests start target/debug/natbinder and natbinder-testapp: build them first. The package
    // tests (tests/package.rs) read target/debian/natbinder_*.deb and target/rpm/natbinder-*.rpm.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    package_inputs()?;
    deb()?;
    rpm()?;
    let mut test = cargo();
    test.args(["test", "--workspace", "--no-fail-fast"]);
    if !is_root() {
        eprintln!("[xtask] the kernel and lab tests need root: running test binaries through sudo");
        test.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo --preserve-env");
    }
    let started = std::time::Instant::now();
    let (status, totals) = run_counting_tests(&mut test)?;
    // One closing line for the whole suite (cargo prints one per test binary, the last often a doc-test run).
    println!("\nsuite took {:.0} s", started.elapsed().as_secs_f64());
    println!("tests: {} passed, {} failed", totals.0, totals.1);
    if !status.success() || totals.1 > 0 {
        bail!("the test suite failed");
    }
    if totals.0 == 0 {
        bail!("the test suite ran no test");
    }
    Ok(())
}

/// Runs cargo test, echoing its output, and adds up its "test result:" lines.
fn run_counting_tests(cmd: &mut Command) -> Result<(std::process::ExitStatus, (u64, u64))> {
    use std::io::BufRead;
    eprintln!("\x1b[1;34m[xtask]\x1b[0m {}", describe(cmd));
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().context("could not start cargo test")?;
    let mut totals = (0, 0);
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0)
            };
            totals.0 += count("passed");
            totals.1 += count("failed");
        }
    }
    Ok((child.wait()?, totals))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup(),
        Task::Test => test(),
        Task::Deb { no_setup } => package(no_setup, deb),
        Task::Rpm { no_setup } => package(no_setup, rpm),
        Task::Demo { no_build } => {
            if !no_build {
                setup_without_packaging()?;
                run(cargo().args(["build", "--release", "-p", "natbinder-daemon"]))?;
            }
            if !is_root() {
                return escalate(&["demo", "--no-build"]);
            }
            demo::run()
        }
        Task::Bench { no_build, samples, protocols, natbinder, only, burst } => {
            if !no_build {
                setup_without_packaging()?;
                run(cargo().args(["build", "--release", "-p", "natbinder-daemon", "-p", "natbinder-tests", "--bins"]))?;
            }
            if !is_root() {
                let samples = samples.to_string();
                let burst = burst.to_string();
                let mut args = vec!["bench", "--no-build", "--samples", &samples, "--burst", &burst];
                for protocol in &protocols {
                    args.extend(["--protocol", protocol]);
                }
                let path = natbinder.as_ref().map(|p| p.to_string_lossy().into_owned());
                if let Some(path) = &path {
                    args.extend(["--natbinder", path]);
                }
                for part in &only {
                    args.extend(["--only", part]);
                }
                return escalate(&args);
            }
            let command = std::iter::once("cargo xtask".to_string())
                .chain(std::env::args().skip(1).filter(|a| a != "--no-build"))
                .collect::<Vec<_>>()
                .join(" ");
            let out =
                if only.is_empty() && protocols.is_empty() { workspace_root() } else { target_dir().join("bench") };
            let protocols =
                if protocols.is_empty() { vec!["upnp".into(), "pcp".into(), "natpmp".into()] } else { protocols };
            bench::run(bench::Options { samples, protocols, natbinder, only, burst, out, command })
        }
    }
}
