//! `natbinder doctor`: checks what natbinder needs on this machine and explains each finding with
//! what to do. Every check is a probe of the real thing, never a version string: the kernel's
//! features ([`crate::host::probes`]), the cgroup2 mount, the privileges, each gateway protocol (with
//! how long it took to answer), a double NAT, this host's own firewall ([`crate::host::firewall`]),
//! and the control socket.
//!
//! A finding that keeps natbinder from working is `fail`, and makes the exit status non-zero; one
//! that keeps it from being useful (no gateway protocol answers another way, a firewall that drops
//! what a mapping lets in, a double NAT) is `warn`.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::{
    control::client::{Client, ClientError},
    gateway::{pcp::NonceKey, select, session::is_behind_another_nat, signals::Signals, Gateway},
    host::{cgroup, firewall, lan, probes},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    Info,
    Warn,
    Fail,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Info => "info",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What part of the machine: "kernel", "cgroup2", "privileges", "gateway", "firewall", "daemon".
    pub area: &'static str,
    pub status: Status,
    /// What was found, for people.
    pub detail: String,
    /// What to do, where something is wrong.
    pub fix: Option<String>,
}

impl Check {
    fn new(area: &'static str, status: Status, detail: impl Into<String>) -> Self {
        Self { area, status, detail: detail.into(), fix: None }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// What `doctor` looks at.
#[derive(Clone, Debug)]
pub struct Options {
    pub socket: PathBuf,
    pub discovery_timeout: Duration,
}

/// Every check, in the order a reader would fix things.
pub async fn examine(options: &Options) -> Vec<Check> {
    let mut checks = Vec::new();
    checks.extend(privileges());
    checks.extend(kernel());
    checks.push(cgroup2());
    checks.extend(gateway(options.discovery_timeout).await);
    checks.extend(host_firewall());
    checks.push(daemon(&options.socket).await);
    checks
}

/// Whether anything keeps natbinder from working.
pub fn blocked(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.status == Status::Fail)
}

fn privileges() -> Vec<Check> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return vec![Check::new("privileges", Status::Ok, "running as root")];
    }
    let capabilities = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:")).map(|v| v.trim().to_string()))
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .unwrap_or(0);
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_BPF: u32 = 39;
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")]
        .into_iter()
        .filter(|(bit, _)| capabilities & (1 << bit) == 0)
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        return vec![Check::new("privileges", Status::Ok, "not root, but with CAP_BPF and CAP_NET_ADMIN")];
    }
    vec![Check::new(
        "privileges",
        Status::Fail,
        format!("not root and without {}: the daemon cannot load or attach its kernel programs, and the kernel probes below cannot run", missing.join(" and ")),
    )
    .fix("run `sudo natbinder doctor`; run the daemon as root (the packaged service does)")]
}

fn kernel() -> Vec<Check> {
    probes::all()
        .into_iter()
        .map(|probe| match probe.result {
            Ok(()) => Check::new("kernel", Status::Ok, probe.feature),
            Err(why) => Check::new("kernel", Status::Fail, format!("{}: {why}", probe.feature))
                .fix("natbinder needs Linux 5.19 or later built with BTF and CONFIG_CGROUP_BPF (Debian 12 and Ubuntu 22.10 on have them)"),
        })
        .collect()
}

fn cgroup2() -> Check {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    match cgroup::find_cgroup2_mount(&mounts) {
        Some(root) => Check::new("cgroup2", Status::Ok, format!("cgroup2 is mounted at {}", root.display())),
        None => Check::new(
            "cgroup2",
            Status::Fail,
            "no cgroup2 filesystem is mounted (none in /proc/self/mounts): the kernel programs attach to a cgroup2",
        )
        .fix("mount it (`mount -t cgroup2 none /sys/fs/cgroup`), or boot with systemd.unified_cgroup_hierarchy=1"),
    }
}

/// Each protocol on its own, with how long the gateway took to answer; then the external address.
async fn gateway(timeout: Duration) -> Vec<Check> {
    let lan = match lan::lan_info() {
        Ok(lan) => lan,
        Err(e) => {
            return vec![Check::new("gateway", Status::Fail, format!("no gateway to ask: {e:#}"))
                .fix("natbinder maps ports on the next hop of the IPv4 default route: connect to a network with one")]
        }
    };
    let mut checks = vec![Check::new(
        "gateway",
        Status::Info,
        format!("the default route's next hop is {} (this host is {} there)", lan.gateway, lan.local),
    )];
    // An ephemeral PCP nonce key: doctor writes nothing to the daemon's state.
    let (nonces, signals) = (NonceKey::ephemeral(), Signals::new());
    let mut first_found = None;
    for backend in select::DEFAULT_ORDER {
        let started = Instant::now();
        let found = select::discover(&lan, &[backend], timeout, &nonces, &signals.sender(), 0).await;
        let took = started.elapsed();
        match found {
            Ok(gateway) => {
                checks.push(Check::new(
                    "gateway",
                    Status::Ok,
                    format!("{} answered in {} ms", gateway.describe(), took.as_millis()),
                ));
                first_found.get_or_insert(gateway);
            }
            Err(why) => checks.push(Check::new(
                "gateway",
                Status::Info,
                format!("{backend}: no answer within {} ms ({why})", took.as_millis()),
            )),
        }
    }
    let Some(gateway) = first_found else {
        checks.push(
            Check::new("gateway", Status::Fail, format!("no gateway protocol answered at {}", lan.gateway)).fix(
                "turn on UPnP IGD, NAT-PMP or PCP in the router's settings (often under \"UPnP\" or \"NAT\"), or give \
                 a longer --discovery-timeout for a slow router",
            ),
        );
        return checks;
    };
    match gateway.external_address().await {
        Ok(Some(address)) if is_behind_another_nat(address) => checks.push(
            Check::new(
                "gateway",
                Status::Warn,
                format!("double NAT: the gateway's external address {address} is not public, so another NAT sits upstream and mappings there do not make this host reachable from the internet"),
            )
            .fix("put the router in bridge mode, or ask the provider for a public address (or use a VPN provider's port forwarding)"),
        ),
        Ok(Some(address)) => {
            checks.push(Check::new("gateway", Status::Ok, format!("external address {address} (public: no double NAT)")))
        }
        Ok(None) => checks.push(Check::new(
            "gateway",
            Status::Info,
            format!("{} tells its external address only with a mapping: natbinder checks for a double NAT then", gateway.backend()),
        )),
        Err(e) => checks.push(Check::new("gateway", Status::Warn, format!("asking the external address failed: {e}"))),
    }
    checks
}

fn host_firewall() -> Vec<Check> {
    let findings = firewall::inspect();
    if findings.is_empty() {
        return vec![Check::new(
            "firewall",
            Status::Ok,
            "no input filter that drops by default was found (nftables, iptables-legacy, ufw, firewalld)",
        )];
    }
    findings
        .into_iter()
        .map(|f| {
            Check::new(
                "firewall",
                Status::Warn,
                format!("{}: {} (a mapping is useless if this host drops what it lets in)", f.source, f.detail),
            )
            .fix(f.fix)
        })
        .collect()
}

async fn daemon(socket: &Path) -> Check {
    let answered = tokio::time::timeout(Duration::from_secs(3), async {
        let mut client = Client::connect(socket).await?;
        client.call("io.natbinder.Status", json!({})).await
    })
    .await;
    match answered {
        Ok(Ok(status)) => {
            let version = status.get("version").and_then(Value::as_str).unwrap_or("?");
            Check::new("daemon", Status::Ok, format!("natbinder {version} answers on {}", socket.display()))
        }
        Ok(Err(ClientError::NotRunning { source, .. })) if socket.exists() => Check::new(
            "daemon",
            Status::Warn,
            format!(
                "stale control socket {}: nothing answers on it ({source}); a daemon that crashed left it",
                socket.display()
            ),
        )
        .fix(format!("start natbinder (it replaces the file), or remove {}", socket.display())),
        Ok(Err(ClientError::NotRunning { .. })) => {
            Check::new("daemon", Status::Info, format!("not running (no control socket at {})", socket.display()))
                .fix("start it: `systemctl start natbinder`, or `natbinder daemon`")
        }
        Ok(Err(e)) => Check::new("daemon", Status::Warn, format!("{} answered badly: {e}", socket.display())),
        Err(_) => Check::new(
            "daemon",
            Status::Warn,
            format!("a process holds {} but does not answer within 3 s (frozen?)", socket.display()),
        ),
    }
}

/// The report as JSON: `{"checks": [{"area", "status", "detail", "fix"}], "blocked": bool}`.
pub fn to_json(checks: &[Check]) -> Value {
    json!({
        "checks": checks
            .iter()
            .map(|c| json!({"area": c.area, "status": c.status.name(), "detail": c.detail, "fix": c.fix}))
            .collect::<Vec<_>>(),
        "blocked": blocked(checks),
    })
}

/// The report for people: one line a finding, what to do under it.
pub fn to_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!("{:<10} {:<4}  {}\n", c.area, c.status.name(), c.detail));
        if let Some(fix) = &c.fix {
            if c.status >= Status::Info {
                out.push_str(&format!("{:<16}-> {fix}\n", ""));
            }
        }
    }
    out.push_str(if blocked(checks) {
        "\nsomething above keeps natbinder from working (fail)\n"
    } else {
        "\nnothing keeps natbinder from working\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_blocks_and_the_report_says_what_to_do_under_each_finding() {
        let checks = vec![
            Check::new("kernel", Status::Ok, "BTF"),
            Check::new("cgroup2", Status::Fail, "no cgroup2 filesystem is mounted").fix("mount it"),
            Check::new("firewall", Status::Warn, "ufw is active").fix("sudo ufw allow PORT/tcp"),
        ];
        assert!(blocked(&checks));
        assert!(!blocked(&checks[..1]));
        let text = to_text(&checks);
        assert!(
            text.contains("cgroup2    fail  no cgroup2 filesystem is mounted\n                -> mount it\n"),
            "{text}"
        );
        assert!(text.ends_with("keeps natbinder from working (fail)\n"), "{text}");
        let json = to_json(&checks);
        assert_eq!(json["blocked"], true);
        assert_eq!(json["checks"][2]["status"], "warn");
        assert_eq!(json["checks"][0]["fix"], Value::Null);
    }
}
