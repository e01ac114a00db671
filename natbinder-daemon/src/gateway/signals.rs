//! The one channel by which every sign that the gateway changed or lost its state reaches the
//! reconciler: a network change (rtnetlink), the gateway's SSDP announcements, its NAT-PMP/PCP
//! announcements, an epoch that went back in a reply, and SIGHUP's "check now".
//!
//! Signals are merged rather than queued: what matters is that the reconciler learns of each kind of
//! sign, not how many came. So a LAN host flooding forged announcements costs a bounded amount of
//! memory, and no sign can push another out.
use std::{
    collections::VecDeque,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::sync::Notify;

/// Which protocol an announcement came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnnouncedBy {
    /// NAT-PMP's external address announcement (RFC 6886 §3.2.1).
    NatPmp,
    /// PCP's ANNOUNCE (RFC 6887 §14.1).
    Pcp,
}

/// A NAT-PMP or PCP announcement from the gateway (checked to come from its address and port 5351).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub by: AnnouncedBy,
    /// The gateway's seconds since its state began, for the epoch rule.
    pub epoch_secs: u32,
    /// NAT-PMP announcements carry the external address.
    pub external_address: Option<Ipv4Addr>,
    pub received: Instant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// The way to the gateway changed, or the gateway restarted or moved: find it again.
    Rediscover(String),
    /// The gateway of session `session` lost its mappings (its epoch went back): make them all again.
    LostMappings { session: u64, why: String },
    /// The gateway announced itself: check its epoch, and check and repair every mapping now.
    Announced(Announcement),
    /// Check the gateway and the sockets now (SIGHUP).
    CheckNow,
}

/// How many announcements are kept until the reconciler reads them; older ones carry nothing the
/// newer ones do not.
const KEPT_ANNOUNCEMENTS: usize = 4;

#[derive(Default)]
struct Merged {
    rediscover: Option<String>,
    lost: Option<(u64, String)>,
    announcements: VecDeque<Announcement>,
    check_now: bool,
}

impl Merged {
    fn take(&mut self) -> Option<Signal> {
        if let Some(why) = self.rediscover.take() {
            return Some(Signal::Rediscover(why));
        }
        if let Some((session, why)) = self.lost.take() {
            return Some(Signal::LostMappings { session, why });
        }
        if let Some(a) = self.announcements.pop_front() {
            return Some(Signal::Announced(a));
        }
        std::mem::take(&mut self.check_now).then_some(Signal::CheckNow)
    }
}

/// The reconciler's end.
#[derive(Clone, Default)]
pub struct Signals {
    inner: Arc<(Mutex<Merged>, Notify)>,
}

impl Signals {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn sender(&self) -> SignalSender {
        SignalSender { inner: self.inner.clone() }
    }

    /// The most urgent pending signal, if any.
    pub fn try_next(&self) -> Option<Signal> {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Waits until a [`Signal::Rediscover`] is pending and takes it, leaving every other signal for
    /// [`Signals::next`]: what may interrupt a gateway call in flight. Cancel-safe.
    pub async fn until_rediscover(&self) -> String {
        loop {
            if let Some(why) = self.inner.0.lock().unwrap_or_else(|e| e.into_inner()).rediscover.take() {
                return why;
            }
            self.inner.1.notified().await;
        }
    }

    /// Waits for the next signal. Cancel-safe: a signal is taken only when this returns it.
    pub async fn next(&self) -> Signal {
        loop {
            if let Some(signal) = self.try_next() {
                return signal;
            }
            self.inner.1.notified().await;
        }
    }
}

/// Where signals are sent from. Cheap to clone.
#[derive(Clone)]
pub struct SignalSender {
    inner: Arc<(Mutex<Merged>, Notify)>,
}

impl SignalSender {
    pub fn send(&self, signal: Signal) {
        {
            let mut merged = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
            match signal {
                Signal::Rediscover(why) => merged.rediscover = Some(why),
                Signal::LostMappings { session, why } => merged.lost = Some((session, why)),
                Signal::Announced(a) => {
                    if merged.announcements.len() == KEPT_ANNOUNCEMENTS {
                        merged.announcements.pop_front();
                    }
                    merged.announcements.push_back(a);
                }
                Signal::CheckNow => merged.check_now = true,
            }
        }
        self.inner.1.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(epoch_secs: u32) -> Announcement {
        Announcement { by: AnnouncedBy::Pcp, epoch_secs, external_address: None, received: Instant::now() }
    }

    #[test]
    fn the_most_urgent_sign_comes_first_and_a_flood_is_bounded() {
        let signals = Signals::new();
        let tx = signals.sender();
        for epoch in 0..1000 {
            tx.send(Signal::Announced(announcement(epoch)));
        }
        tx.send(Signal::CheckNow);
        tx.send(Signal::LostMappings { session: 3, why: "epoch".into() });
        tx.send(Signal::Rediscover("route".into()));
        tx.send(Signal::Rediscover("route changed again".into()));
        assert_eq!(signals.try_next(), Some(Signal::Rediscover("route changed again".into())));
        assert_eq!(signals.try_next(), Some(Signal::LostMappings { session: 3, why: "epoch".into() }));
        let kept: Vec<Signal> = (996..1000).map(|epoch| Signal::Announced(announcement(epoch))).collect();
        let taken: Vec<Signal> = (0..4).filter_map(|_| signals.try_next()).collect();
        assert_eq!(
            taken.iter().map(epoch_of).collect::<Vec<_>>(),
            kept.iter().map(epoch_of).collect::<Vec<_>>(),
            "the newest announcements are kept, the rest merged away"
        );
        assert_eq!(signals.try_next(), Some(Signal::CheckNow));
        assert_eq!(signals.try_next(), None);
    }

    fn epoch_of(signal: &Signal) -> Option<u32> {
        match signal {
            Signal::Announced(a) => Some(a.epoch_secs),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_waiting_reconciler_is_woken_and_nothing_is_lost_to_a_cancelled_wait() {
        let signals = Signals::new();
        let tx = signals.sender();
        // A wait that is given up before anything comes takes nothing with it.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(5), signals.next()).await;
        tx.send(Signal::CheckNow);
        assert_eq!(signals.next().await, Signal::CheckNow);
        let waiter = tokio::spawn({
            let signals = signals.clone();
            async move { signals.next().await }
        });
        tokio::task::yield_now().await;
        tx.send(Signal::Rediscover("new default route".into()));
        assert_eq!(waiter.await.unwrap(), Signal::Rediscover("new default route".into()));
    }
}
