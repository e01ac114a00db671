//! Short waits to the microsecond, beside tokio's timer.
//!
//! tokio's timer wheel turns in whole milliseconds and rounds a deadline up to its next tick, and its
//! driver sleeps in epoll_wait, whose timeout is in milliseconds too: a wait of 0.5 ms ends 1 to 2.5 ms
//! later (measured in the benchmarks: a released port's delete, held 0.5 ms, went out 1.38 ms after
//! the release, p50). A delete held while the thread that released its port still runs waits in
//! steps of 100 us, and close() to deleted is measured against the gateway's own delete. A timerfd
//! on CLOCK_MONOTONIC, the clock under std's and tokio's `Instant`, wakes epoll at its deadline, so
//! near deadlines get one. tokio's sleep still runs beside it: it is what a test with paused time
//! advances, and the wait if there is no timerfd.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use tokio::{
    io::{unix::AsyncFd, Interest},
    time::Instant,
};
use tracing::debug;

/// Deadlines at most this far away are kept to the microsecond; on a longer wait, tokio's millisecond
/// does not matter.
const PRECISE_UP_TO: Duration = Duration::from_millis(10);

pub struct PreciseTimer {
    /// None if no timerfd could be made (then waits are tokio's).
    fd: Option<AsyncFd<OwnedFd>>,
}

impl PreciseTimer {
    /// Must be called within the runtime (the timerfd is registered with its driver).
    pub fn new() -> Self {
        // SAFETY: a plain syscall; the fd it returns is owned right below.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        let fd = if raw >= 0 {
            // SAFETY: a new fd that nothing else owns.
            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: the AsyncFd owns the fd, so it stays open for as long as it is registered.
            unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }.ok()
        } else {
            None
        };
        if fd.is_none() {
            debug!("no timerfd ({}): short waits are to the millisecond", io::Error::last_os_error());
        }
        Self { fd }
    }

    /// Returns at `deadline`: to the microsecond if it is near, else as `tokio::time::sleep_until`.
    /// Never earlier. Cancel-safe: a wait dropped before its end leaves at most a stale expiry, which
    /// the next wait's arming discards.
    pub async fn sleep_until(&self, deadline: Instant) {
        let tokio_sleep = tokio::time::sleep_until(deadline);
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(fd) = self.fd.as_ref().filter(|_| !left.is_zero() && left <= PRECISE_UP_TO) else {
            return tokio_sleep.await;
        };
        if let Err(e) = arm(fd.get_ref(), left) {
            debug!("arming the timerfd: {e}");
            return tokio_sleep.await;
        }
        tokio::select! {
            _ = tokio_sleep => {}
            _ = expired(fd) => {}
        }
    }
}

/// Arms the timer to expire once, `after` from now; this replaces an earlier arming and its count.
fn arm(fd: &OwnedFd, after: Duration) -> io::Result<()> {
    let zero = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    let spec = libc::itimerspec {
        it_interval: zero,
        it_value: libc::timespec { tv_sec: after.as_secs() as libc::time_t, tv_nsec: after.subsec_nanos().into() },
    };
    // SAFETY: a valid timerfd and itimerspec; flags 0: relative to now.
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Until the timer's expiry count can be read.
async fn expired(fd: &AsyncFd<OwnedFd>) {
    loop {
        let Ok(mut ready) = fd.readable().await else {
            // The runtime is shutting down: leave the wait to tokio's sleep.
            return std::future::pending().await;
        };
        let mut count = [0u8; 8];
        // SAFETY: reads at most 8 bytes into an 8-byte buffer from a valid fd.
        let read = unsafe { libc::read(fd.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
        if read == 8 {
            return;
        }
        // EAGAIN: readiness left from an expiry that a later arming discarded.
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_short_wait_ends_at_its_deadline_not_at_tokios_next_millisecond() {
        let timer = PreciseTimer::new();
        assert!(timer.fd.is_some(), "no timerfd");
        let mut took = Vec::new();
        for _ in 0..21 {
            let started = Instant::now();
            let deadline = started + Duration::from_micros(100);
            timer.sleep_until(deadline).await;
            assert!(Instant::now() >= deadline, "returned before its deadline");
            took.push(started.elapsed());
        }
        took.sort();
        // tokio's sleep alone takes 0.5-2 ms for this (its next tick, then epoll's millisecond).
        assert!(took[10] < Duration::from_micros(600), "median wait of 100 us: {:?}", took[10]);
    }

    #[tokio::test(start_paused = true)]
    async fn with_paused_time_waits_follow_tokios_clock() {
        let timer = PreciseTimer::new();
        let started = Instant::now();
        timer.sleep_until(started + Duration::from_secs(3600)).await;
        timer.sleep_until(Instant::now() + Duration::from_millis(1)).await;
        assert!(Instant::now() >= started + Duration::from_secs(3600) + Duration::from_millis(1));
    }

    #[tokio::test]
    async fn a_wait_dropped_halfway_does_not_end_the_next_one_early() {
        let timer = PreciseTimer::new();
        let _ = tokio::time::timeout(
            Duration::from_micros(200),
            timer.sleep_until(Instant::now() + Duration::from_millis(5)),
        )
        .await;
        // The first arming's expiry passes during this wait; the second arming replaced it.
        let deadline = Instant::now() + Duration::from_millis(8);
        timer.sleep_until(deadline).await;
        assert!(Instant::now() >= deadline);
    }
}
