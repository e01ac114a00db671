//! The `natbinder` command line. Each subcommand validates its input into a typed configuration and
//! says, on bad input, what was wrong and what to do. `daemon` runs the daemon; the others talk to it
//! over the control socket ([`show`]).
//!
//! Exit codes: 0 done, 1 failed, 2 bad arguments, 3 the daemon is not running, 4 not permitted.
use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

pub mod docs;
pub mod show;

use crate::{
    config::{BackendChoice, ConfigFile, ConfigLayout},
    control::ControlConfig,
    daemon::{DaemonConfig, ReloadSource},
    gateway::select::{self, Backend},
};

#[derive(Debug, Parser)]
#[command(
    name = "natbinder",
    version,
    about = "Makes NAT transparent to programs that listen",
    long_about = "Makes NAT transparent to programs that listen.\n\n\
        The daemon (natbinder.service) watches binds through small eBPF programs on the cgroup bind and \
        release hooks. When a program binds a non-privileged port on the wildcard address and the exposure \
        policy allows it, the LAN gateway forwards that port to it (UPnP IGD, PCP or NAT-PMP) until the \
        socket is released, however the program ends. A port another host holds on the gateway makes bind() \
        fail with EADDRINUSE where the kernel knows it in time (always under `natbinder run --wait`).\n\n\
        The other commands ask the running daemon over its control socket, or check this machine (doctor, \
        check-config).",
    after_long_help = "Files:\n  \
        /etc/natbinder/natbinder.toml       the configuration (every key commented)\n  \
        /etc/natbinder/natbinder.d/*.toml   drop-ins, read in name order after it\n  \
        /usr/lib/natbinder/                 the vendor's defaults, hidden by /etc's files of the same name\n  \
        /var/lib/natbinder/                 the journal of mappings (crash recovery) and static mappings\n  \
        /run/natbinder/io.natbinder         the control socket\n\n\
        Troubleshooting: `natbinder doctor`. Logs: `journalctl -u natbinder`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The configuration `natbinder daemon ARGS...` would run with, reading the files of `layout`
    /// when ARGS name no --config: for running the daemon in another program's process.
    pub fn daemon_config(args: &[String], layout: &ConfigLayout) -> Result<DaemonConfig> {
        let argv = ["natbinder", "daemon"].into_iter().map(String::from).chain(args.iter().cloned());
        match Cli::try_parse_from(argv)?.command {
            Command::Daemon(daemon) => daemon.into_config_with_layout(layout),
            _ => unreachable!("parsed as `natbinder daemon`"),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch binds in a cgroup and forward their ports on the LAN gateway.
    Daemon(DaemonArgs),
    /// The daemon, its gateway, the external address, and counts of mappings by state.
    Status(show::Output),
    /// One line per forwarded port and per bound socket that is not forwarded, and why.
    List {
        /// Also the ports other LAN hosts hold on the gateway (read-only).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        output: show::Output,
    },
    /// One port, as `list` shows it.
    Get {
        #[arg(value_enum)]
        protocol: show::ProtocolArg,
        #[arg(value_parser = clap::value_parser!(u16).range(1..))]
        port: u16,
        #[command(flatten)]
        output: show::Output,
    },
    /// The gateway's external (public) address.
    ExternalIp(show::Output),
    /// What happens, as it happens: mappings made and removed, binds refused, the gateway found or
    /// lost. One line each (JSON lines with --json), until interrupted.
    Watch(show::Output),
    /// Apply the configuration file's policy and limits again, as SIGHUP does (root or operators).
    Reload(show::Output),
    /// Forward PORT to this host whether or not a program listens there; kept across restarts
    /// (root or operators). Adding one that exists changes its description.
    Add {
        #[command(flatten)]
        target: show::Target,
        /// What the gateway shows for it (UPnP IGD), at most 64 characters. [default: static]
        #[arg(long, value_name = "TEXT")]
        description: Option<String>,
        #[command(flatten)]
        output: show::Output,
    },
    /// Delete a static mapping made with `add` (root or operators).
    Delete {
        #[command(flatten)]
        target: show::Target,
        #[command(flatten)]
        output: show::Output,
    },
    /// Forward a port again after `disable` (root or operators).
    Enable {
        #[command(flatten)]
        target: show::Target,
        #[command(flatten)]
        output: show::Output,
    },
    /// Stop forwarding a port without forgetting it: its mapping comes off the gateway, programs keep
    /// their sockets; kept across restarts (root or operators).
    Disable {
        #[command(flatten)]
        target: show::Target,
        #[command(flatten)]
        output: show::Output,
    },
    /// Change the description the gateway shows for a mapping (root or operators).
    Describe {
        #[command(flatten)]
        target: show::Target,
        /// At most 64 characters.
        text: String,
        #[command(flatten)]
        output: show::Output,
    },
    /// Write the man pages and the shell completions (for packages: `cargo xtask deb`).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        man: PathBuf,
        #[arg(long, value_name = "DIR")]
        completions: PathBuf,
    },
    /// Read the whole configuration as the daemon would, and say what it amounts to or what is wrong.
    ///
    /// /etc/natbinder/natbinder.toml (or the vendor's /usr/lib/natbinder/natbinder.toml), then the
    /// drop-ins in /usr/lib/natbinder/natbinder.d and /etc/natbinder/natbinder.d in name order; or the
    /// one file --config names. Exits 1 with the file, the line and what is wrong.
    CheckConfig {
        /// Check this file alone.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Check what natbinder needs on this machine, and say what to do about what is missing.
    ///
    /// The kernel's features (probed: BTF, the cgroup bind hooks, bpf_link, bpf_set_retval,
    /// SO_NETNS_COOKIE), the cgroup2 mount, the privileges, each gateway protocol with how long it took
    /// to answer, a double NAT, this host's firewall (would it drop what a mapping lets in?), and the
    /// control socket. Exits 1 when something keeps natbinder from working.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH", default_value = crate::control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// How long each gateway protocol may take to answer.
        #[arg(long, value_name = "SECONDS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
        discovery_timeout: u64,
    },
    /// Run COMMAND with its wildcard binds forwarded (--wait: bind() returns once the gateway answered).
    ///
    /// Everything COMMAND starts is forwarded too, under the policy (the configuration's rules, the
    /// deny list, the per-user limit). With --wait, each forwarded bind() returns only once the gateway
    /// has answered, and fails with EADDRINUSE when another host holds the port, so that the program's
    /// port search moves on. Exits with COMMAND's status. Without a running daemon, COMMAND runs with
    /// plain binds.
    Run(crate::run::RunArgs),
}

/// Options of `natbinder daemon`. Each can also be set in the configuration file; the command line wins.
#[derive(Clone, Debug, Args)]
pub struct DaemonArgs {
    /// Configuration file (TOML). Default: /etc/natbinder/natbinder.toml if it exists.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// cgroup (v2) whose programs get forwarding: a path, absolute or relative to the cgroup2 mount.
    /// Default: the cgroup2 root, i.e. every program on this machine.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

    /// Lowest port that is forwarded; lower ports are never mapped. [default: 1024]
    #[arg(long, value_name = "PORT")]
    pub min_port: Option<u16>,

    /// Lease asked for each mapping, renewed at half-life (60..=604800). [default: 3600]
    #[arg(long, value_name = "SECONDS")]
    pub lease: Option<u64>,

    /// Period of the full check of the gateway's table and of the sockets. [default: 60]
    #[arg(long, value_name = "SECONDS")]
    pub reconcile_interval: Option<u64>,

    /// How long the search for the gateway waits for answers (the SSDP search, and the NAT-PMP/PCP
    /// probes). [default: 3]
    #[arg(long, value_name = "SECONDS")]
    pub discovery_timeout: Option<u64>,

    /// Size of the kernel's event ring buffer in KiB (a power of two, 4 or more). If a bind storm
    /// overflows it, the daemon notices and resynchronises from sock_diag. [default: 256]
    #[arg(long, value_name = "KIB")]
    pub event_buffer_kib: Option<u32>,

    /// Directory for natbinder's state: the journal of the mappings it made, so that a restarted
    /// daemon deletes those no socket needs any more. [default: /var/lib/natbinder]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Protocol to map ports with: `auto` probes UPnP IGD, PCP and NAT-PMP side by side and uses the
    /// first in --backend-order that answers; the others use that protocol only. [default: auto]
    #[arg(long, value_name = "PROTOCOL")]
    pub backend: Option<BackendChoice>,

    /// Preference order for `--backend auto`, comma-separated. [default: upnp,pcp,natpmp]
    #[arg(long, value_name = "LIST")]
    pub backend_order: Option<String>,

    /// Concurrent mappings each user (uid) may hold; 0: no limit. Binds over the limit work locally and
    /// are mapped when one of that user's mappings goes. [default: 32]
    #[arg(long, value_name = "N")]
    pub max_mappings_per_user: Option<u32>,

    /// Where the control socket lives (`natbinder status`, `list`, `watch` talk to it).
    /// [default: /run/natbinder/io.natbinder]
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// When a NAT-PMP/PCP gateway grants another external port than the program's (VPN providers
    /// choose the port themselves), keep that mapping and show its port in list and watch, instead
    /// of deleting it. For programs configured by hand to announce the port.
    #[arg(long)]
    pub keep_gateway_chosen_ports: bool,

    /// Who makes the cgroups of the programs `natbinder run` starts: systemd (a transient scope in
    /// natbinder.slice each), the daemon (natbinder-run/ under its own cgroup), or `auto`: systemd
    /// where it runs. [default: auto]
    #[arg(long, value_name = "WHO", value_enum)]
    pub run_cgroups: Option<crate::run::cgroups::RunPlacement>,
}

/// `natbinder check-config`: the files read and the settings they make, or the first error.
pub fn check_config(config: Option<PathBuf>, layout: &ConfigLayout) -> Result<String> {
    let mut argv = vec!["natbinder".into(), "daemon".into()];
    if let Some(file) = config {
        argv.extend(["--config".into(), file.into_os_string()]);
    }
    let Command::Daemon(args) = Cli::try_parse_from(argv)?.command else { unreachable!("parsed as daemon") };
    let (config, files) = args.read_config(layout)?;
    let rules = config.policy.validate()?.len();
    let mut out = String::from("configuration: ok\n");
    let read: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    out.push_str(&format!(
        "read: {}\n",
        if read.is_empty() { "no file (the defaults)".to_string() } else { read.join(", ") }
    ));
    let backends: Vec<String> = config.backends.iter().map(|b| b.to_string()).collect();
    let lines = [
        ("cgroup", config.cgroup.as_ref().map_or("the whole machine".to_string(), |c| c.display().to_string())),
        ("min-port", config.min_port.to_string()),
        ("lease-seconds", config.lease.as_secs().to_string()),
        ("reconcile-interval-seconds", config.reconcile_interval.as_secs().to_string()),
        ("discovery-timeout-seconds", config.discovery_timeout.as_secs().to_string()),
        ("event-buffer-kib", (config.event_buffer_bytes / 1024).to_string()),
        ("state-dir", config.state_dir.display().to_string()),
        ("backends, best first", backends.join(", ")),
        ("max-mappings-per-user", config.max_mappings_per_user.to_string()),
        ("control-socket", config.control.socket.display().to_string()),
        ("operator-group", config.control.operator_group.clone().unwrap_or_else(|| "none".into())),
        ("operator-uids", format!("{:?}", config.control.operator_uids)),
        ("run-allowed", format!("{:?}", config.control.run_allowed).to_lowercase()),
        ("run-cgroups", format!("{:?}", config.run_cgroups).to_lowercase()),
        ("keep-gateway-chosen-ports", config.keep_gateway_chosen_ports.to_string()),
        ("rules", format!("{rules} of yours, then the deny list, `natbinder run`'s programs and the default")),
    ];
    for (key, value) in lines {
        out.push_str(&format!("{key}: {value}\n"));
    }
    Ok(out)
}

impl DaemonArgs {
    /// Reads the configuration (/etc/natbinder, /usr/lib/natbinder), lets the command line override
    /// it, and validates the result.
    pub fn into_config(self) -> Result<DaemonConfig> {
        self.into_config_with_layout(&ConfigLayout::system())
    }

    /// As [`DaemonArgs::into_config`], with the configuration files of `layout` when no --config
    /// names one file.
    pub fn into_config_with_layout(self, layout: &ConfigLayout) -> Result<DaemonConfig> {
        self.read_config(layout).map(|(config, _)| config)
    }

    /// The configuration and the files it was read from.
    pub fn read_config(self, layout: &ConfigLayout) -> Result<(DaemonConfig, Vec<PathBuf>)> {
        let again = ReloadSource { args: Box::new(self.clone()), layout: layout.clone() };
        let (file, files) = match &self.config {
            Some(path) => (ConfigFile::load(path, true)?, vec![path.clone()]),
            None => layout.load()?,
        };
        let max_mappings_per_user = self
            .max_mappings_per_user
            .or(file.max_mappings_per_user)
            .unwrap_or(crate::policy::DEFAULT_MAX_MAPPINGS_PER_USER);
        let policy = file.policy_spec();
        let defaults = DaemonConfig::default();
        let min_port = self.min_port.or(file.min_port).unwrap_or(defaults.min_port);
        let lease = self.lease.or(file.lease_seconds).unwrap_or(defaults.lease.as_secs());
        let interval = self
            .reconcile_interval
            .or(file.reconcile_interval_seconds)
            .unwrap_or(defaults.reconcile_interval.as_secs());
        let discovery =
            self.discovery_timeout.or(file.discovery_timeout_seconds).unwrap_or(defaults.discovery_timeout.as_secs());
        let buffer_kib = self.event_buffer_kib.or(file.event_buffer_kib).unwrap_or(defaults.event_buffer_bytes / 1024);
        let file_order = match &file.backend_order {
            Some(names) => Some(
                select::parse_order(&names.join(","))
                    .map_err(|e| anyhow::anyhow!("backend-order in the configuration file: {e}"))?,
            ),
            None => None,
        };
        let cli_order = match &self.backend_order {
            Some(text) => Some(select::parse_order(text).map_err(|e| anyhow::anyhow!("--backend-order: {e}"))?),
            None => None,
        };
        let backends = match self.backend.or(file.backend).unwrap_or(BackendChoice::Auto) {
            BackendChoice::Auto => cli_order.or(file_order).unwrap_or(defaults.backends.clone()),
            BackendChoice::Upnp => vec![Backend::Upnp],
            BackendChoice::Pcp => vec![Backend::Pcp],
            BackendChoice::Natpmp => vec![Backend::NatPmp],
        };
        if min_port < 1024 {
            bail!("min-port {min_port} is a privileged port: natbinder never maps ports below 1024; use 1024 or more");
        }
        if !(60..=604_800).contains(&lease) {
            bail!("lease {lease} is out of range: use 60 to 604800 seconds (IGDv2's cap is one week)");
        }
        if !(1..=86_400).contains(&interval) {
            bail!("reconcile-interval {interval} is out of range: use 1 to 86400 seconds");
        }
        if !(1..=60).contains(&discovery) {
            bail!("discovery-timeout {discovery} is out of range: use 1 to 60 seconds");
        }
        if buffer_kib < 4 || !buffer_kib.is_power_of_two() || buffer_kib > 1 << 20 {
            bail!("event-buffer-kib {buffer_kib} must be a power of two from 4 to 1048576");
        }
        let config = DaemonConfig {
            cgroup: self.cgroup.or(file.cgroup),
            min_port,
            lease: Duration::from_secs(lease),
            reconcile_interval: Duration::from_secs(interval),
            discovery_timeout: Duration::from_secs(discovery),
            event_buffer_bytes: buffer_kib * 1024,
            state_dir: self.state_dir.or(file.state_dir).unwrap_or(defaults.state_dir),
            backends,
            policy,
            max_mappings_per_user,
            keep_gateway_chosen_ports: self.keep_gateway_chosen_ports
                || file.keep_gateway_chosen_ports.unwrap_or(false),
            run_cgroups: self.run_cgroups.or(file.run_cgroups).unwrap_or_default(),
            control: ControlConfig {
                socket: self.control_socket.or(file.control_socket).unwrap_or(defaults.control.socket),
                operator_group: match file.operator_group {
                    Some(group) if group.is_empty() => None,
                    Some(group) => Some(group),
                    None => defaults.control.operator_group,
                },
                operator_uids: file.operator_uids.unwrap_or_default(),
                run_allowed: file.run_allowed.unwrap_or_default(),
            },
            reload: Some(again),
            ..defaults
        };
        Ok((config, files))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// As the command line is parsed, but never reading this machine's /etc: with no --config, the
    /// default file is one that does not exist.
    fn parse(args: &[&str]) -> Result<DaemonConfig> {
        let cli = Cli::try_parse_from(args)?;
        let Command::Daemon(args) = cli.command else { panic!("not a daemon command") };
        args.into_config_with_layout(&ConfigLayout::rooted(Path::new("/nonexistent/natbinder-test")))
    }

    #[test]
    fn the_command_line_overrides_the_file() {
        let dir = std::env::temp_dir().join(format!("natbinder-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("natbinder.toml");
        std::fs::write(&file, "reconcile-interval-seconds = 30\nmin-port = 2000\n").unwrap();
        let f = file.to_str().unwrap();
        let c = parse(&["natbinder", "daemon", "--config", f, "--min-port", "3000"]).unwrap();
        assert_eq!((c.reconcile_interval.as_secs(), c.min_port), (30, 3000));
        std::fs::write(&file, "min-port = 80\n").unwrap();
        assert!(parse(&["natbinder", "daemon", "--config", f]).unwrap_err().to_string().contains("min-port 80"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn defaults() {
        let c = parse(&["natbinder", "daemon"]).unwrap();
        assert_eq!((c.min_port, c.lease.as_secs(), c.reconcile_interval.as_secs()), (1024, 3600, 60));
        assert!(c.cgroup.is_none());
        assert_eq!(c.state_dir, Path::new("/var/lib/natbinder"));
    }

    #[test]
    fn the_default_file_is_read_when_present_and_no_config_is_named() {
        let dir = std::env::temp_dir().join(format!("natbinder-cli-default-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("natbinder.toml");
        std::fs::write(&file, "reconcile-interval-seconds = 7\n").unwrap();
        let Command::Daemon(args) = Cli::try_parse_from(["natbinder", "daemon"]).unwrap().command else {
            panic!("not a daemon command")
        };
        let layout = ConfigLayout { main: file.clone(), ..ConfigLayout::rooted(&dir) };
        assert_eq!(args.into_config_with_layout(&layout).unwrap().reconcile_interval.as_secs(), 7);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backends_are_chosen_on_the_command_line_or_in_the_file() {
        use Backend::*;
        assert_eq!(parse(&["natbinder", "daemon"]).unwrap().backends, vec![Upnp, Pcp, NatPmp]);
        assert_eq!(parse(&["natbinder", "daemon", "--backend", "natpmp"]).unwrap().backends, vec![NatPmp]);
        let c = parse(&["natbinder", "daemon", "--backend-order", "pcp,upnp"]).unwrap();
        assert_eq!(c.backends, vec![Pcp, Upnp]);
        let e = parse(&["natbinder", "daemon", "--backend", "igd"]).unwrap_err().to_string();
        assert!(e.contains("igd") && e.contains("natpmp"), "{e}");
        let e = parse(&["natbinder", "daemon", "--backend-order", "pcp,pcp"]).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");

        let dir = std::env::temp_dir().join(format!("natbinder-cli-backend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("natbinder.toml");
        let f = file.to_str().unwrap();
        std::fs::write(&file, "backend-order = [\"natpmp\", \"pcp\"]\n").unwrap();
        assert_eq!(parse(&["natbinder", "daemon", "--config", f]).unwrap().backends, vec![NatPmp, Pcp]);
        assert_eq!(parse(&["natbinder", "daemon", "--config", f, "--backend", "upnp"]).unwrap().backends, vec![Upnp]);
        std::fs::write(&file, "backend = \"pcp\"\n").unwrap();
        assert_eq!(parse(&["natbinder", "daemon", "--config", f]).unwrap().backends, vec![Pcp]);
        std::fs::write(&file, "backend-order = [\"upnp\", \"nat-pmp\"]\n").unwrap();
        let e = format!("{:#}", parse(&["natbinder", "daemon", "--config", f]).unwrap_err());
        assert!(e.contains("backend-order") && e.contains("nat-pmp"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_limit_per_user_and_the_rules_come_from_the_file_and_the_command_line_wins() {
        assert_eq!(parse(&["natbinder", "daemon"]).unwrap().max_mappings_per_user, 32);
        let dir = std::env::temp_dir().join(format!("natbinder-cli-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("natbinder.toml");
        let f = file.to_str().unwrap();
        std::fs::write(&file, "max-mappings-per-user = 4\n[[rule]]\naction = \"deny\"\nports = 7000\n").unwrap();
        let c = parse(&["natbinder", "daemon", "--config", f]).unwrap();
        assert_eq!((c.max_mappings_per_user, c.policy.rules.len()), (4, 1));
        let c = parse(&["natbinder", "daemon", "--config", f, "--max-mappings-per-user", "0"]).unwrap();
        assert_eq!(c.max_mappings_per_user, 0);
        // A reload reads the file again, and the command line still wins.
        std::fs::write(&file, "max-mappings-per-user = 9\n").unwrap();
        let again = c.reload.as_ref().unwrap().read().unwrap();
        assert_eq!((again.policy.rules.len(), again.max_mappings_per_user), (0, 0));
        std::fs::write(&file, "lease-seconds = 120\nmin-port = 2000\n").unwrap();
        let again = c.reload.as_ref().unwrap().read().unwrap();
        assert_eq!((again.lease.as_secs(), again.min_port), (120, 2000), "a reload reads every setting");
        std::fs::write(&file, "[[rule]]\naction = \"alow\"\n").unwrap();
        let e = format!("{:#}", c.reload.as_ref().unwrap().read().unwrap_err());
        assert!(e.contains(&format!("{f} line 1")) && e.contains("\"alow\""), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn check_config_says_what_was_read_and_what_it_makes_or_where_it_is_wrong() {
        let dir = std::env::temp_dir().join(format!("natbinder-check-config-{}", std::process::id()));
        let layout = ConfigLayout::rooted(&dir);
        std::fs::create_dir_all(&layout.dropins).unwrap();
        let report = check_config(None, &layout).unwrap();
        assert!(report.contains("read: no file (the defaults)") && report.contains("min-port: 1024"), "{report}");
        std::fs::write(&layout.main, "lease-seconds = 7200\n").unwrap();
        std::fs::write(layout.dropins.join("10-games.toml"), "[[rule]]\naction = \"allow\"\nports = 27015\n").unwrap();
        let report = check_config(None, &layout).unwrap();
        assert!(report.contains("lease-seconds: 7200") && report.contains("rules: 1 of yours"), "{report}");
        assert!(report.contains("natbinder.toml, ") && report.contains("10-games.toml"), "{report}");
        std::fs::write(layout.dropins.join("20-bad.toml"), "\n[[rule]]\naction = \"allow\"\nports = \"9-1\"\n")
            .unwrap();
        let err = format!("{:#}", check_config(None, &layout).unwrap_err());
        assert!(err.contains("20-bad.toml line 2") && err.contains("empty range"), "{err}");
        let err = format!("{:#}", check_config(Some(dir.join("missing.toml")), &layout).unwrap_err());
        assert!(err.contains("missing.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_name_the_problem() {
        let e = parse(&["natbinder", "daemon", "--min-port", "80"]).unwrap_err().to_string();
        assert!(e.contains("min-port 80") && e.contains("1024"), "{e}");
        let e = parse(&["natbinder", "daemon", "--lease", "10"]).unwrap_err().to_string();
        assert!(e.contains("lease 10"), "{e}");
        assert!(parse(&["natbinder", "daemon", "--min-port", "70000"]).is_err());
    }
}
