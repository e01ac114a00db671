//! The exchange layer shared by the NAT-PMP and PCP backends: one UDP socket to the gateway's port
//! 5351, one request in flight at a time, the RFCs' retransmission schedule, and the epoch rule.
//!
//! Only the gateway is listened to. The request socket is connected to the gateway's address and port
//! 5351, so the kernel drops datagrams from anyone else and reports the gateway's ICMP port
//! unreachable as ECONNREFUSED (which ends the tries at once: nothing listens there). The gateway's
//! multicast announcements are heard by [`super::announcements`]; their epoch is checked here too.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::Duration,
};

use tokio::{net::UdpSocket, sync::Mutex as AsyncMutex, time::Instant};
use tracing::debug;

use super::{
    pmp_wire::{self, Reply},
    signals::{AnnouncedBy, Announcement, Signal, SignalSender},
};

/// RFC 6886 §3.1 and RFC 6887 §8.1.1: the first retransmission after 250 ms, the interval doubling,
/// nine tries in all.
pub const FIRST_RETRANSMISSION: Duration = Duration::from_millis(250);
pub const MAX_TRIES: u32 = 9;

/// How a request came to no answer.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// ICMP port unreachable: no NAT-PMP/PCP server runs on the gateway.
    #[error("the gateway refused (ICMP port unreachable): no NAT-PMP/PCP server listens on {0}")]
    PortUnreachable(SocketAddr),
    #[error("no answer from {gateway} after {tries} tries over {elapsed:?}")]
    NoAnswer { gateway: SocketAddr, tries: u32, elapsed: Duration },
    #[error("talking to {0}: {1}")]
    Io(SocketAddr, io::Error),
}

/// The epoch rule (RFC 6887 §8.5, which also covers RFC 6886 §3.6): the gateway's seconds since its
/// state began must advance like this host's clock. If they go back, or drift apart by more than 2 s
/// plus 1/16, the gateway lost its state (it restarted) and every mapping must be made again.
#[derive(Debug, Default)]
pub struct EpochTracker {
    last: Option<(u32, Instant)>,
}

impl EpochTracker {
    /// Records the gateway's epoch as read at `now`. Err names why it means lost state.
    pub fn observe(&mut self, server_secs: u32, now: Instant) -> Result<(), String> {
        let previous = self.last.replace((server_secs, now));
        let Some((last_server, last_client)) = previous else { return Ok(()) };
        if u64::from(server_secs) + 1 < u64::from(last_server) {
            return Err(format!("its epoch went back from {last_server} s to {server_secs} s"));
        }
        let server_delta = f64::from(server_secs.saturating_sub(last_server));
        let client_delta = now.saturating_duration_since(last_client).as_secs_f64();
        if client_delta + 2.0 < server_delta - server_delta / 16.0
            || server_delta + 2.0 < client_delta - client_delta / 16.0
        {
            return Err(format!(
                "its epoch advanced {server_delta:.0} s while {client_delta:.1} s passed here (epoch now {server_secs} s)"
            ));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Epochs {
    natpmp: EpochTracker,
    pcp: EpochTracker,
}

/// A NAT-PMP/PCP conversation with one gateway, from one address of this host: the IPv4 one for
/// mappings, or (PCP only) an IPv6 one for that address's pinholes.
pub struct PmpClient {
    local: IpAddr,
    gateway: SocketAddr,
    socket: UdpSocket,
    /// One request in flight per gateway (RFC 6886 §3.1): held for a whole exchange.
    in_flight: AsyncMutex<Vec<u8>>,
    /// NAT-PMP and PCP servers may count their epochs separately.
    epochs: Mutex<Epochs>,
    /// Where "the gateway lost its state" goes, tagged with the session this client serves.
    signals: SignalSender,
    session: u64,
}

impl PmpClient {
    /// Opens the request socket from `local` to `gateway` (port 5351; an IPv6 link-local gateway with
    /// its scope), for gateway session `session`.
    pub fn new(local: IpAddr, gateway: SocketAddr, signals: SignalSender, session: u64) -> io::Result<Self> {
        let server = gateway;
        let std_socket = std::net::UdpSocket::bind(SocketAddr::new(local, 0))?;
        std_socket.connect(server)?;
        std_socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(std_socket)?;
        Ok(Self {
            local,
            gateway: server,
            socket,
            in_flight: AsyncMutex::new(vec![0; pmp_wire::PCP_MAX_MESSAGE + 4]),
            epochs: Mutex::default(),
            signals,
            session,
        })
    }

    pub fn gateway(&self) -> SocketAddr {
        self.gateway
    }

    pub fn local(&self) -> IpAddr {
        self.local
    }

    /// A client for the same gateway session from another address of this host to another address
    /// of the gateway (PCP over IPv6): what its replies tell of the gateway's state is reported as
    /// this one's is.
    pub fn from_other_address(&self, local: IpAddr, gateway: SocketAddr) -> io::Result<Self> {
        Self::new(local, gateway, self.signals.clone(), self.session)
    }

    /// Feeds one epoch to the rule. Err names why it means the gateway lost its state.
    fn observe_epoch(&self, by: AnnouncedBy, server_secs: u32, at: Instant) -> Result<(), String> {
        let mut epochs = self.epochs.lock().unwrap_or_else(|e| e.into_inner());
        match by {
            AnnouncedBy::NatPmp => epochs.natpmp.observe(server_secs, at),
            AnnouncedBy::Pcp => epochs.pcp.observe(server_secs, at),
        }
    }

    /// What any reply from the gateway says about its state: an epoch that breaks the rule is sent on
    /// as "lost its mappings".
    fn observe_reply(&self, reply: &Reply) {
        let verdict = match reply {
            // An UNSUPP_VERSION answer to a PCP request still carries the NAT-PMP epoch.
            Reply::NatPmp(r) => self.observe_epoch(AnnouncedBy::NatPmp, r.epoch_secs, Instant::now()),
            Reply::Pcp(r) if r.version == pmp_wire::PCP_VERSION => {
                self.observe_epoch(AnnouncedBy::Pcp, r.epoch_secs, Instant::now())
            }
            Reply::Pcp(_) => Ok(()),
        };
        if let Err(why) = verdict {
            self.signals.send(Signal::LostMappings { session: self.session, why: format!("{why}, seen in a reply") });
        }
    }

    /// Checks an announcement's epoch. Some(why) when it shows the gateway lost its state.
    pub fn observe_announcement(&self, announcement: &Announcement) -> Option<String> {
        self.observe_epoch(announcement.by, announcement.epoch_secs, Instant::from_std(announcement.received))
            .err()
            .map(|why| format!("{why}, seen in an announcement"))
    }

    /// Sends `request` and returns the first reply `accepts` takes, retransmitting on the RFC schedule
    /// until `deadline` (if any) or the tries run out. Replies it does not take (late duplicates of an
    /// earlier exchange, say) are ignored. Every reply taken feeds the epoch rule.
    pub async fn exchange(
        &self,
        request: &[u8],
        accepts: impl Fn(&Reply) -> bool,
        deadline: Option<Instant>,
    ) -> Result<Reply, ExchangeError> {
        let gateway = self.gateway;
        let mut buf = self.in_flight.lock().await;
        let started = Instant::now();
        let mut wait = FIRST_RETRANSMISSION;
        for attempt in 1..=MAX_TRIES {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ExchangeError::NoAnswer { gateway, tries: attempt - 1, elapsed: started.elapsed() });
            }
            match self.socket.send(request).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    return Err(ExchangeError::PortUnreachable(gateway))
                }
                Err(e) => return Err(ExchangeError::Io(gateway, e)),
            }
            let mut until = Instant::now() + wait;
            if let Some(d) = deadline {
                until = until.min(d);
            }
            loop {
                let received = match tokio::time::timeout_at(until, self.socket.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        return Err(ExchangeError::PortUnreachable(gateway))
                    }
                    Ok(Err(e)) => return Err(ExchangeError::Io(gateway, e)),
                    Ok(Ok(n)) => n,
                };
                match pmp_wire::parse_reply(&buf[..received]) {
                    Ok(reply) if accepts(&reply) => {
                        self.observe_reply(&reply);
                        return Ok(reply);
                    }
                    Ok(reply) => debug!("ignoring a reply from {gateway} that answers another request: {reply:?}"),
                    Err(e) => debug!("ignoring a malformed packet from {gateway}: {e}"),
                }
            }
            wait = wait.saturating_mul(2);
        }
        Err(ExchangeError::NoAnswer { gateway, tries: MAX_TRIES, elapsed: started.elapsed() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, secs: f64) -> Instant {
        base + Duration::from_secs_f64(secs)
    }

    #[test]
    fn an_epoch_that_keeps_time_is_fine() {
        let t0 = Instant::now();
        let mut e = EpochTracker::default();
        assert!(e.observe(1000, t0).is_ok());
        assert!(e.observe(1060, at(t0, 60.0)).is_ok());
        // A second of rounding either way, and the 2 s slack.
        assert!(e.observe(1061, at(t0, 62.5)).is_ok());
        assert!(e.observe(1061, at(t0, 62.9)).is_ok());
    }

    #[test]
    fn an_epoch_that_goes_back_means_lost_state() {
        let t0 = Instant::now();
        let mut e = EpochTracker::default();
        e.observe(5000, t0).unwrap();
        let why = e.observe(3, at(t0, 10.0)).unwrap_err();
        assert!(why.contains("went back"), "{why}");
        // The new epoch is the reference from then on.
        assert!(e.observe(13, at(t0, 20.0)).is_ok());
    }

    #[test]
    fn an_epoch_that_runs_slow_means_a_restart_in_between() {
        // The gateway restarted 100 s ago, after the last reply 1000 s ago: its epoch (100) is below
        // the previous one plus the elapsed time, though not below the previous one.
        let t0 = Instant::now();
        let mut e = EpochTracker::default();
        e.observe(50, t0).unwrap();
        let why = e.observe(100, at(t0, 1000.0)).unwrap_err();
        assert!(why.contains("advanced 50 s"), "{why}");
    }

    #[test]
    fn an_epoch_that_runs_fast_is_also_suspect() {
        let t0 = Instant::now();
        let mut e = EpochTracker::default();
        e.observe(100, t0).unwrap();
        assert!(e.observe(10_000, at(t0, 10.0)).is_err());
    }
}
