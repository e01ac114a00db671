//! Watching for signs that the way to the gateway changed: links, addresses and routes of both
//! families, over rtnetlink. After a burst of changes settles, [`LanWatch`] reads the default route
//! and this host's address again; if they differ, the old gateway's mappings are no use and the new
//! gateway must be found and mapped, which the reconciler hears as [`Signal::Rediscover`].
//! [`Lan6Watch`] is read again too: a new IPv6 router is a new gateway to ask (rediscovered as well);
//! new, deprecated and removed IPv6 addresses reach the table through the watch's subscribers (which
//! also read them again when a deprecated address nears its end: the kernel says nothing then).
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::warn;

use super::{lan::LanWatch, lan6::Lan6Watch};
use crate::gateway::signals::{Signal, SignalSender};

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;
/// Network changes come in bursts (link up, address, routes): act once it is quiet for this long.
const SETTLE: Duration = Duration::from_millis(300);

fn route_monitor() -> std::io::Result<AsyncFd<Socket>> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE;
    socket.bind(&SocketAddr::new(0, groups))?;
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

/// Runs until `stop` turns true.
pub async fn watch(lan: LanWatch, lan6: Lan6Watch, signals: SignalSender, mut stop: watch::Receiver<bool>) {
    let monitor = match route_monitor() {
        Ok(m) => m,
        Err(e) => {
            warn!(
                "not watching for network changes ({e}); a new gateway is found only when the old one stops answering"
            );
            return;
        }
    };
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            ready = monitor.readable() => {
                let Ok(mut guard) = ready else { return };
                drain(guard.get_inner());
                guard.clear_ready();
            }
        }
        // Let the burst settle, then look once.
        tokio::time::sleep(SETTLE).await;
        drain(monitor.get_ref());
        let refreshed = lan.refresh().await;
        if refreshed.changed {
            let why = match &refreshed.lan {
                Ok(l) => format!("the network changed: gateway {}, this host {}", l.gateway, l.local),
                Err(e) => format!("the network changed: {e}"),
            };
            signals.send(Signal::Rediscover(why));
        } else if let Ok(l) = &refreshed.lan {
            match lan6.refresh(l.interface_index).await {
                Ok(true) => signals.send(Signal::Rediscover("the IPv6 router changed".into())),
                Ok(false) => {}
                Err(e) => warn!("{e}"),
            }
        }
    }
}
