//! `natbinder daemon`: wiring and lifecycle. A thin layer over [`run`], which takes its configuration
//! and a shutdown future so that tests can run the whole daemon in-process.
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    cgroup,
    gateway::igd::IgdGateway,
    kernel::{self, KernelEvent, KernelHooks},
    netinfo,
    reconcile::{Reconciler, ReconcilerConfig, Shared},
    sockdiag, Family,
};

/// Validated daemon settings.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// The cgroup whose sockets are watched; None = the cgroup2 root (the whole machine).
    pub cgroup: Option<PathBuf>,
    pub min_port: u16,
    pub lease: Duration,
    pub reconcile_interval: Duration,
    pub discovery_timeout: Duration,
    pub shutdown_grace: Duration,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            cgroup: None,
            min_port: 1024,
            lease: Duration::from_secs(3600),
            reconcile_interval: Duration::from_secs(60),
            discovery_timeout: Duration::from_secs(3),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Runs the daemon until `shutdown` completes, then removes its mappings and detaches its hooks.
pub async fn run(config: DaemonConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let cgroup = cgroup::resolve_cgroup(config.cgroup.as_deref())?;
    let netns_cookie = kernel::current_netns_cookie()?;
    let mut hooks = KernelHooks::attach(&cgroup, netns_cookie, config.min_port)?;
    info!(
        "watching binds of ports >= {} on 0.0.0.0 and [::] in cgroup {} (network namespace cookie {netns_cookie})",
        config.min_port,
        cgroup.display()
    );

    let shared = Arc::new(Shared::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let reconciler = Reconciler {
        config: ReconcilerConfig {
            lease: config.lease,
            interval: config.reconcile_interval,
            min_port: config.min_port,
            hostname: hostname(),
            shutdown_grace: config.shutdown_grace,
        },
        shared: shared.clone(),
        blocklist: hooks.held_elsewhere(),
    };
    let discovery_timeout = config.discovery_timeout;
    let discover = move || async move {
        let lan = tokio::task::spawn_blocking(netinfo::lan_info)
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{e:#}"))?;
        let gateway = IgdGateway::discover(&lan, discovery_timeout).await?;
        Ok((gateway, lan))
    };
    let reconciler_task = tokio::spawn(reconciler.run(discover, stop_rx));

    let mut events = Vec::new();
    let mut lost_seen = 0;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            read = hooks.read_events(&mut events) => read?,
            _ = &mut shutdown => break,
        }
        for event in events.drain(..) {
            handle_event(&shared, event);
        }
        shared.wake.notify_one();
        let lost = hooks.lost_events();
        if lost > lost_seen {
            warn!(
                "{} socket events were lost (ring buffer or socket map full); the table may be incomplete",
                lost - lost_seen
            );
            lost_seen = lost;
        }
    }

    info!("shutting down: no new binds are forwarded; removing this host's mappings");
    if let Err(e) = hooks.disable() {
        warn!("{e:#}");
    }
    let _ = stop_tx.send(true);
    reconciler_task.await.context("the reconciler task failed")?;
    hooks.detach();
    info!("detached from the kernel; bye");
    Ok(())
}

fn handle_event(shared: &Shared, event: KernelEvent) {
    let now = std::time::Instant::now();
    match event {
        KernelEvent::Bound(socket) => {
            let forward_ipv4 = match socket.family {
                Family::Ipv4 => true,
                // Dual-stack [::] sockets take IPv4 too; IPv6-only ones need pinholes, not NAT mappings.
                Family::Ipv6 => match sockdiag::ipv6_only(socket.protocol, socket.port, socket.cookie) {
                    Ok(Some(v6only)) => !v6only,
                    // Closed already (its release follows), or a TCP socket not yet listening on a kernel
                    // older than 6.7, which cannot list those: assume the system default.
                    Ok(None) => !sockdiag::system_default_is_ipv6_only(),
                    Err(e) => {
                        warn!(
                            "could not tell whether {} socket on [::]:{} is IPv6-only ({e:#}); assuming the system default",
                            socket.protocol, socket.port
                        );
                        !sockdiag::system_default_is_ipv6_only()
                    }
                },
            };
            info!(
                "pid {} ({}) uid {} bound {}/{} on {}{}",
                socket.pid,
                socket.comm,
                socket.uid,
                socket.protocol,
                socket.port,
                socket.family,
                if forward_ipv4 { "" } else { " (IPv6-only: no IPv4 mapping)" }
            );
            shared.table.lock().unwrap().add_socket(socket, forward_ipv4, now);
        }
        KernelEvent::Released { cookie } => {
            let mut table = shared.table.lock().unwrap();
            let Some(record) = table.socket(cookie) else { return };
            info!(
                "released {}/{} (pid {}, {})",
                record.socket.protocol, record.socket.port, record.socket.pid, record.socket.comm
            );
            table.remove_socket(cookie);
        }
        KernelEvent::Refused(socket) => {
            warn!(
                "refused bind of {}/{} by pid {} ({}) with EADDRINUSE: another host holds that port on the gateway",
                socket.protocol, socket.port, socket.pid, socket.comm
            );
        }
    }
}
