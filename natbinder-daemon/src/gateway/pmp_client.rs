//! The exchange layer shared by the NAT-PMP and PCP backends: one UDP socket to the gateway's port
//! 5351, one request in flight at a time, the RFCs' retransmission schedule, the epoch rule, and the
//! gateway's multicast announcements.
//!
//! Only the gateway is listened to. The request socket is connected to the gateway's address and port
//! 5351, so the kernel drops datagrams from anyone else and reports the gateway's ICMP port
//! unreachable as ECONNREFUSED (which ends the tries at once: nothing listens there). Announcements
//! on 224.0.0.1:5350 are accepted only from the gateway's address and port 5351.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::UdpSocket,
    sync::{mpsc, Mutex as AsyncMutex},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use super::{
    pmp_wire::{self, NatPmpBody, NatPmpResult, PcpResult, Reply},
    GatewayNews,
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

/// Which protocol's epoch a packet carries: NAT-PMP and PCP servers may count separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EpochKind {
    NatPmp,
    Pcp,
}

#[derive(Default)]
struct Epochs {
    natpmp: EpochTracker,
    pcp: EpochTracker,
    external_address: Option<IpAddr>,
}

struct Shared {
    gateway: SocketAddr,
    epochs: Mutex<Epochs>,
    news: mpsc::Sender<GatewayNews>,
}

impl Shared {
    fn tell(&self, news: GatewayNews) {
        // A full queue already holds news that makes the reconciler look at everything.
        let _ = self.news.try_send(news);
    }

    fn observe_epoch(&self, kind: EpochKind, server_secs: u32, source: &str) {
        let now = Instant::now();
        let verdict = {
            let mut epochs = self.epochs.lock().unwrap();
            match kind {
                EpochKind::NatPmp => epochs.natpmp.observe(server_secs, now),
                EpochKind::Pcp => epochs.pcp.observe(server_secs, now),
            }
        };
        if let Err(why) = verdict {
            warn!("the gateway {} lost its mappings ({why}, seen in {source}); making them again", self.gateway.ip());
            self.tell(GatewayNews::LostMappings(why));
        }
    }

    fn observe_external_address(&self, address: IpAddr) {
        let previous = self.epochs.lock().unwrap().external_address.replace(address);
        if previous.is_some_and(|p| p != address) {
            self.tell(GatewayNews::Changed);
        }
    }

    /// Takes what any reply from the gateway says about its state.
    fn observe(&self, reply: &Reply, source: &str) {
        match reply {
            Reply::NatPmp(r) => {
                // An UNSUPP_VERSION answer to a PCP request still carries the NAT-PMP epoch.
                self.observe_epoch(EpochKind::NatPmp, r.epoch_secs, source);
                if let (NatPmpResult::Success, NatPmpBody::ExternalAddress(ip)) = (r.result, r.body) {
                    self.observe_external_address(IpAddr::V4(ip));
                }
            }
            Reply::Pcp(r) if r.version == pmp_wire::PCP_VERSION => {
                self.observe_epoch(EpochKind::Pcp, r.epoch_secs, source)
            }
            Reply::Pcp(_) => {}
        }
    }
}

/// A NAT-PMP/PCP conversation with one gateway. Dropping it stops listening for announcements.
pub struct PmpClient {
    local: Ipv4Addr,
    socket: UdpSocket,
    /// One request in flight per gateway (RFC 6886 §3.1): held for a whole exchange.
    in_flight: AsyncMutex<Vec<u8>>,
    shared: Arc<Shared>,
    news: AsyncMutex<mpsc::Receiver<GatewayNews>>,
    announcements: Option<JoinHandle<()>>,
}

impl Drop for PmpClient {
    fn drop(&mut self) {
        if let Some(task) = &self.announcements {
            task.abort();
        }
    }
}

impl PmpClient {
    /// Opens the request socket from `local` to `gateway`:5351, and listens for the gateway's
    /// announcements unless `listen_for_announcements` is false (probes that may be thrown away).
    pub fn new(local: Ipv4Addr, gateway: Ipv4Addr) -> io::Result<Self> {
        let server = SocketAddr::V4(SocketAddrV4::new(gateway, pmp_wire::SERVER_PORT));
        let std_socket = std::net::UdpSocket::bind(SocketAddrV4::new(local, 0))?;
        std_socket.connect(server)?;
        std_socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(std_socket)?;
        let (tx, rx) = mpsc::channel(16);
        let shared = Arc::new(Shared { gateway: server, epochs: Mutex::default(), news: tx });
        Ok(Self {
            local,
            socket,
            in_flight: AsyncMutex::new(vec![0; pmp_wire::PCP_MAX_MESSAGE + 4]),
            shared,
            news: AsyncMutex::new(rx),
            announcements: None,
        })
    }

    /// Starts listening for the gateway's announcements (restarts, address changes). Failing to is
    /// not fatal: the epoch of the next reply tells the same, later.
    pub fn listen_for_announcements(&mut self) {
        match announcement_socket(self.local) {
            Ok(socket) => {
                let shared = self.shared.clone();
                self.announcements = Some(tokio::spawn(read_announcements(socket, shared)));
            }
            Err(e) => warn!(
                "not listening for the gateway's announcements on {}:{} ({e}); a restart is noticed at the next exchange",
                pmp_wire::ANNOUNCE_GROUP,
                pmp_wire::ANNOUNCE_PORT
            ),
        }
    }

    pub fn gateway(&self) -> SocketAddr {
        self.shared.gateway
    }

    pub fn local(&self) -> Ipv4Addr {
        self.local
    }

    /// The external address last announced or answered, if any.
    pub fn known_external_address(&self) -> Option<IpAddr> {
        self.shared.epochs.lock().unwrap().external_address
    }

    pub fn note_external_address(&self, address: IpAddr) {
        self.shared.observe_external_address(address);
    }

    /// Next news from the gateway (lost mappings, a new external address).
    pub async fn news(&self) -> GatewayNews {
        match self.news.lock().await.recv().await {
            Some(news) => news,
            None => std::future::pending().await,
        }
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
        let gateway = self.shared.gateway;
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
                        self.shared.observe(&reply, "a reply");
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

/// 224.0.0.1:5350, shared with other NAT-PMP clients on this host (SO_REUSEADDR/SO_REUSEPORT). Bound
/// to the group address, not the wildcard: it receives only announcements, and natbinder's own bind
/// hook has nothing to forward.
fn announcement_socket(local: Ipv4Addr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(pmp_wire::ANNOUNCE_GROUP, pmp_wire::ANNOUNCE_PORT)).into())?;
    socket.join_multicast_v4(&pmp_wire::ANNOUNCE_GROUP, &local)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

async fn read_announcements(socket: UdpSocket, shared: Arc<Shared>) {
    let mut buf = vec![0u8; pmp_wire::PCP_MAX_MESSAGE + 4];
    loop {
        let (len, source) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                warn!("reading the gateway's announcements: {e}; no longer listening");
                return;
            }
        };
        if source != shared.gateway {
            debug!("ignoring an announcement from {source}: only the gateway {} is listened to", shared.gateway);
            continue;
        }
        match pmp_wire::parse_reply(&buf[..len]) {
            // An announcement of either protocol is checked against that protocol's epoch, and makes the
            // client ask the gateway at once in its own protocol: miniupnpd, for one, announces a restart
            // only with PCP's ANNOUNCE, which a NAT-PMP client has no epoch of its own to compare with.
            Ok(reply @ Reply::NatPmp(r)) if r.opcode == pmp_wire::NATPMP_OP_EXTERNAL_ADDRESS => {
                info!("the gateway announced its external address (NAT-PMP, epoch {} s)", r.epoch_secs);
                shared.observe(&reply, "an announcement");
                shared.tell(GatewayNews::Changed);
            }
            Ok(reply @ Reply::Pcp(r)) if r.opcode == pmp_wire::PCP_OP_ANNOUNCE && r.result == PcpResult::Success => {
                info!("the gateway announced itself (PCP ANNOUNCE, epoch {} s)", r.epoch_secs);
                shared.observe(&reply, "an announcement");
                shared.tell(GatewayNews::Changed);
            }
            Ok(other) => debug!("ignoring a multicast packet from the gateway that is no announcement: {other:?}"),
            Err(e) => debug!("ignoring a malformed announcement from the gateway: {e}"),
        }
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
