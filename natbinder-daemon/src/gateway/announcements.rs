//! The gateway's announcements, heard whichever protocol serves and also while no gateway is in use
//! (a gateway that comes back announces itself, and natbinder then searches at once):
//! * SSDP NOTIFY on 239.255.255.250:1900: a new boot id or description URL, or a goodbye, means the
//!   gateway restarted or moved ([`ssdp_notify::RestartDetector`]): find it again;
//! * NAT-PMP and PCP announcements on 224.0.0.1:5350: the session checks the epoch they carry, and
//!   checks and repairs every mapping at once.
//!
//! Only the default gateway is listened to: SSDP from its address, NAT-PMP/PCP from its address and
//! port 5351. Any LAN device can multicast. The sockets follow [`LanWatch`]: a new gateway or a new
//! address of this host reopens them.
use std::net::{IpAddr, SocketAddr};

use tokio::{net::UdpSocket, sync::watch};
use tracing::{debug, info, warn};

use super::{
    multicast,
    pmp_wire::{self, PcpResult, Reply},
    signals::{AnnouncedBy, Announcement, Signal, SignalSender},
    ssdp_notify::{self, RestartDetector},
};
use crate::host::lan::{LanInfo, LanWatch};

struct Listeners {
    lan: LanInfo,
    ssdp: Option<UdpSocket>,
    port_control: Option<UdpSocket>,
    detector: RestartDetector,
}

impl Listeners {
    fn open(lan: LanInfo) -> Self {
        let ssdp = multicast::listen(ssdp_notify::SSDP_GROUP, ssdp_notify::SSDP_PORT, lan.local)
            .map_err(|e| {
                warn!(
                    "not listening for the gateway's SSDP announcements ({e}); restarts are noticed at the next check"
                )
            })
            .ok();
        let port_control = multicast::listen(pmp_wire::ANNOUNCE_GROUP, pmp_wire::ANNOUNCE_PORT, lan.local)
            .map_err(|e| {
                warn!("not listening for the gateway's NAT-PMP/PCP announcements ({e}); a restart is noticed at the next exchange")
            })
            .ok();
        Self { lan, ssdp, port_control, detector: RestartDetector::default() }
    }
}

async fn receive(socket: &Option<UdpSocket>, buf: &mut [u8]) -> (usize, SocketAddr) {
    match socket {
        Some(socket) => loop {
            match socket.recv_from(buf).await {
                Ok(received) => return received,
                // ICMP errors and the like on a multicast socket: nothing to do but go on listening.
                Err(e) => debug!("reading an announcement socket: {e}"),
            }
        },
        None => std::future::pending().await,
    }
}

/// Listens until `stop` turns true, sending what the gateway announces to `signals`.
pub async fn listen(lan: LanWatch, signals: SignalSender, mut stop: watch::Receiver<bool>) {
    let mut lan_changes = lan.subscribe();
    let mut listeners = lan.current().map(Listeners::open);
    let mut ssdp_buf = vec![0u8; ssdp_notify::MAX_DATAGRAM + 1];
    let mut pmp_buf = vec![0u8; pmp_wire::PCP_MAX_MESSAGE + 4];
    loop {
        let none = (None, None);
        let (ssdp, port_control) = match &listeners {
            Some(l) => (&l.ssdp, &l.port_control),
            None => (&none.0, &none.1),
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            changed = lan_changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = *lan_changes.borrow_and_update();
                if now != listeners.as_ref().map(|l| l.lan) {
                    listeners = now.map(Listeners::open);
                }
            }
            (len, source) = receive(ssdp, &mut ssdp_buf) => {
                if let Some(l) = &mut listeners {
                    ssdp_announcement(l, &ssdp_buf[..len], source, &signals);
                }
            }
            (len, source) = receive(port_control, &mut pmp_buf) => {
                if let Some(l) = &listeners {
                    port_control_announcement(&l.lan, &pmp_buf[..len], source, &signals);
                }
            }
        }
    }
}

fn ssdp_announcement(l: &mut Listeners, datagram: &[u8], source: SocketAddr, signals: &SignalSender) {
    if !ssdp_notify::from_gateway(source, l.lan.gateway) {
        return;
    }
    let Some(notify) = ssdp_notify::parse_notify(datagram) else { return };
    if l.detector.changed(&notify) {
        let why = format!(
            "the gateway announced a restart or move ({:?}, boot id {:?}, {})",
            notify.kind,
            notify.boot_id,
            notify.location.as_deref().unwrap_or("no location")
        );
        info!("{why}");
        signals.send(Signal::Rediscover(why));
    } else {
        debug!("gateway announcement: {:?}", notify.kind);
    }
}

fn port_control_announcement(lan: &LanInfo, datagram: &[u8], source: SocketAddr, signals: &SignalSender) {
    let gateway = SocketAddr::new(IpAddr::V4(lan.gateway), pmp_wire::SERVER_PORT);
    if source != gateway {
        debug!("ignoring an announcement from {source}: only the gateway {gateway} is listened to");
        return;
    }
    let announcement = match pmp_wire::parse_reply(datagram) {
        Ok(Reply::NatPmp(r)) if r.opcode == pmp_wire::NATPMP_OP_EXTERNAL_ADDRESS => {
            info!("the gateway announced its external address (NAT-PMP, epoch {} s)", r.epoch_secs);
            let external_address = match (r.result, r.body) {
                (pmp_wire::NatPmpResult::Success, pmp_wire::NatPmpBody::ExternalAddress(ip)) => Some(ip),
                _ => None,
            };
            Announcement {
                by: AnnouncedBy::NatPmp,
                epoch_secs: r.epoch_secs,
                external_address,
                received: std::time::Instant::now(),
            }
        }
        Ok(Reply::Pcp(r)) if r.opcode == pmp_wire::PCP_OP_ANNOUNCE && r.result == PcpResult::Success => {
            info!("the gateway announced itself (PCP ANNOUNCE, epoch {} s)", r.epoch_secs);
            Announcement {
                by: AnnouncedBy::Pcp,
                epoch_secs: r.epoch_secs,
                external_address: None,
                received: std::time::Instant::now(),
            }
        }
        Ok(other) => {
            debug!("ignoring a multicast packet from the gateway that is no announcement: {other:?}");
            return;
        }
        Err(e) => {
            debug!("ignoring a malformed announcement from the gateway: {e}");
            return;
        }
    };
    signals.send(Signal::Announced(announcement));
}
