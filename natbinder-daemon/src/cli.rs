//! The `natbinder` command line. Each subcommand validates its input into a typed configuration and
//! says, on bad input, what was wrong and what to do.
use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use crate::daemon::DaemonConfig;

#[derive(Debug, Parser)]
#[command(name = "natbinder", version, about = "Makes NAT transparent to programs that listen", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch binds in a cgroup and forward their ports on the LAN gateway.
    Daemon(DaemonArgs),
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// cgroup (v2) whose programs get forwarding: a path, absolute or relative to the cgroup2 mount.
    /// Default: the cgroup2 root, i.e. every program on this machine.
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,

    /// Lowest port that is forwarded; lower ports are never mapped.
    #[arg(long, value_name = "PORT", default_value_t = 1024)]
    pub min_port: u16,

    /// Lease asked for each mapping, renewed at half-life (60..=604800).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    pub lease: u64,

    /// Period of the full check of the gateway's table.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub reconcile_interval: u64,

    /// How long one SSDP search for the gateway waits for answers.
    #[arg(long, value_name = "SECONDS", default_value_t = 3)]
    pub discovery_timeout: u64,

    /// Size of the kernel's event ring buffer in KiB (a power of two, 4 or more). If a bind storm
    /// overflows it, the daemon notices and resynchronises from sock_diag.
    #[arg(long, value_name = "KIB", default_value_t = 256)]
    pub event_buffer_kib: u32,

    /// Directory for natbinder's state: the journal of the mappings it made, so that a restarted
    /// daemon deletes those no socket needs any more.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/natbinder")]
    pub state_dir: PathBuf,
}

impl DaemonArgs {
    pub fn into_config(self) -> Result<DaemonConfig> {
        if self.min_port < 1024 {
            bail!(
                "--min-port {} is a privileged port: natbinder never maps ports below 1024; use 1024 or more",
                self.min_port
            );
        }
        if !(60..=604_800).contains(&self.lease) {
            bail!("--lease {} is out of range: use 60 to 604800 seconds (IGDv2's cap is one week)", self.lease);
        }
        if !(1..=86_400).contains(&self.reconcile_interval) {
            bail!("--reconcile-interval {} is out of range: use 1 to 86400 seconds", self.reconcile_interval);
        }
        if !(1..=60).contains(&self.discovery_timeout) {
            bail!("--discovery-timeout {} is out of range: use 1 to 60 seconds", self.discovery_timeout);
        }
        if self.event_buffer_kib < 4 || !self.event_buffer_kib.is_power_of_two() || self.event_buffer_kib > 1 << 20 {
            bail!("--event-buffer-kib {} must be a power of two from 4 to 1048576", self.event_buffer_kib);
        }
        Ok(DaemonConfig {
            cgroup: self.cgroup,
            min_port: self.min_port,
            lease: Duration::from_secs(self.lease),
            reconcile_interval: Duration::from_secs(self.reconcile_interval),
            discovery_timeout: Duration::from_secs(self.discovery_timeout),
            event_buffer_bytes: self.event_buffer_kib * 1024,
            state_dir: self.state_dir,
            ..DaemonConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<DaemonConfig> {
        let cli = Cli::try_parse_from(args)?;
        let Command::Daemon(args) = cli.command;
        args.into_config()
    }

    #[test]
    fn defaults() {
        let c = parse(&["natbinder", "daemon"]).unwrap();
        assert_eq!((c.min_port, c.lease.as_secs(), c.reconcile_interval.as_secs()), (1024, 3600, 60));
        assert!(c.cgroup.is_none());
    }

    #[test]
    fn bad_values_name_the_problem() {
        let e = parse(&["natbinder", "daemon", "--min-port", "80"]).unwrap_err().to_string();
        assert!(e.contains("--min-port 80") && e.contains("1024"), "{e}");
        let e = parse(&["natbinder", "daemon", "--lease", "10"]).unwrap_err().to_string();
        assert!(e.contains("--lease 10"), "{e}");
        assert!(parse(&["natbinder", "daemon", "--min-port", "70000"]).is_err());
    }
}
