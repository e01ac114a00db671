//! The kernel events' intake, as the reconciler needs it before a delete.
//!
//! A program that closes one port and binds the next at once (a port search, a restart) must get the
//! new port's add before the old port's delete: the add is what someone waits for. The table orders
//! the two by when the kernel saw them (the events carry the hook's time; `table::ADD_FIRST_WINDOW`),
//! and the reconciler holds a delete while the thread that released the port still runs. What
//! neither can know is a bind the kernel already reported but the daemon has not read yet: a busy or
//! slow event loop (a debug build, a loaded machine) may be milliseconds behind. So before sending a
//! delete, the reconciler asks the event loop to read the ring buffer to its end and apply what it
//! held; one such flush covers every delete that fell due before it was asked for.
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

/// The event loop's side: each request is answered once the ring has been read to its end and its
/// events applied to the table.
pub type FlushRequests = mpsc::Receiver<oneshot::Sender<()>>;

/// The reconciler's side.
#[derive(Clone)]
pub struct IntakeFlush {
    requests: mpsc::Sender<oneshot::Sender<()>>,
}

/// How long a delete waits for the event loop at most: it is never held for long behind a loop that
/// is busy elsewhere (a reload); it then goes as it would have without the flush.
const FLUSH_LIMIT: Duration = Duration::from_millis(100);

pub fn channel() -> (IntakeFlush, FlushRequests) {
    let (requests, answered) = mpsc::channel(4);
    (IntakeFlush { requests }, answered)
}

impl IntakeFlush {
    /// Asks the event loop to read what the kernel has reported so far, and waits until it has.
    /// Returns when the flush was asked: everything the kernel reported before then is in the table
    /// (unless the loop is gone or did not answer within [`FLUSH_LIMIT`]).
    pub async fn flush(&self, now: impl Fn() -> Instant) -> Instant {
        let asked = now();
        let (done, answered) = oneshot::channel();
        if self.requests.send(done).await.is_ok() {
            let _ = tokio::time::timeout(FLUSH_LIMIT, answered).await;
        }
        asked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }

    #[tokio::test(start_paused = true)]
    async fn a_flush_returns_once_the_event_loop_has_read_the_ring() {
        let (flush, mut requests) = channel();
        let applied = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let event_loop = {
            let applied = applied.clone();
            tokio::spawn(async move {
                let done = requests.recv().await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
                applied.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = done.send(());
            })
        };
        let started = now();
        let asked = flush.flush(now).await;
        assert!(applied.load(std::sync::atomic::Ordering::SeqCst), "returned before the loop applied the events");
        assert_eq!(asked, started, "the time the flush was asked");
        event_loop.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_is_gone_or_busy_does_not_hold_the_delete() {
        let (flush, requests) = channel();
        // Busy: the request is taken but never answered.
        let started = now();
        flush.flush(now).await;
        assert_eq!(now() - started, FLUSH_LIMIT);
        // Gone.
        drop(requests);
        let started = now();
        flush.flush(now).await;
        assert_eq!(now(), started);
    }
}
