//! `natbinder daemon`: wiring and lifecycle. A thin layer over [`run`], which takes its configuration
//! and a shutdown future so that tests can run the whole daemon in-process.
use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How soon the sockets are listed again after kernel events were lost.
const STORM_RECHECK: Duration = Duration::from_millis(500);

use crate::{
    cgroup,
    gateway::{
        pcp::NonceKey,
        select::{self, Backend},
    },
    journal::Journal,
    kernel::{self, KernelEvent, KernelHooks},
    netinfo, netwatch,
    reconcile::{Reconciler, ReconcilerConfig, Shared},
    resync::{self, Resync, Scope},
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
    /// Size of the kernel-to-daemon event ring buffer in bytes (a power of two, at least 4096).
    pub event_buffer_bytes: u32,
    /// Where the journal of mappings lives.
    pub state_dir: PathBuf,
    /// The gateway protocols to use, best first (one: that one only).
    pub backends: Vec<Backend>,
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
            event_buffer_bytes: natbinder_common::EVENTS_BYTES,
            state_dir: PathBuf::from("/var/lib/natbinder"),
            backends: select::DEFAULT_ORDER.to_vec(),
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
    let mut hooks =
        KernelHooks::attach_with_buffer(&cgroup.path, netns_cookie, config.min_port, config.event_buffer_bytes)?;
    info!(
        "watching binds of ports >= {} on 0.0.0.0 and [::] in cgroup {} (network namespace cookie {netns_cookie})",
        config.min_port,
        cgroup.path.display()
    );

    let shared = Arc::new(Shared::default());
    let scope = Scope::for_cgroup(&cgroup.path, cgroup.is_root, config.min_port, sockdiag::ephemeral_port_range());
    let mut resync = Resync::new();
    // Sockets bound before this start (or while an earlier daemon was down) need forwarding too.
    resync_sockets(&shared, &mut hooks, &mut resync, &scope);
    let (stop_tx, stop_rx) = watch::channel(false);
    let journal = Journal::open(&config.state_dir)?;
    let nonces = NonceKey::load_or_create(&config.state_dir)?;
    let reconciler = Reconciler::new(
        ReconcilerConfig {
            lease: config.lease,
            interval: config.reconcile_interval,
            min_port: config.min_port,
            hostname: hostname(),
            shutdown_grace: config.shutdown_grace,
        },
        shared.clone(),
        hooks.held_elsewhere(),
        journal,
    );
    let discovery_timeout = config.discovery_timeout;
    let backends = config.backends.clone();
    let names: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    info!("gateway protocols, best first: {}", names.join(", "));
    let discover = move || {
        let (backends, nonces) = (backends.clone(), nonces.clone());
        async move {
            let lan = tokio::task::spawn_blocking(netinfo::lan_info)
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{e:#}"))?;
            let gateway = select::discover(&lan, &backends, discovery_timeout, &nonces).await?;
            Ok((gateway, lan))
        }
    };
    let watcher_task = tokio::spawn(netwatch::watch(shared.clone(), stop_rx.clone()));
    let reconciler_task = tokio::spawn(reconciler.run(discover, stop_rx));

    let mut events = Vec::new();
    let mut lost_seen = 0;
    let mut periodic = tokio::time::interval(config.reconcile_interval);
    periodic.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    periodic.reset();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            read = hooks.read_events(&mut events) => read?,
            _ = hangup.recv() => {
                info!("SIGHUP: checking the sockets and the gateway's table now");
                resync_sockets(&shared, &mut hooks, &mut resync, &scope);
                shared.check_now.notify_one();
                continue;
            }
            _ = periodic.tick() => {
                resync_sockets(&shared, &mut hooks, &mut resync, &scope);
                if shared.adds_paused.load(Ordering::SeqCst) {
                    let lost = hooks.lost_events();
                    if lost == lost_seen {
                        // Nothing lost since the previous listing: the table is exact again.
                        info!("event storm over: the table matches the sockets again; resuming new mappings");
                        shared.adds_paused.store(false, Ordering::SeqCst);
                        shared.wake.notify_one();
                        periodic.reset();
                    } else {
                        lost_seen = lost;
                        periodic.reset_after(STORM_RECHECK);
                    }
                }
                continue;
            }
            _ = &mut shutdown => break,
        }
        for event in events.drain(..) {
            handle_event(&shared, event);
        }
        let lost = hooks.lost_events();
        if lost > lost_seen {
            if !shared.adds_paused.swap(true, Ordering::SeqCst) {
                warn!(
                    "socket events were lost (ring buffer or socket map full): pausing new mappings and \
                     resynchronising from sock_diag until the storm settles"
                );
            }
            debug!("{lost} events lost so far");
            lost_seen = lost;
            // List the sockets shortly: a storm that overflowed the buffer may still be going on.
            periodic.reset_after(STORM_RECHECK);
        }
        shared.wake.notify_one();
    }

    info!("shutting down: no new binds are forwarded; removing this host's mappings");
    if let Err(e) = hooks.disable() {
        warn!("{e:#}");
    }
    let _ = stop_tx.send(true);
    reconciler_task.await.context("the reconciler task failed")?;
    let _ = watcher_task.await;
    hooks.detach();
    info!("detached from the kernel; bye");
    Ok(())
}

/// Adopts live wildcard sockets the table lacks and drops table sockets that no longer exist.
fn resync_sockets(shared: &Shared, hooks: &mut KernelHooks, resync: &mut Resync, scope: &Scope) {
    let live = match sockdiag::wildcard_sockets(scope.min_port) {
        Ok(live) => live,
        Err(e) => {
            warn!("could not list sockets for resynchronisation: {e:#}");
            return;
        }
    };
    let known = shared.table.lock().unwrap().socket_cookies();
    let plan = resync.plan(&known, &live, scope);
    if plan.adopt.is_empty() && plan.gone.is_empty() {
        return;
    }
    let owners = resync::socket_owners(&plan.adopt.iter().map(|s| s.inode).collect());
    let now = std::time::Instant::now();
    for socket in &plan.adopt {
        if let Err(e) = hooks.track_release(socket.cookie, socket.family, socket.protocol, socket.port) {
            warn!("{e:#}; not adopting it");
            continue;
        }
        let (pid, comm) = owners.get(&socket.inode).cloned().unwrap_or((0, String::from("?")));
        let forward_ipv4 = socket.family == Family::Ipv4 || !socket.ipv6_only;
        info!(
            "adopted {}/{} on {} held by pid {pid} ({comm}), bound while natbinder was not watching",
            socket.protocol, socket.port, socket.family
        );
        let bound = kernel::BoundSocket {
            cookie: socket.cookie,
            pid,
            uid: socket.uid,
            gid: 0,
            cgroup_id: socket.cgroup_id.unwrap_or(0),
            comm,
            family: socket.family,
            protocol: socket.protocol,
            port: socket.port,
        };
        shared.table.lock().unwrap().add_socket(bound, forward_ipv4, now);
    }
    if !plan.adopt.is_empty() {
        // A socket closed between the listing and track_release would never report its release.
        if let Ok(again) = sockdiag::wildcard_sockets(scope.min_port) {
            let still: std::collections::HashSet<u64> = again.iter().map(|s| s.cookie).collect();
            for socket in plan.adopt.iter().filter(|s| !still.contains(&s.cookie)) {
                hooks.untrack_release(socket.cookie);
                shared.table.lock().unwrap().remove_socket(socket.cookie);
            }
        }
    }
    for cookie in plan.gone {
        let mut table = shared.table.lock().unwrap();
        if let Some(record) = table.socket(cookie) {
            info!("{}/{} is gone (its release was not seen)", record.socket.protocol, record.socket.port);
        }
        table.remove_socket(cookie);
        hooks.untrack_release(cookie);
    }
    shared.wake.notify_one();
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
