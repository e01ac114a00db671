//! Watching for signs that the way to the gateway changed, and telling the reconciler.
//!
//! * rtnetlink: links, IPv4 addresses and routes. After a burst of changes settles, the default route's
//!   gateway and this host's address are read again; if they differ, the old gateway's mappings are no
//!   use and the new gateway must be found and mapped.
//! * SSDP announcements from the gateway: a new boot id or description URL, or a goodbye, mean it
//!   restarted or moved (see [`crate::gateway::ssdp_notify`]).
use std::{sync::Arc, time::Duration};

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::{io::unix::AsyncFd, net::UdpSocket, sync::watch};
use tracing::{debug, info, warn};

use crate::{
    gateway::ssdp_notify::{self, RestartDetector},
    netinfo::{self, LanInfo},
    reconcile::Shared,
};

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
/// Network changes come in bursts (link up, address, routes): act once it is quiet for this long.
const SETTLE: Duration = Duration::from_millis(300);

fn route_monitor() -> std::io::Result<AsyncFd<Socket>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind(&SocketAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE))?;
    socket.set_non_blocking(true)?;
    // SAFETY: the fd belongs to `socket`, owned by the AsyncFd for as long as it is registered.
    unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// Reads everything queued on the netlink socket; the content does not matter, only that it changed.
fn drain(socket: &Socket) {
    let mut buf = vec![0u8; 16 * 1024];
    while socket.recv(&mut &mut buf[..], 0).is_ok() {}
}

fn ssdp_listener(lan: &LanInfo) -> Option<UdpSocket> {
    match ssdp_notify::listen(lan.local).and_then(|s| Ok(UdpSocket::from_std(s)?)) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("not listening for the gateway's SSDP announcements ({e:#}); restarts are noticed at the next check");
            None
        }
    }
}

async fn next_announcement(ssdp: &Option<UdpSocket>, buf: &mut [u8]) -> Option<(usize, std::net::SocketAddr)> {
    match ssdp {
        Some(socket) => socket.recv_from(buf).await.ok(),
        None => std::future::pending().await,
    }
}

/// Runs until `stop` turns true.
pub async fn watch(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let monitor = match route_monitor() {
        Ok(m) => Some(m),
        Err(e) => {
            warn!(
                "not watching for network changes ({e}); a new gateway is found only when the old one stops answering"
            );
            None
        }
    };
    let mut lan = tokio::task::spawn_blocking(netinfo::lan_info).await.ok().and_then(Result::ok);
    let mut ssdp = lan.as_ref().and_then(ssdp_listener);
    let mut detector = RestartDetector::default();
    let mut buf = vec![0u8; ssdp_notify::MAX_DATAGRAM + 1];
    enum Wake {
        Stop,
        RoutesChanged,
        Announcement(usize, std::net::SocketAddr),
    }
    loop {
        // The select only decides what happened; the work happens after it, with its futures gone.
        let wake = tokio::select! {
            _ = stop.wait_for(|s| *s) => Wake::Stop,
            ready = async { monitor.as_ref().unwrap().readable().await }, if monitor.is_some() => {
                let Ok(mut guard) = ready else { return };
                drain(guard.get_inner());
                guard.clear_ready();
                Wake::RoutesChanged
            }
            Some((len, source)) = next_announcement(&ssdp, &mut buf) => Wake::Announcement(len, source),
        };
        match wake {
            Wake::Stop => return,
            Wake::RoutesChanged => {
                // Let the burst settle, then look once.
                tokio::time::sleep(SETTLE).await;
                if let Some(m) = &monitor {
                    drain(m.get_ref());
                }
                let now = tokio::task::spawn_blocking(netinfo::lan_info).await.ok().and_then(Result::ok);
                if now != lan {
                    match &now {
                        Some(n) => info!(
                            "network changed: gateway {} via interface {}, this host {}",
                            n.gateway, n.interface_index, n.local
                        ),
                        None => warn!("network changed: there is no IPv4 default route any more"),
                    }
                    lan = now;
                    ssdp = lan.as_ref().and_then(ssdp_listener);
                    detector = RestartDetector::default();
                    shared.gateway_changed.notify_one();
                }
            }
            Wake::Announcement(len, source) => {
                let Some(gateway) = lan.as_ref().map(|l| l.gateway) else { continue };
                if !ssdp_notify::from_gateway(source, gateway) {
                    continue;
                }
                let Some(notify) = ssdp_notify::parse_notify(&buf[..len]) else { continue };
                if detector.changed(&notify) {
                    info!(
                        "the gateway announced a restart or move ({:?}, boot id {:?}, {})",
                        notify.kind,
                        notify.boot_id,
                        notify.location.as_deref().unwrap_or("no location")
                    );
                    shared.gateway_changed.notify_one();
                } else {
                    debug!("gateway announcement: {:?}", notify.kind);
                }
            }
        }
    }
}
