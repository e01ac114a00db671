//! The daemon's configuration (TOML), as distributions lay it out ([`ConfigLayout`]):
//! 1. `/etc/natbinder/natbinder.toml`, the administrator's (a conffile), or where it does not exist
//!    the vendor's defaults in `/usr/lib/natbinder/natbinder.toml`;
//! 2. drop-ins, `*.toml` in `/usr/lib/natbinder/natbinder.d/` and `/etc/natbinder/natbinder.d/`, in
//!    the order of their names (one in /etc hides a vendor one of the same name).
//!
//! A setting in a later file replaces an earlier one; `[[rule]]`s add up in reading order (the first
//! that matches decides). Parsed strictly: an unknown key is an error that names it, its file and
//! line, so a typo never silently does nothing. Every value can also be given on the command line,
//! which wins; `--config FILE` reads that file alone.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::policy::{PolicySpec, RuleSpec};

pub const DEFAULT_PATH: &str = "/etc/natbinder/natbinder.toml";

/// Where the configuration files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigLayout {
    /// The administrator's file.
    pub main: PathBuf,
    /// The administrator's drop-ins.
    pub dropins: PathBuf,
    /// The vendor's (the package's) defaults, read when `main` does not exist.
    pub vendor_main: PathBuf,
    pub vendor_dropins: PathBuf,
}

impl ConfigLayout {
    /// /etc/natbinder and /usr/lib/natbinder.
    pub fn system() -> Self {
        Self::rooted(Path::new("/"))
    }

    /// The same layout below `root` (a package's tree, a test's directory).
    pub fn rooted(root: &Path) -> Self {
        Self {
            main: root.join("etc/natbinder/natbinder.toml"),
            dropins: root.join("etc/natbinder/natbinder.d"),
            vendor_main: root.join("usr/lib/natbinder/natbinder.toml"),
            vendor_dropins: root.join("usr/lib/natbinder/natbinder.d"),
        }
    }

    /// The files to read, in order.
    pub fn files(&self) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        if self.main.exists() {
            files.push(self.main.clone());
        } else if self.vendor_main.exists() {
            files.push(self.vendor_main.clone());
        }
        let mut dropins: std::collections::BTreeMap<std::ffi::OsString, PathBuf> = Default::default();
        for dir in [&self.vendor_dropins, &self.dropins] {
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading the drop-in directory {}", dir.display())),
            };
            for entry in entries {
                let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
                if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                    // The administrator's hides the vendor's of the same name.
                    dropins.insert(path.file_name().unwrap_or_default().to_os_string(), path);
                }
            }
        }
        files.extend(dropins.into_values());
        Ok(files)
    }

    /// Every file of the layout, read and merged in order.
    pub fn load(&self) -> Result<(ConfigFile, Vec<PathBuf>)> {
        let files = self.files()?;
        let mut merged = ConfigFile::default();
        for file in &files {
            merged.merge(ConfigFile::load(file, true)?);
        }
        Ok((merged, files))
    }
}

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

    /// `later`'s settings over these; its rules after these.
    pub fn merge(&mut self, later: ConfigFile) {
        macro_rules! over {
            ($($field:ident),* $(,)?) => { $( if later.$field.is_some() { self.$field = later.$field; } )* };
        }
        over!(
            cgroup,
            min_port,
            lease_seconds,
            reconcile_interval_seconds,
            discovery_timeout_seconds,
            event_buffer_kib,
            state_dir,
            backend,
            backend_order,
            max_mappings_per_user,
            control_socket,
            operator_group,
            operator_uids,
            run_allowed,
            run_cgroups,
            keep_gateway_chosen_ports,
        );
        self.rule.extend(later.rule);
        self.rule_origins.extend(later.rule_origins);
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
    fn the_administrators_file_hides_the_vendors_and_drop_ins_follow_in_name_order() {
        let root = std::env::temp_dir().join(format!("natbinder-layout-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let layout = ConfigLayout::rooted(&root);
        assert_eq!(layout.load().unwrap().1, Vec::<PathBuf>::new(), "nothing there: the defaults");
        for dir in [&layout.dropins, &layout.vendor_dropins] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(&layout.vendor_main, "lease-seconds = 600\nmin-port = 2000\n").unwrap();
        std::fs::write(layout.vendor_dropins.join("50-vendor.toml"), "[[rule]]\naction = \"deny\"\nports = 7000\n")
            .unwrap();
        std::fs::write(layout.vendor_dropins.join("60-hidden.toml"), "min-port = 9999\n").unwrap();
        std::fs::write(layout.dropins.join("60-hidden.toml"), "reconcile-interval-seconds = 5\n").unwrap();
        std::fs::write(layout.dropins.join("70-admin.toml"), "[[rule]]\naction = \"allow\"\nports = 8000\n").unwrap();
        std::fs::write(layout.dropins.join("notes.txt"), "not read").unwrap();
        let (c, files) = layout.load().unwrap();
        assert_eq!(files[0], layout.vendor_main, "no /etc file: the vendor's");
        assert_eq!((c.lease_seconds, c.min_port, c.reconcile_interval_seconds), (Some(600), Some(2000), Some(5)));
        let origins = c.policy_spec().rules.iter().map(|(o, _)| o.clone()).collect::<Vec<_>>();
        assert!(
            origins[0].ends_with("50-vendor.toml line 1") && origins[1].ends_with("70-admin.toml line 1"),
            "{origins:?}"
        );
        std::fs::write(&layout.main, "lease-seconds = 7200\n").unwrap();
        let (c, files) = layout.load().unwrap();
        assert_eq!((files[0].clone(), c.lease_seconds, c.min_port), (layout.main.clone(), Some(7200), None));
        std::fs::write(layout.dropins.join("80-bad.toml"), "lease-second = 1\n").unwrap();
        let err = format!("{:#}", layout.load().unwrap_err());
        assert!(err.contains("80-bad.toml") && err.contains("lease-second"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_default_file_is_fine_but_a_named_one_is_not() {
        let missing = Path::new("/nonexistent/natbinder.toml");
        assert_eq!(ConfigFile::load(missing, false).unwrap(), ConfigFile::default());
        assert!(format!("{:#}", ConfigFile::load(missing, true).unwrap_err()).contains("/nonexistent/natbinder.toml"));
    }
}
