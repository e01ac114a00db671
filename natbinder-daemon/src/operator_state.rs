//! What operators asked for and natbinder must remember across restarts: static mappings (with
//! their descriptions) and disabled ports. One JSON file in the state directory, replaced whole and
//! atomically (written beside, synced, renamed) on every change, read at start.
use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{table::PortKey, Protocol};

const FILE: &str = "operator.json";
const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorState {
    pub version: u32,
    #[serde(rename = "static", default)]
    pub statics: Vec<StaticEntry>,
    #[serde(default)]
    pub disabled: Vec<PortEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticEntry {
    pub protocol: String,
    pub port: u16,
    pub description: String,
    pub uid: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortEntry {
    pub protocol: String,
    pub port: u16,
}

fn protocol(name: &str, path: &Path) -> Result<Protocol> {
    match name {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        other => bail!("{}: \"{other}\" is not a protocol (tcp or udp)", path.display()),
    }
}

impl OperatorState {
    pub fn new(statics: Vec<(PortKey, String, u32)>, disabled: Vec<PortKey>) -> Self {
        Self {
            version: VERSION,
            statics: statics
                .into_iter()
                .map(|(k, description, uid)| StaticEntry {
                    protocol: k.protocol.to_string(),
                    port: k.port,
                    description,
                    uid,
                })
                .collect(),
            disabled: disabled
                .into_iter()
                .map(|k| PortEntry { protocol: k.protocol.to_string(), port: k.port })
                .collect(),
        }
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    /// Reads the file; none yet is an empty state. A damaged file stops natbinder with what to do,
    /// rather than forgetting what operators asked for.
    pub fn load(state_dir: &Path) -> Result<Self> {
        let path = Self::path(state_dir);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let state: Self = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged (static mappings and disabled ports): fix it, or move it aside to start without them",
                path.display()
            )
        })?;
        if state.version != VERSION {
            bail!("{} has version {}; this natbinder reads version {VERSION}", path.display(), state.version);
        }
        for entry in &state.statics {
            protocol(&entry.protocol, &path)?;
        }
        for entry in &state.disabled {
            protocol(&entry.protocol, &path)?;
        }
        Ok(state)
    }

    pub fn static_keys(&self, state_dir: &Path) -> Result<Vec<(PortKey, String, u32)>> {
        let path = Self::path(state_dir);
        self.statics
            .iter()
            .map(|e| Ok((PortKey::new(protocol(&e.protocol, &path)?, e.port), e.description.clone(), e.uid)))
            .collect()
    }

    pub fn disabled_keys(&self, state_dir: &Path) -> Result<Vec<PortKey>> {
        let path = Self::path(state_dir);
        self.disabled.iter().map(|e| Ok(PortKey::new(protocol(&e.protocol, &path)?, e.port))).collect()
    }

    /// Replaces the file: written beside it, synced, renamed over it.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let path = Self::path(state_dir);
        let temporary = state_dir.join(format!("{FILE}.new"));
        let text = serde_json::to_string_pretty(self)?;
        let mut file = File::create(&temporary).with_context(|| format!("writing {}", temporary.display()))?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temporary, &path).with_context(|| format!("replacing {}", path.display()))?;
        if let Ok(dir) = File::open(state_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_saved_is_what_is_loaded_and_damage_is_an_error_that_says_what_to_do() {
        let dir = std::env::temp_dir().join(format!("natbinder-operator-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(OperatorState::load(&dir).unwrap(), OperatorState::default());
        let key = PortKey::new(Protocol::Tcp, 25565);
        let state = OperatorState::new(vec![(key, "minecraft".into(), 1000)], vec![PortKey::new(Protocol::Udp, 9000)]);
        state.save(&dir).unwrap();
        let loaded = OperatorState::load(&dir).unwrap();
        assert_eq!(loaded, state);
        assert_eq!(loaded.static_keys(&dir).unwrap(), vec![(key, "minecraft".to_string(), 1000)]);
        assert_eq!(loaded.disabled_keys(&dir).unwrap(), vec![PortKey::new(Protocol::Udp, 9000)]);
        fs::write(OperatorState::path(&dir), "{\"version\": 1, \"static\": [{").unwrap();
        let e = format!("{:#}", OperatorState::load(&dir).unwrap_err());
        assert!(e.contains("operator.json is damaged") && e.contains("move it aside"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
