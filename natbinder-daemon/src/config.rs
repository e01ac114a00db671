//! The daemon's configuration file (TOML, `/etc/natbinder/natbinder.toml` by default). Parsed strictly:
//! an unknown key is an error that names it, so a typo never silently does nothing. Every value can also
//! be given on the command line, which wins.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

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
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        toml::from_str(text).with_context(|| format!("{} is not a valid natbinder configuration", origin.display()))
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
        "#;
        let c = ConfigFile::parse(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.min_port, Some(2000));
        assert_eq!(c.reconcile_interval_seconds, Some(30));
        assert_eq!(c.cgroup.as_deref(), Some(Path::new("forwarded.slice")));
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
    fn a_missing_default_file_is_fine_but_a_named_one_is_not() {
        let missing = Path::new("/nonexistent/natbinder.toml");
        assert_eq!(ConfigFile::load(missing, false).unwrap(), ConfigFile::default());
        assert!(format!("{:#}", ConfigFile::load(missing, true).unwrap_err()).contains("/nonexistent/natbinder.toml"));
    }
}
