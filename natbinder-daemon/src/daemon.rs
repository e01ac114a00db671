//! `natbinder daemon`: wiring and lifecycle. A thin layer over [`run`], which takes its configuration
//! and a shutdown future so that tests can run the whole daemon in-process ([`run_with`] also takes the
//! outcome bus, so that they can wait on what happens).
//!
//! The tasks, all on one thread (the event loop), none of them blocking it:
//! * this loop: kernel events into the table; SIGHUP; shutdown;
//! * the classifier: whether AF_INET6 sockets are IPv6-only (sock_diag, batched, off the loop);
//! * the resynchroniser: sock_diag listings ([`crate::host::resync`]);
//! * the network watcher (rtnetlink) and the announcement listeners, which feed [`Signals`];
//! * the reconciler, the only one that talks to the gateway.
use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};

use crate::{
    control::{views::Facts, ControlConfig, ControlSocket, ControlState, Operators, RunPlaced},
    gateway::{
        announcements,
        pcp::NonceKey,
        select::{self, Backend},
        signals::{Signal, Signals},
    },
    host::{
        self, cgroup,
        lan::LanWatch,
        lan6::Lan6Watch,
        memory, netwatch,
        process::CgroupNames,
        resync::{ReleaseTracker, Resynchronizer},
        sockdiag,
    },
    journal::Journal,
    kernel::{self, AttachedLinks, BoundSocket, KernelEvent, KernelHooks},
    operator_state::OperatorState,
    outcome::{Found, Outcome, OutcomeBus},
    policy::{self, exposure::Exposure, Policy, PolicySpec, Scope},
    reconcile::{Ownership, Reconciler, ReconcilerConfig},
    run::{
        cgroups::{RunCgroups, RunPlacement},
        wait::BindWaits,
    },
    service_manager,
    table::{Listener, Owner, Stack, TableConfig, TableHandle},
    Family, Protocol,
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
    /// The administrator's exposure rules.
    pub policy: PolicySpec,
    /// Concurrent mappings per uid; 0: no limit.
    pub max_mappings_per_user: u32,
    /// What SIGHUP reads again; None: nothing (a reload then keeps the policy).
    pub reload: Option<ReloadSource>,
    /// The control socket and who may change things through it.
    pub control: ControlConfig,
    /// Keep a mapping the gateway grants on another external port, rather than delete it.
    pub keep_gateway_chosen_ports: bool,
    /// Who makes the cgroups of `natbinder run`: systemd (transient scopes) or the daemon.
    pub run_cgroups: RunPlacement,
}

/// What a reload reads again: the command line the daemon was started with, and so the
/// configuration file it names (or the default one), with the command line still winning over it.
#[derive(Clone, Debug)]
pub struct ReloadSource {
    pub args: Box<crate::cli::DaemonArgs>,
    pub layout: crate::config::ConfigLayout,
}

impl ReloadSource {
    /// The configuration as it would be at a start now; an error (with the file and line) leaves the
    /// running one as it is.
    pub fn read(&self) -> Result<DaemonConfig> {
        self.args.clone().into_config_with_layout(&self.layout)
    }
}

/// The settings a reload can apply to a running daemon; the others need a restart.
fn needs_restart(running: &DaemonConfig, new: &DaemonConfig) -> Vec<String> {
    let mut names = Vec::new();
    let mut differs = |name: &str, changed: bool| {
        if changed {
            names.push(name.to_string());
        }
    };
    differs("cgroup", running.cgroup != new.cgroup);
    differs("min-port", running.min_port != new.min_port);
    differs("discovery-timeout-seconds", running.discovery_timeout != new.discovery_timeout);
    differs("event-buffer-kib", running.event_buffer_bytes != new.event_buffer_bytes);
    differs("state-dir", running.state_dir != new.state_dir);
    differs("backend / backend-order", running.backends != new.backends);
    differs("control-socket", running.control.socket != new.control.socket);
    differs("run-cgroups", running.run_cgroups != new.run_cgroups);
    names
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
            policy: PolicySpec::default(),
            max_mappings_per_user: policy::DEFAULT_MAX_MAPPINGS_PER_USER,
            reload: None,
            control: ControlConfig::default(),
            keep_gateway_chosen_ports: false,
            run_cgroups: RunPlacement::Auto,
        }
    }
}

/// Runs the daemon until `shutdown` completes, then removes its mappings and detaches its hooks.
pub async fn run(config: DaemonConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    run_with(config, shutdown, OutcomeBus::with_log()).await
}

/// As [`run`], publishing to `outcomes`.
pub async fn run_with(config: DaemonConfig, shutdown: impl Future<Output = ()>, outcomes: OutcomeBus) -> Result<()> {
    // What `natbinder status` shows is followed from the first outcome on.
    let facts = Arc::new(std::sync::Mutex::new(Facts::default()));
    let mut facts_feed = outcomes.subscribe();
    // First, so that a second daemon stops here, before it touches the kernel or the gateway.
    let control = ControlSocket::bind(&config.control.socket)?;
    let cgroup = cgroup::resolve_cgroup(config.cgroup.as_deref())?;
    let scope = match &config.cgroup {
        Some(_) => Scope::Cgroup(cgroup.path.display().to_string()),
        None => Scope::Sessions { user_slice: cgroup.root.join("user.slice").is_dir() },
    };
    let rules = config.policy.validate()?;
    // Where `natbinder run` puts programs; it must exist before the policy is compiled for the kernel.
    let runs = Arc::new(RunCgroups::prepare(&cgroup.root, config.run_cgroups)?);
    let runs_base = runs.base_relative();
    let exposure = Arc::new(Exposure::new(
        Policy::new(rules, &scope, config.max_mappings_per_user).with_runs(&runs_base),
        CgroupNames::new(&cgroup.root),
    ));
    let netns_cookie = kernel::current_netns_cookie()?;
    let mut hooks =
        KernelHooks::attach_with_buffer(&cgroup.path, netns_cookie, config.min_port, config.event_buffer_bytes)?;
    // The run cgroups are watched too: through the watched cgroup if it contains them, else directly
    // (the daemon's base now; each of systemd's scopes as it is made, since the slice comes and goes).
    let runs_apart = !(cgroup.is_root || runs.base().starts_with(&cgroup.path));
    let _base_links = match runs_apart && runs.by_daemon() {
        true => Some(hooks.attach_also(runs.base())?),
        false => None,
    };
    let mut scope_links: Vec<(PathBuf, AttachedLinks)> = Vec::new();
    info!(
        "programs started with `natbinder run` go to {}{}",
        runs.base().display(),
        if runs.by_systemd() { " (transient scopes made by systemd)" } else { "" }
    );
    let kernel_rules = exposure.kernel_rules();
    hooks.set_policy(&kernel_rules)?;
    let table = TableHandle::new(
        TableConfig { min_port: config.min_port, max_mappings_per_user: config.max_mappings_per_user },
        outcomes.clone(),
        hooks.held_elsewhere(),
    );
    outcomes.publish(Outcome::Watching { cgroup: cgroup.path.clone(), min_port: config.min_port, netns_cookie });
    outcomes.publish(Outcome::PolicyApplied {
        scope: scope.clone(),
        rules: exposure.policy().rules().len(),
        kernel_entries: kernel_rules.len(),
        max_mappings_per_user: config.max_mappings_per_user,
    });

    // Sockets bound before this start (or while an earlier daemon was down) need forwarding too.
    let mut resync = Resynchronizer::new(cgroup.clone(), table.clone(), exposure.clone(), hooks.releases())
        .also_watching(runs_apart.then(|| runs.base().to_path_buf()));
    resync.run_once().await;
    memory::give_back_freed_heap();

    let journal = Journal::open(&config.state_dir)?;
    // What operators asked for (static mappings, disabled ports), before the first check of the gateway.
    let operator = OperatorState::load(&config.state_dir)?;
    let (statics, disabled) = (operator.static_keys(&config.state_dir)?, operator.disabled_keys(&config.state_dir)?);
    let now = std::time::Instant::now();
    table.update(|t| {
        for key in disabled {
            t.disable(key, now);
        }
        for (key, description, uid) in statics {
            if let Err(e) = t.add_static(key, &description, uid, now) {
                warn!(
                    "static mapping {key} from {} not restored: {e}",
                    OperatorState::path(&config.state_dir).display()
                );
            }
        }
    });
    let nonces = NonceKey::load_or_create(&config.state_dir)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let lan = LanWatch::new();
    let lan6 = Lan6Watch::new();
    let signals = Signals::new();
    let resync_requested = Arc::new(Notify::new());
    let (classify_tx, classify_rx) = mpsc::unbounded_channel();
    let reconciler_config = ReconcilerConfig {
        lease: config.lease,
        interval: config.reconcile_interval,
        shutdown_grace: config.shutdown_grace,
        keep_gateway_chosen_ports: config.keep_gateway_chosen_ports,
    };
    let (settings_tx, settings_rx) = watch::channel(reconciler_config.clone());
    let (intake_flush, mut flush_requests) = crate::reconcile::intake::channel();
    let reconciler =
        Reconciler::new(reconciler_config, table.clone(), signals.clone(), Ownership::new(host::hostname(), journal))
            .following(settings_rx)
            .with_lan6(lan6.clone())
            .with_intake(intake_flush);
    let names: Vec<String> = config.backends.iter().map(|b| b.to_string()).collect();
    info!("gateway protocols, best first: {}", names.join(", "));
    let discover = {
        let (lan, lan6, signals, backends, timeout) =
            (lan.clone(), lan6.clone(), signals.sender(), config.backends.clone(), config.discovery_timeout);
        move |session: u64| {
            let (lan, lan6, signals, backends, nonces) =
                (lan.clone(), lan6.clone(), signals.clone(), backends.clone(), nonces.clone());
            async move {
                let lan = lan.refresh().await.lan?;
                // The IPv6 side is read with the IPv4 one: each session asks the router it finds.
                if let Err(e) = lan6.refresh(lan.interface_index).await {
                    warn!("{e}");
                }
                let gateway = select::discover(&lan, &backends, timeout, &nonces, &signals, session).await?;
                Ok((gateway, lan))
            }
        }
    };
    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel();
    let (run_placed_tx, mut run_placed_rx) = mpsc::unbounded_channel::<RunPlaced>();
    let control_state = Arc::new(ControlState {
        table: table.clone(),
        runs: runs.clone(),
        bind_waits: BindWaits {
            table: table.clone(),
            exposure: exposure.clone(),
            facts: facts.clone(),
            watched: cgroup.clone(),
            runs: runs.clone(),
        },
        min_port: config.min_port,
        run_placed: run_placed_tx,
        state_dir: config.state_dir.clone(),
        saving: Default::default(),
        facts: facts.clone(),
        outcomes: outcomes.clone(),
        reload: reload_tx,
        operators: std::sync::RwLock::new(Operators::resolve(&config.control)),
    });
    info!("control socket: {}", control.path().display());
    let follow_facts = {
        let (facts, mut stop) = (facts.clone(), stop_rx.clone());
        async move {
            loop {
                let event = tokio::select! {
                    event = facts_feed.recv() => event,
                    _ = stop.wait_for(|s| *s) => return,
                };
                match event {
                    Ok(event) => facts.lock().unwrap_or_else(|e| e.into_inner()).observe(&event.outcome),
                    // The facts are latest values: what was missed is superseded by what follows.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    };
    let tasks = vec![
        tokio::spawn(follow_facts),
        tokio::spawn(control.serve(control_state.clone(), stop_rx.clone())),
        tokio::spawn(netwatch::watch(lan.clone(), lan6.clone(), signals.sender(), stop_rx.clone())),
        tokio::spawn(follow_ipv6_addresses(lan6.clone(), table.clone(), signals.sender(), stop_rx.clone())),
        tokio::spawn(announcements::listen(lan.clone(), signals.sender(), stop_rx.clone())),
        tokio::spawn(resync.run(config.reconcile_interval, resync_requested.clone(), hooks.losses(), stop_rx.clone())),
        tokio::spawn(classify(classify_rx, table.clone(), stop_rx.clone())),
        tokio::spawn(sweep_runs(runs.clone(), stop_rx.clone())),
        tokio::spawn(service_manager::follow(outcomes.clone(), stop_rx.clone())),
    ];
    let reconciler_task = tokio::spawn(reconciler.run(discover, stop_rx));

    // What a reload changes; what it cannot change keeps its value from the start.
    let mut running = config.clone();
    let mut events = Vec::new();
    let mut lost_seen = hooks.lost_events();
    let releases = hooks.releases();
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    let hangups = signals.sender();
    // Pinged from this loop, so that a loop that hangs is restarted by systemd (WatchdogSec=).
    let mut watchdog = tokio::time::interval(service_manager::watchdog_interval().unwrap_or(Duration::from_secs(3600)));
    let watchdog_on = service_manager::watchdog_interval().is_some();
    tokio::pin!(shutdown);
    loop {
        // A flush asked by the reconciler before a delete, answered once the events are applied.
        let mut flushed = None;
        tokio::select! {
            read = hooks.read_events(&mut events) => read?,
            Some(done) = flush_requests.recv() => {
                hooks.read_available(&mut events);
                flushed = Some(done);
            }
            _ = hangup.recv() => {
                info!("SIGHUP: reloading the policy, and checking the sockets and the gateway now");
                let _ = Reload {
                    running: &mut running, scope: &scope, runs_base: &runs_base, exposure: &exposure, hooks: &mut hooks, table: &table,
                    outcomes: &outcomes, settings: &settings_tx, operators: &control_state.operators,
                }.apply();
                resync_requested.notify_one();
                hangups.send(Signal::CheckNow);
                continue;
            }
            Some(answer) = reload_rx.recv() => {
                info!("reload asked on the control socket: reloading the policy, and checking the sockets and the gateway now");
                let result = Reload {
                    running: &mut running, scope: &scope, runs_base: &runs_base, exposure: &exposure, hooks: &mut hooks, table: &table,
                    outcomes: &outcomes, settings: &settings_tx, operators: &control_state.operators,
                }.apply();
                let _ = answer.send(result);
                resync_requested.notify_one();
                hangups.send(Signal::CheckNow);
                continue;
            }
            Some((run_cgroup, done)) = run_placed_rx.recv() => {
                if runs.by_systemd() {
                    // Links of scopes that ended are given back; the new scope is watched, and the
                    // kernel's policy learns the slice's id (it is made anew when a run starts after
                    // all had ended).
                    let (gone, kept): (Vec<_>, Vec<_>) = scope_links.drain(..).partition(|(path, _)| !path.exists());
                    scope_links = kept;
                    for (_, links) in gone {
                        hooks.detach_links(links);
                    }
                    if runs_apart {
                        match hooks.attach_also(&run_cgroup) {
                            Ok(links) => scope_links.push((run_cgroup, links)),
                            Err(e) => warn!("{e:#}: that program's binds are not forwarded"),
                        }
                    }
                    if let Err(e) = hooks.set_policy(&exposure.kernel_rules()) {
                        warn!("{e:#}; the kernel refuses no bind until the next reload");
                    }
                }
                let _ = done.send(());
                continue;
            }
            _ = watchdog.tick(), if watchdog_on => {
                service_manager::watchdog_ping();
                continue;
            }
            _ = &mut shutdown => break,
        }
        for event in events.drain(..) {
            handle_event(&table, &exposure, &classify_tx, &releases, event);
        }
        let lost = hooks.lost_events();
        if lost > lost_seen {
            debug!("{lost} events lost so far");
            lost_seen = lost;
            table.update(|t| t.pause_adds(lost));
            resync_requested.notify_one();
        }
        if let Some(done) = flushed {
            let _ = done.send(());
        }
    }

    info!("shutting down: no new binds are forwarded; removing this host's mappings");
    service_manager::stopping();
    if let Err(e) = hooks.disable() {
        warn!("{e:#}");
    }
    let _ = stop_tx.send(true);
    reconciler_task.await.context("the reconciler task failed")?;
    for task in tasks {
        let _ = task.await;
    }
    hooks.detach();
    let _ = tokio::task::spawn_blocking(move || runs.finish()).await;
    info!("detached from the kernel; bye");
    Ok(())
}

fn listener(socket: BoundSocket) -> Listener {
    Listener {
        cookie: socket.cookie,
        protocol: socket.protocol,
        port: socket.port,
        family: socket.family,
        owner: Owner {
            pid: socket.pid,
            uid: socket.uid,
            gid: socket.gid,
            cgroup_id: socket.cgroup_id,
            comm: socket.comm,
            ..Owner::default()
        },
    }
}

/// SIGHUP, or `natbinder reload`: the configuration is read again as at a start. The rules and
/// max-mappings-per-user replace the running ones, in user space and in the kernel (every socket is
/// decided again; no mapping the new policy still allows moves); lease, reconcile interval,
/// keep-gateway-chosen-ports and the operators apply from now on. Settings that need a restart are
/// named, and keep their running values. A bad file is refused with its error, and nothing changes.
/// Returns the settings that need a restart.
struct Reload<'a> {
    running: &'a mut DaemonConfig,
    scope: &'a Scope,
    runs_base: &'a str,
    exposure: &'a Exposure,
    hooks: &'a mut KernelHooks,
    table: &'a TableHandle,
    outcomes: &'a OutcomeBus,
    settings: &'a watch::Sender<ReconcilerConfig>,
    operators: &'a std::sync::RwLock<Operators>,
}

impl Reload<'_> {
    fn apply(self) -> std::result::Result<Vec<String>, String> {
        let Some(source) = &self.running.reload else {
            info!("no configuration to reload: natbinder was not started from the command line");
            return Ok(Vec::new());
        };
        let read = source.read().and_then(|new| Ok((new.policy.validate()?, new)));
        let (rules, new) = match read {
            Ok(read) => read,
            Err(e) => {
                let error = format!("{e:#}");
                self.outcomes.publish(Outcome::ReloadRefused { error: error.clone() });
                return Err(error);
            }
        };
        let max = new.max_mappings_per_user;
        self.exposure.replace(Policy::new(rules, self.scope, max).with_runs(self.runs_base));
        let kernel_rules = self.exposure.kernel_rules();
        if let Err(e) = self.hooks.set_policy(&kernel_rules) {
            warn!("{e:#}; the kernel refuses no bind until the next reload");
        }
        let now = std::time::Instant::now();
        let exposure = self.exposure;
        self.table.update(|t| t.apply_policy(|l| exposure.decide(l), max, now));
        self.settings.send_modify(|s| {
            s.lease = new.lease;
            s.interval = new.reconcile_interval;
            s.keep_gateway_chosen_ports = new.keep_gateway_chosen_ports;
        });
        *self.operators.write().unwrap_or_else(|e| e.into_inner()) = Operators::resolve(&new.control);
        let restart = needs_restart(self.running, &new);
        let kept = self.running.clone();
        *self.running = DaemonConfig {
            cgroup: kept.cgroup,
            min_port: kept.min_port,
            discovery_timeout: kept.discovery_timeout,
            event_buffer_bytes: kept.event_buffer_bytes,
            state_dir: kept.state_dir,
            backends: kept.backends,
            run_cgroups: kept.run_cgroups,
            control: ControlConfig { socket: kept.control.socket, ..new.control.clone() },
            ..new
        };
        self.outcomes.publish(Outcome::PolicyApplied {
            scope: self.scope.clone(),
            rules: self.exposure.policy().rules().len(),
            kernel_entries: kernel_rules.len(),
            max_mappings_per_user: max,
        });
        if !restart.is_empty() {
            self.outcomes.publish(Outcome::NeedsRestart { settings: restart.clone() });
        }
        Ok(restart)
    }
}

fn handle_event(
    table: &TableHandle,
    exposure: &Exposure,
    classify: &mpsc::UnboundedSender<(Protocol, u64)>,
    releases: &kernel::Releases,
    event: KernelEvent,
) {
    match event {
        KernelEvent::Bound(socket) => {
            // When the program bound, not when this loop read it: a churn's release and next bind are
            // ordered by the program's own gap, however late the daemon gets to them.
            let at = kernel::instant_of(socket.at_ns);
            let (protocol, cookie) = (socket.protocol, socket.cookie);
            let stack = match socket.family {
                Family::Ipv4 => Stack::Ipv4,
                // Whether a [::] socket also takes IPv4 is not in the event: sock_diag tells, off the loop.
                Family::Ipv6 => Stack::Unknown,
            };
            let mut listener = listener(socket);
            let decision = exposure.admit(&mut listener);
            table.update(|t| t.socket_bound(listener, stack, Found::Bind, decision, at));
            if stack == Stack::Unknown {
                let _ = classify.send((protocol, cookie));
            }
        }
        KernelEvent::Released { cookie, at_ns, thread } => {
            let at = kernel::instant_of(at_ns);
            // An adopted socket is tracked apart, until now.
            releases.untrack(cookie);
            table.update(|t| t.socket_released_by(cookie, thread, at))
        }
        KernelEvent::Refused(socket) => table.update(|t| t.bind_refused(listener(socket))),
    }
}

/// Gives the table this host's IPv6 addresses as they change (a privacy address made or expired, a
/// prefix change): each [::] listener's pinholes follow. A gateway whose pinhole service could not be
/// asked for want of an address is asked again at once (a check).
async fn follow_ipv6_addresses(
    lan6: Lan6Watch,
    table: TableHandle,
    signals: crate::gateway::signals::SignalSender,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = lan6.subscribe();
    loop {
        let current = changes.borrow_and_update().clone();
        let had_none = table.read(|t| t.ipv6_addresses().is_empty());
        if table.read(|t| *t.ipv6_addresses() != current.addresses || *t.ipv6_deprecated() != current.deprecated) {
            let (addresses, deprecated) = (current.addresses.clone(), current.deprecated.clone());
            table.update(|t| t.set_ipv6_addresses(addresses, deprecated, std::time::Instant::now()));
            if had_none != current.addresses.is_empty() {
                signals.send(Signal::CheckNow);
            }
        }
        // A deprecated address nearing its end changes nothing the kernel reports until it is gone,
        // too late to close its pinholes: read again when the first one comes within the margin.
        let read_again = current.read_again_at.map(tokio::time::Instant::from_std);
        let timer = async {
            match read_again {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() { return }
                continue;
            }
            _ = stop.wait_for(|s| *s) => return,
            _ = timer => {}
        }
        match lan6.refresh(current.interface_index).await {
            Ok(true) => signals.send(Signal::Rediscover("the IPv6 router changed".into())),
            Ok(false) => {}
            Err(e) => {
                warn!("{e}");
                // Not again at once: the same deadline stays in the watch until a read works.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

/// How often run cgroups nothing runs in any more are removed.
const RUN_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

async fn sweep_runs(runs: Arc<RunCgroups>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RUN_SWEEP_INTERVAL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let runs = runs.clone();
        let _ = tokio::task::spawn_blocking(move || runs.sweep()).await;
    }
}

/// Reads IPV6_V6ONLY of [::] sockets as they come, a batch per sock_diag dump, and tells the table.
/// The flag cannot change once a socket is bound, so one reading is exact.
async fn classify(
    mut queue: mpsc::UnboundedReceiver<(Protocol, u64)>,
    table: TableHandle,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let first = tokio::select! {
            first = queue.recv() => match first { Some(first) => first, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut batch = vec![first];
        while let Ok(more) = queue.try_recv() {
            batch.push(more);
        }
        let asked = batch.clone();
        let answers = tokio::task::spawn_blocking(move || sockdiag::ipv6_only_batch(&asked)).await;
        let answers = match answers {
            Ok(Ok(answers)) => answers,
            Ok(Err(e)) => {
                warn!("could not tell whether [::] sockets are IPv6-only ({e:#}); assuming the system default");
                Default::default()
            }
            Err(e) => {
                warn!("could not tell whether [::] sockets are IPv6-only ({e}); assuming the system default");
                Default::default()
            }
        };
        // Not listed: closed already (its release follows), or a TCP socket not yet listening on a kernel
        // older than 6.7, which cannot list those: the system default then.
        let default = tokio::task::spawn_blocking(sockdiag::system_default_is_ipv6_only).await.unwrap_or(false);
        let now = std::time::Instant::now();
        table.update(|t| {
            for (_, cookie) in &batch {
                let v6only = answers.get(cookie).copied().unwrap_or(default);
                t.socket_classified(*cookie, if v6only { Stack::Ipv6Only } else { Stack::DualStack }, now);
            }
        });
    }
}
