//! The supervisor of `natbinder run --wait`, in the `run` process: it answers the program's bind()
//! calls ([`super::seccomp`]).
//!
//! A bind that natbinder would not forward (port 0, loopback, a specific address, below the lowest
//! forwarded port, an IPv6-only socket, anything but TCP and UDP) goes on at once. Any other waits
//! while the daemon asks the gateway (io.natbinder.AwaitBind), and at most `timeout`, the paper's
//! 500 ms by default. Then:
//! * the port is taken by another host: the bind fails with EADDRINUSE, without being performed;
//! * anything else (mapped, pending, not forwarded, a slow, frozen or absent daemon, the timeout):
//!   the kernel performs the bind as it would without natbinder.
//!
//! No bind ever waits longer than `timeout` plus the few system calls it takes to read its address.
//! Binds from several threads are answered concurrently.
use std::{
    io,
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

use super::seccomp::{self, BindAddress, Listener, Notification};
use crate::{control::client::Client, Family, Protocol};

/// Questions to the daemon in flight at once; more wait their turn (within their own timeout). The
/// gateway answers one request at a time anyway.
const CONCURRENT_QUESTIONS: usize = 8;

/// What the supervisor knows.
pub struct Supervisor {
    listener: Arc<Listener>,
    socket: PathBuf,
    timeout: Duration,
    min_port: u16,
    questions: Arc<Semaphore>,
    /// Problems are said once, not at every bind.
    warned_unreadable: AtomicBool,
    warned_daemon: AtomicBool,
}

/// What a bind asks for, once read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardedBind {
    pub pid: u32,
    pub protocol: Protocol,
    pub port: u16,
    pub family: Family,
}

/// The answer to one bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Proceed,
    AddressInUse,
}

impl Supervisor {
    pub fn new(listener: Listener, socket: PathBuf, timeout: Duration, min_port: u16) -> Arc<Self> {
        listener.prefer_sync_wake_up();
        Arc::new(Self {
            listener: Arc::new(listener),
            socket,
            timeout,
            min_port,
            questions: Arc::new(Semaphore::new(CONCURRENT_QUESTIONS)),
            warned_unreadable: AtomicBool::new(false),
            warned_daemon: AtomicBool::new(false),
        })
    }

    /// Answers binds until no process that carries the filter is left (the program and everything it
    /// started have exited).
    pub async fn serve(self: Arc<Self>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Notifications are taken, read and, unless they are forwarded, answered on a thread of their
        // own: that keeps a plain bind's detour short (no hand-over between threads), and taking a
        // notification may block, in the rare case that the waiting thread was interrupted between
        // the poll and the take. Forwarded binds are handed to the runtime to ask the daemon.
        let this = self.clone();
        std::thread::Builder::new()
            .name("bind-notifications".into())
            .spawn(move || this.receive_loop(&tx))
            .expect("starting the notification thread");
        while let Some((notification, bind)) = rx.recv().await {
            let this = self.clone();
            tokio::spawn(async move {
                let answer = this.ask(bind).await;
                this.answer(notification.id, answer);
            });
        }
    }

    /// Takes notifications as they come, answers those natbinder does not forward at once and hands
    /// the others over, until no process uses the filter.
    fn receive_loop(&self, forwarded: &mpsc::UnboundedSender<(Notification, ForwardedBind)>) {
        loop {
            let mut poll = libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd we own.
            let rc = unsafe { libc::poll(&mut poll, 1, -1) };
            if rc < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if poll.revents & libc::POLLIN == 0 {
                if poll.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                    return;
                }
                continue;
            }
            let n = match self.listener.receive() {
                Ok(n) => n,
                // The waiting thread went away before it could be taken.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINTR)) => continue,
                Err(_) => return,
            };
            match self.read(&n) {
                Ok(Some(bind)) => {
                    if forwarded.send((n, bind)).is_err() {
                        return;
                    }
                }
                Ok(None) => self.answer(n.id, Answer::Proceed),
                // The thread went away meanwhile (killed): nothing waits for an answer.
                Err(_) if !self.listener.still_valid(n.id) => {}
                Err(e) => {
                    if !self.warned_unreadable.swap(true, Ordering::Relaxed) {
                        eprintln!(
                            "natbinder run: cannot read a bind() of the program ({e}); its binds go on without \
                             waiting (the program may have made itself undumpable, or ptrace is restricted)"
                        );
                    }
                    self.answer(n.id, Answer::Proceed);
                }
            }
        }
    }

    fn answer(&self, id: u64, answer: Answer) {
        // An answer to a bind that is no longer waiting (its thread was killed) fails: nothing to do.
        let _ = match answer {
            Answer::Proceed => self.listener.proceed(id),
            Answer::AddressInUse => self.listener.fail(id, libc::EADDRINUSE),
        };
    }

    /// What the bind asks for, if natbinder forwards such binds; None if it goes on at once.
    fn read(&self, n: &Notification) -> io::Result<Option<ForwardedBind>> {
        let len = (n.addr_len as usize).min(128);
        let bytes = seccomp::read_memory(n.tid, n.addr, len)?;
        let Some(address) = BindAddress::parse(&bytes) else { return Ok(None) };
        if !address.is_wildcard_with_port() || address.port < self.min_port {
            return Ok(None);
        }
        let pid = seccomp::process_of_thread(n.tid)?;
        let kind = seccomp::socket_kind(pid, n.fd)?;
        // Everything read above must have come from the process still waiting in that bind.
        if !self.listener.still_valid(n.id) {
            return Ok(None);
        }
        match (kind.protocol, address.family, kind.v6only) {
            (Some(protocol), Family::Ipv4, _) | (Some(protocol), Family::Ipv6, false) => {
                Ok(Some(ForwardedBind { pid, protocol, port: address.port, family: address.family }))
            }
            // IPv6-only sockets need no IPv4 mapping; other protocols are not forwarded.
            _ => Ok(None),
        }
    }

    /// Asks the daemon, within the timeout; anything but "taken" lets the bind go on.
    async fn ask(&self, bind: ForwardedBind) -> Answer {
        let asked = tokio::time::timeout(self.timeout, async {
            let _turn = self.questions.acquire().await;
            let mut client = Client::connect(&self.socket).await?;
            let parameters = json!({
                "pid": bind.pid,
                "protocol": bind.protocol.to_string(),
                "port": bind.port,
                "family": match bind.family { Family::Ipv4 => "ipv4", Family::Ipv6 => "ipv6" },
                "v6only": false,
                "timeout_ms": self.timeout.as_millis() as u64,
            });
            client.call("io.natbinder.AwaitBind", parameters).await
        })
        .await;
        match asked {
            Ok(Ok(reply)) => match reply.get("verdict").and_then(Value::as_str) {
                Some("taken") => Answer::AddressInUse,
                _ => Answer::Proceed,
            },
            Ok(Err(e)) => {
                if !self.warned_daemon.swap(true, Ordering::Relaxed) {
                    eprintln!("natbinder run: asking natbinder about a bind failed ({e}); binds go on without waiting");
                }
                Answer::Proceed
            }
            // The daemon or the gateway is slow: the bind goes on, as the paper's IGNORED answer.
            Err(_) => Answer::Proceed,
        }
    }
}
