//! The daemon's configuration file (TOML, `/etc/natbinder/natbinder.toml` by default). Parsed strictly:
//! an unknown key is an error that names it, so a typo never silently does nothing. Every value can also
//! be given on the command line, which wins.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::policy::{PolicySpec, RuleSpec};

pub const DEFAULT_PATH: &str = "/etc/natbinder/natbinder.toml";

/// The file's contents; every key is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub cgroup: Option<PathBuf>,
    pub min_port: Option<u16>,
    pub lease_seconds: Option<u64>,
    pub reconcile_interval_seconds: Option<u64>,
    pub discovery_timeout_seconds: Option<u64>,
    pub event_buffer_kib: Option<u32>,
    pub state_dir: Option<PathBuf>,
    pub backend: Option<BackendChoice>,
    /// Names, checked when the configuration is validated: "upnp", "pcp", "natpmp".
    pub backend_order: Option<Vec<String>>,
    /// Concurrent mappings each uid may hold; 0: no limit.
    pub max_mappings_per_user: Option<u32>,
    /// Where the control socket lives.
    pub control_socket: Option<PathBuf>,
    /// Members of this group may change things over the control socket ("" for none).
    pub operator_group: Option<String>,
    /// These uids may too.
    pub operator_uids: Option<Vec<u32>>,
    /// Who may start programs with `natbinder run`: "everyone" (the default) or "operators".
    pub run_allowed: Option<crate::control::RunAllowed>,
    /// Who makes `natbinder run`'s cgroups: "auto" (the default), "systemd" or "daemon".
    pub run_cgroups: Option<crate::run::cgroups::RunPlacement>,
    /// Keep a mapping the gateway grants on another external port (VPN providers choose the port).
    pub keep_gateway_chosen_ports: Option<bool>,
    /// The exposure policy's own rules (`[[rule]]` tables), in order; see [`crate::policy::spec`].
    #[serde(default)]
    pub rule: Vec<toml::Spanned<RuleSpec>>,
    /// Where `rule`'s entries were written ("FILE line N"), filled in by [`ConfigFile::parse`].
    #[serde(skip)]
    pub rule_origins: Vec<String>,
}

/// `backend`: which protocol maps ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// Probe them all and use the first in the backend order that answers.
    Auto,
    Upnp,
    Pcp,
    Natpmp,
}

impl ConfigFile {
    /// Parses and checks `text`, read from `origin`: an error names the file, and the line where it
    /// can tell.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let mut file: Self = toml::from_str(text)
            .with_context(|| format!("{} is not a valid natbinder configuration", origin.display()))?;
        file.rule_origins = file
            .rule
            .iter()
            .map(|rule| {
                let line = text[..rule.span().start.min(text.len())].matches('\n').count() + 1;
                format!("{} line {line}", origin.display())
            })
            .collect();
        // Rules are checked now, so that a bad one stops the start (or a reload) with its line.
        file.policy_spec().validate()?;
        Ok(file)
    }

    /// The rules with where each was written.
    pub fn policy_spec(&self) -> PolicySpec {
        PolicySpec {
            rules: self
                .rule
                .iter()
                .zip(&self.rule_origins)
                .map(|(rule, origin)| (origin.clone(), rule.get_ref().clone()))
                .collect(),
        }
    }

    /// Reads `path`; `explicit` says the user named it, so a missing file is an error rather than
    /// "no configuration".
    pub fn load(path: &Path, explicit: bool) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading the configuration file {}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let text = r#"
            cgroup = "forwarded.slice"
            min-port = 2000
            lease-seconds = 7200
            reconcile-interval-seconds = 30
            discovery-timeout-seconds = 5
            event-buffer-kib = 512
            state-dir = "/var/lib/natbinder"
            backend = "auto"
            backend-order = ["pcp", "natpmp", "upnp"]
            run-allowed = "operators"
        "#;
        let c = ConfigFile::parse(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.min_port, Some(2000));
        assert_eq!(c.reconcile_interval_seconds, Some(30));
        assert_eq!(c.cgroup.as_deref(), Some(Path::new("forwarded.slice")));
        assert_eq!(c.run_allowed, Some(crate::control::RunAllowed::Operators));
        let err = format!("{:#}", ConfigFile::parse("run-allowed = \"anyone\"", Path::new("n.toml")).unwrap_err());
        assert!(err.contains("run-allowed") && err.contains("everyone"), "{err}");
    }

    #[test]
    fn an_empty_file_is_all_defaults() {
        assert_eq!(ConfigFile::parse("", Path::new("t.toml")).unwrap(), ConfigFile::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_problem() {
        let err = format!(
            "{:#}",
            ConfigFile::parse("reconcile-intervall-seconds = 5", Path::new("/etc/n.toml")).unwrap_err()
        );
        assert!(err.contains("/etc/n.toml") && err.contains("reconcile-intervall-seconds"), "{err}");
        let err = format!("{:#}", ConfigFile::parse("min-port = \"high\"", Path::new("n.toml")).unwrap_err());
        assert!(err.contains("min-port"), "{err}");
        assert!(ConfigFile::parse("min-port = 70000", Path::new("n.toml")).is_err());
    }

    #[test]
    fn rules_parse_in_order_and_a_bad_one_names_its_file_and_line() {
        let text = "max-mappings-per-user = 8\n\n[[rule]]\naction = \"allow\"\nports = 8000\n\n[[rule]]\naction = \"deny\"\nunit = \"docker-*.scope\"\n";
        let c = ConfigFile::parse(text, Path::new("/etc/n.toml")).unwrap();
        assert_eq!(c.max_mappings_per_user, Some(8));
        let spec = c.policy_spec();
        let origins: Vec<&str> = spec.rules.iter().map(|(o, _)| o.as_str()).collect();
        assert_eq!(origins, ["/etc/n.toml line 3", "/etc/n.toml line 7"]);
        let bad = "[[rule]]\naction = \"allow\"\n\n[[rule]]\naction = \"deny\"\nports = \"90-80\"\n";
        let err = format!("{:#}", ConfigFile::parse(bad, Path::new("/etc/n.toml")).unwrap_err());
        assert!(err.contains("/etc/n.toml line 4") && err.contains("empty range"), "{err}");
        let err = format!("{:#}", ConfigFile::parse("[[rule]]\nacton = \"deny\"\n", Path::new("n.toml")).unwrap_err());
        assert!(err.contains("acton") && err.contains("line"), "{err}");
    }

    #[test]
    fn a_missing_default_file_is_fine_but_a_named_one_is_not() {
        let missing = Path::new("/nonexistent/natbinder.toml");
        assert_eq!(ConfigFile::load(missing, false).unwrap(), ConfigFile::default());
        assert!(format!("{:#}", ConfigFile::load(missing, true).unwrap_err()).contains("/nonexistent/natbinder.toml"));
    }
}
