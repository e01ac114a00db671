//! `natbinder run [--wait] [--timeout MS] -- COMMAND ARGS...`: forwards one program's wildcard binds
//! without editing any configuration, and with `--wait` gives it the paper's bind(): it returns only
//! once the gateway has answered, and fails with EADDRINUSE when another host holds the port.
//!
//! In the CLI:
//! 1. `run` asks the daemon (io.natbinder.StartRun) to move it into a new cgroup that the daemon
//!    watches and forwards ([`cgroups`], in the daemon); everything it starts inherits that cgroup.
//! 2. Without `--wait` it then execs COMMAND: the program is the process, so signals and the exit
//!    status are its own, and nothing stands between it and the kernel.
//! 3. With `--wait` it starts COMMAND under a seccomp filter on bind() ([`seccomp`]) and stays as its
//!    supervisor ([`supervisor`]), passing on SIGINT, SIGTERM, SIGHUP (and SIGQUIT, SIGUSR1,
//!    SIGUSR2, SIGWINCH), and exits with the program's status once every process it started is gone
//!    (they all carry the filter, and their binds need an answer).
//!
//! With no daemon running, or one that does not answer, `run` says so and runs COMMAND with plain
//! binds. In the daemon, [`wait`] answers the supervisor's questions.
use std::{
    ffi::OsString,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::Args;
use serde_json::{json, Value};

use crate::control::{
    client::{Client, ClientError},
    DEFAULT_SOCKET,
};

pub mod cgroups;
pub mod seccomp;
pub mod supervisor;
pub mod systemd;
pub mod wait;

/// How long `--wait` holds a bind by default: the paper's 500 ms.
pub const DEFAULT_TIMEOUT_MS: u64 = 500;

/// How long `run` waits for the daemon to take it in before it runs the program without forwarding.
const START_TIMEOUT: Duration = Duration::from_secs(2);

/// Signals `run --wait` passes on to the program.
const PASSED_ON: [i32; 7] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH];

/// Exit statuses of `run` itself, as env(1), nice(1) and timeout(1) use them.
const CANNOT_EXECUTE: u8 = 126;
const NOT_FOUND: u8 = 127;

#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Hold each forwarded bind() until the gateway has answered, as in the Natbinder paper: a port
    /// another host holds on the gateway fails with EADDRINUSE, so the program's port search moves on.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: the longest a bind() is held, in milliseconds; then it goes on and the mapping
    /// stays pending. [default: 500]
    #[arg(long, value_name = "MS", requires = "wait", value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub timeout: Option<u64>,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Say what natbinder does for the program (on stderr).
    #[arg(long, short)]
    pub verbose: bool,
    /// The program to run, and its arguments (after `--`).
    #[arg(value_name = "COMMAND", required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

/// What the daemon said to StartRun.
struct Started {
    cgroup: String,
    min_port: u16,
}

/// Runs the command. Returns only with `--wait` (the program's status) or when COMMAND could not be
/// started; otherwise the process becomes COMMAND.
pub fn run(args: RunArgs) -> ExitCode {
    let program = args.command[0].to_string_lossy().into_owned();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("natbinder run: {e}");
            return ExitCode::from(crate::cli::show::exit::FAILED);
        }
    };
    let started = runtime.block_on(start(&args.socket, &program));
    let started = match started {
        Ok(started) => {
            if args.verbose {
                eprintln!(
                    "natbinder run: {program} runs in cgroup {}; its wildcard binds are forwarded",
                    started.cgroup
                );
            }
            Some(started)
        }
        Err(Refusal::Fatal(code, text)) => {
            eprintln!("natbinder run: {text}");
            return ExitCode::from(code);
        }
        Err(Refusal::RunPlain(text)) => {
            eprintln!("natbinder run: {text}: running {program} with plain binds, without forwarding");
            None
        }
    };
    match started {
        Some(started) if args.wait => {
            let timeout = Duration::from_millis(args.timeout.unwrap_or(DEFAULT_TIMEOUT_MS));
            runtime.block_on(supervised(&args, &program, started, timeout))
        }
        _ => {
            drop(runtime);
            exec(&args.command)
        }
    }
}

enum Refusal {
    /// Run the program anyway, without forwarding (no daemon, or it failed to take us in).
    RunPlain(String),
    /// Stop: the administrator does not allow it (an exit status and why).
    Fatal(u8, String),
}

async fn start(socket: &std::path::Path, program: &str) -> Result<Started, Refusal> {
    let asked = tokio::time::timeout(START_TIMEOUT, async {
        let mut client = Client::connect(socket).await?;
        client.call("io.natbinder.StartRun", json!({ "program": program })).await
    })
    .await;
    let reply = match asked {
        Err(_) => {
            return Err(Refusal::RunPlain(format!(
                "natbinder did not answer on {} within {START_TIMEOUT:?}",
                socket.display()
            )))
        }
        Ok(Err(ClientError::NotRunning { source, .. })) => {
            return Err(Refusal::RunPlain(format!(
                "natbinder is not running (nothing answers on {}: {source})",
                socket.display()
            )))
        }
        Ok(Err(ClientError::Failed { name, parameters, .. })) if name == "io.natbinder.NotPermitted" => {
            let text = |k: &str| parameters.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            return Err(Refusal::Fatal(
                crate::cli::show::exit::NOT_PERMITTED,
                format!("not permitted: {}. {}", text("rule"), text("fix")),
            ));
        }
        Ok(Err(ClientError::Failed { name, parameters, .. })) if name == "io.natbinder.RunRefused" => {
            let problem = parameters.get("problem").and_then(Value::as_str).unwrap_or("?");
            return Err(Refusal::RunPlain(format!("natbinder could not take the program in ({problem})")));
        }
        Ok(Err(e)) => return Err(Refusal::RunPlain(format!("natbinder could not take the program in ({e})"))),
        Ok(Ok(reply)) => reply,
    };
    let cgroup = reply.get("cgroup").and_then(Value::as_str).unwrap_or("?").to_string();
    let min_port = reply.get("min_port").and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()).unwrap_or(1024);
    Ok(Started { cgroup, min_port })
}

/// Becomes COMMAND; returns only if that fails.
fn exec(command: &[OsString]) -> ExitCode {
    let error = std::process::Command::new(&command[0]).args(&command[1..]).exec();
    cannot_start(&command[0], &error)
}

fn cannot_start(program: &OsString, error: &std::io::Error) -> ExitCode {
    eprintln!("natbinder run: cannot run {}: {error}", program.to_string_lossy());
    ExitCode::from(if error.kind() == std::io::ErrorKind::NotFound { NOT_FOUND } else { CANNOT_EXECUTE })
}

/// `--wait`: starts COMMAND under the bind filter, answers its binds, passes signals on, and returns
/// its exit status once everything it started has exited.
async fn supervised(args: &RunArgs, program: &str, started: Started, timeout: Duration) -> ExitCode {
    let signals = match PassedSignals::block() {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("natbinder run: cannot take over signals ({e}): running {program} without --wait");
            return exec(&args.command);
        }
    };
    let (ours, theirs) = match std::os::unix::net::UnixDatagram::pair() {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("natbinder run: {e}: running {program} without --wait");
            signals.unblock();
            return exec(&args.command);
        }
    };
    let filter = seccomp::BindFilter::new();
    // SAFETY: geteuid cannot fail.
    let unprivileged = unsafe { libc::geteuid() } != 0;
    let channel = theirs.as_raw_fd();
    let mut command = tokio::process::Command::new(&args.command[0]);
    command.args(&args.command[1..]);
    // SAFETY: between fork and exec the closure only makes system calls and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            // The program goes with `run`: without its supervisor its binds would fail (ENOSYS).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = filter.install(unprivileged)?;
            let sent = seccomp::send_fd(channel, fd);
            libc::close(fd);
            sent
        });
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            signals.unblock();
            return cannot_start(&args.command[0], &e);
        }
    };
    drop(theirs);
    let listener = match seccomp::receive_fd(ours.as_raw_fd()) {
        Ok(fd) => seccomp::Listener::new(fd),
        Err(e) => {
            eprintln!("natbinder run: the bind filter's listener did not arrive ({e}); stopping {program}");
            let _ = child.kill().await;
            return ExitCode::from(crate::cli::show::exit::FAILED);
        }
    };
    if args.verbose {
        eprintln!("natbinder run: holding {program}'s forwarded binds until the gateway answers (at most {timeout:?})");
    }
    let child_pid = child.id().unwrap_or(0) as i32;
    let supervisor = supervisor::Supervisor::new(listener, args.socket.clone(), timeout, started.min_port);
    let mut serving = tokio::spawn(supervisor.serve());
    let mut status = None;
    let mut signals = signals;
    // Until the program has exited and every process carrying the filter is gone.
    loop {
        tokio::select! {
            exited = child.wait(), if status.is_none() => {
                status = Some(exited);
            }
            signal = signals.next() => {
                if let Some((signo, from_terminal)) = signal {
                    // The terminal signals the whole foreground process group: the program got it too.
                    if !from_terminal && child_pid > 0 && status.is_none() {
                        // SAFETY: kill(2) on our own child, which we have not reaped.
                        unsafe { libc::kill(child_pid, signo) };
                    }
                }
            }
            _ = &mut serving => break,
        }
    }
    if status.is_none() {
        status = Some(child.wait().await);
    }
    signals.unblock();
    match status {
        Some(Ok(status)) => exit_like(status),
        Some(Err(e)) => {
            eprintln!("natbinder run: waiting for {program}: {e}");
            ExitCode::from(crate::cli::show::exit::FAILED)
        }
        None => unreachable!("set above"),
    }
}

/// Ends as the program ended: the same exit code, or the same signal.
fn exit_like(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return ExitCode::from(code as u8);
    }
    if let Some(signo) = status.signal() {
        // SAFETY: restoring the default action and raising the signal on ourselves; if it does not
        // end us (it is ignored by default), the shell's convention follows.
        unsafe {
            libc::signal(signo, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signo);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            // No core file from `run` for the program's crash.
            let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            libc::kill(libc::getpid(), signo);
        }
        return ExitCode::from(128 + signo as u8);
    }
    ExitCode::from(crate::cli::show::exit::FAILED)
}

/// The signals `run --wait` passes on, taken from a signalfd, which says who sent each.
struct PassedSignals {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    set: libc::sigset_t,
}

impl PassedSignals {
    /// Blocks [`PASSED_ON`] in this thread (the program gets a clean mask: std resets it in the child)
    /// and opens a signalfd for them.
    fn block() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: sigset manipulation on a local set; signalfd returns an fd we own at once.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for signo in PASSED_ON {
                libc::sigaddset(&mut set, signo);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                return Err(e);
            }
            let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
            // The AsyncFd owns the fd, so it stays open while registered.
            let fd = tokio::io::unix::AsyncFd::register(owned).map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(Self { fd, set })
        }
    }

    /// The next signal, and whether the terminal sent it (SI_KERNEL) rather than a process (kill).
    async fn next(&mut self) -> Option<(i32, bool)> {
        loop {
            let mut guard = self.fd.readable().await.ok()?;
            let read = guard.try_io(|fd| {
                // SAFETY: signalfd reads whole signalfd_siginfo records into the buffer we own.
                let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
                let size = std::mem::size_of::<libc::signalfd_siginfo>();
                let n = unsafe { libc::read(fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(info)
            });
            match read {
                Ok(Ok(info)) => return Some((info.ssi_signo as i32, info.ssi_code == libc::SI_KERNEL)),
                Ok(Err(_)) => return None,
                Err(_would_block) => continue,
            }
        }
    }

    fn unblock(&self) {
        // SAFETY: unblocking the signals this blocked.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.set, std::ptr::null_mut()) };
    }
}
