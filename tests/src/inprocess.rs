//! The whole daemon in the test process (rathole's `run(config, shutdown)` habit): natbinder's own
//! [`run_with`] on a thread of its own that has entered lan1's network namespace, with the tests
//! reading its outcome stream. Tests wait on what natbinder says happened, not on log lines.
//!
//! Its log goes to a buffer that the harness prints when a test fails.
use std::{
    io::Write,
    sync::{mpsc, Arc, Mutex, Once},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use natbinder::{
    cli::Cli,
    daemon::run_with,
    outcome::{Event, Outcome, OutcomeBus},
};
use natbinder_lab::Netns;
use tokio::sync::{broadcast, oneshot};

/// What every in-process daemon of this test binary logged, since the harness last cleared it.
static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn install_log() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("NATBINDER_LOG").unwrap_or_else(|_| "natbinder=debug,info".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_target(false)
            .with_writer(|| LogWriter)
            .try_init();
    });
}

/// The in-process daemons' log so far.
pub fn log_text() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

fn clear_log() {
    LOG.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// How the daemon's thread is to end.
enum End {
    /// As on SIGTERM: mappings removed, hooks detached.
    Shutdown,
    /// As on SIGKILL, as far as the gateway and the journal can tell: every task dropped where it
    /// stands, nothing cleaned up. (The kernel links still go, as they do when a process dies.)
    Crash,
}

/// natbinder running in this process.
pub struct InProcessDaemon {
    thread: Option<JoinHandle<Result<()>>>,
    end: Option<oneshot::Sender<End>>,
    outcomes: mpsc::Receiver<Arc<Event>>,
    /// Everything received so far, in order.
    pub history: Vec<Arc<Event>>,
}

impl InProcessDaemon {
    /// Starts natbinder with the command line `natbinder daemon ARGS...` in network namespace `ns`.
    /// No configuration file is read unless ARGS name one.
    pub fn start(ns: &Netns, args: &[String]) -> Result<Self> {
        install_log();
        clear_log();
        let layout = natbinder::config::ConfigLayout::rooted(std::path::Path::new("/nonexistent/natbinder-tests"));
        let config = Cli::daemon_config(args, &layout)?;
        let netns = std::fs::File::open(ns.path()).with_context(|| format!("opening {}", ns.path().display()))?;
        let (events_tx, outcomes) = mpsc::channel();
        let (end_tx, end_rx) = oneshot::channel::<End>();
        let thread = std::thread::Builder::new().name("natbinder".into()).spawn(move || -> Result<()> {
            use std::os::fd::AsRawFd;
            // SAFETY: setns on this thread only; the file is open for the call. Threads the runtime
            // spawns from here (its blocking pool) inherit the namespace.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("entering the lab's namespace: {}", std::io::Error::last_os_error());
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async move {
                let bus = OutcomeBus::with_log();
                let mut rx = bus.subscribe();
                tokio::spawn(async move {
                    loop {
                        match rx.recv().await {
                            Ok(event) => {
                                if events_tx.send(event).is_err() {
                                    return;
                                }
                            }
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                panic!("the test fell {n} outcomes behind the daemon");
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                        }
                    }
                });
                let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
                let daemon = run_with(
                    config,
                    async {
                        let _ = shutdown_rx.await;
                    },
                    bus,
                );
                tokio::pin!(daemon);
                tokio::select! {
                    result = &mut daemon => result,
                    end = end_rx => match end {
                        Ok(End::Crash) => Ok(()),
                        Ok(End::Shutdown) | Err(_) => {
                            let _ = shutdown_tx.send(());
                            daemon.await
                        }
                    },
                }
            })
        })?;
        let mut daemon = Self { thread: Some(thread), end: Some(end_tx), outcomes, history: Vec::new() };
        daemon
            .wait_for(Duration::from_secs(30), |o| matches!(o, Outcome::Ready { gateway: Some(_), .. }).then_some(()))
            .context("natbinder did not become ready")?;
        Ok(daemon)
    }

    /// Waits until an outcome published after the last wait satisfies `want`, keeping every outcome in
    /// [`Self::history`]. Returns what `want` returned, and when that outcome was published.
    pub fn wait_for<T>(&mut self, limit: Duration, mut want: impl FnMut(&Outcome) -> Option<T>) -> Result<T> {
        self.wait_for_timed(limit, |o| want(o)).map(|(t, _)| t)
    }

    /// As [`Self::wait_for`], also returning when the outcome was published.
    pub fn wait_for_timed<T>(
        &mut self,
        limit: Duration,
        mut want: impl FnMut(&Outcome) -> Option<T>,
    ) -> Result<(T, Instant)> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.outcomes.recv_timeout(left) {
                Ok(event) => event,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!("no such outcome within {limit:?}; natbinder said:\n{}", self.describe_recent())
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let result = self.thread.take().map(|t| t.join());
                    bail!("natbinder ended ({result:?}) before the outcome; it said:\n{}", self.describe_recent())
                }
            };
            let found = want(&event.outcome).map(|t| (t, event.at));
            self.history.push(event);
            if let Some(found) = found {
                return Ok(found);
            }
        }
    }

    /// Takes every outcome published so far into [`Self::history`] and returns the new ones.
    pub fn drain(&mut self) -> Vec<Outcome> {
        let fresh: Vec<Arc<Event>> = self.outcomes.try_iter().collect();
        let outcomes = fresh.iter().map(|e| e.outcome.clone()).collect();
        self.history.extend(fresh);
        outcomes
    }

    /// Every outcome so far that `select` picks.
    pub fn seen<T>(&mut self, select: impl FnMut(&Outcome) -> Option<T>) -> Vec<T> {
        self.drain();
        self.history.iter().map(|e| &e.outcome).filter_map(select).collect()
    }

    fn describe_recent(&self) -> String {
        let start = self.history.len().saturating_sub(40);
        self.history[start..].iter().map(|e| format!("  {:?}\n", e.outcome)).collect()
    }

    fn end(&mut self, how: End, limit: Duration) -> Result<()> {
        let Some(end) = self.end.take() else { return Ok(()) };
        let _ = end.send(how);
        let thread = self.thread.take().ok_or_else(|| anyhow!("natbinder's thread is gone"))?;
        let started = Instant::now();
        while !thread.is_finished() {
            if started.elapsed() > limit {
                bail!("natbinder did not stop within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        thread.join().map_err(|_| anyhow!("natbinder's thread panicked"))?
    }

    /// Shuts down as on SIGTERM and waits for the daemon to finish; returns what `run` returned.
    pub fn stop(&mut self) -> Result<()> {
        self.end(End::Shutdown, Duration::from_secs(15))
    }

    /// Ends as a killed daemon does: no mapping removed, the journal as the last write left it.
    pub fn crash(&mut self) -> Result<()> {
        self.end(End::Crash, Duration::from_secs(15))
    }
}

impl Drop for InProcessDaemon {
    fn drop(&mut self) {
        let _ = self.end(End::Shutdown, Duration::from_secs(15));
    }
}
