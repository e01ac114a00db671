//! The journal: every mapping natbinder made, kept in its state directory until the mapping is gone.
//!
//! The description tag finds our mappings on gateways that list descriptions, but only while this host
//! keeps its address. The journal also covers a changed address (DHCP), gateways that do not report
//! descriptions, and routers that only take permanent leases, whose mappings would otherwise outlive
//! every socket for good.
//!
//! It is written ahead: a mapping is journalled before it is asked for, so a daemon killed while the
//! request is on its way still knows to delete it. Each change rewrites the file atomically (a
//! temporary file, then rename), so a crash at any point leaves the previous or the next version, never
//! a torn one. A process crash loses nothing (the page cache survives it). Against power loss, versions
//! that hold a permanent mapping are also fsynced; a leased mapping lost that way ends with its lease.
//!
//! IPv6 pinholes are journalled beside the mappings, with the UniqueID the gateway named each by:
//! they are closed by that id, and a pinhole a crashed run left must be closed before its lease ends
//! (pinholes are always leased).
//! A change returns the write ([`JournalWrite`]) for the caller to commit where blocking is allowed:
//! the reconciler commits it off the event loop, one write at a time, in order.
use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    table::{PinholeKey, PortKey},
    Protocol,
};

const FILE_NAME: &str = "mappings.json";
const FORMAT_VERSION: u32 = 1;
/// Permanent mappings on a gateway we no longer see are forgotten after this long.
const FORGET_PERMANENT_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub protocol: String,
    pub port: u16,
    pub internal_client: Ipv4Addr,
    /// The gateway (next hop of the default route) that holds it.
    pub gateway: Ipv4Addr,
    /// Leased mappings end on their own at `expires_unix`; permanent ones (lease 0) never do.
    pub permanent: bool,
    pub expires_unix: u64,
}

fn protocol_of(name: &str) -> Option<Protocol> {
    match name {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => None,
    }
}

impl JournalEntry {
    pub fn key(&self) -> Option<PortKey> {
        Some(PortKey::new(protocol_of(&self.protocol)?, self.port))
    }
}

/// An IPv6 pinhole natbinder asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinholeEntry {
    pub protocol: String,
    pub port: u16,
    /// This host's address it opens.
    pub address: Ipv6Addr,
    /// The gateway (next hop of the IPv4 default route, as for mappings) that holds it.
    pub gateway: Ipv4Addr,
    /// The UniqueID the gateway named it by; None until it answered (or for protocols that name it
    /// by what it opens).
    pub unique_id: Option<u16>,
    pub expires_unix: u64,
}

impl PinholeEntry {
    pub fn key(&self) -> Option<PinholeKey> {
        Some(PinholeKey { protocol: protocol_of(&self.protocol)?, port: self.port, address: self.address })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalFile {
    version: u32,
    entries: Vec<JournalEntry>,
    /// Left out when empty, so that a journal without pinholes reads in natbinder versions that
    /// predate them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pinholes: Vec<PinholeEntry>,
}

pub struct Journal {
    path: Option<PathBuf>,
    entries: BTreeMap<PortKey, JournalEntry>,
    pinholes: BTreeMap<PinholeKey, PinholeEntry>,
}

/// One version of the journal, to be written to disk ([`JournalWrite::commit`] blocks).
#[must_use = "a journal change is on disk only once committed"]
pub struct JournalWrite {
    path: PathBuf,
    bytes: Vec<u8>,
    /// fsync before the rename: this version holds a permanent mapping.
    durable: bool,
}

impl JournalWrite {
    /// Writes this version atomically: a temporary file (fsynced if durable), then rename.
    pub fn commit(self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&self.bytes)?;
            if self.durable {
                f.sync_all()?;
            }
            fs::rename(&tmp, &self.path)
        };
        write().with_context(|| format!("writing the journal {}", self.path.display()))
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Journal {
    /// A journal that keeps nothing on disk (tests, or no state directory).
    pub fn in_memory() -> Self {
        Self { path: None, entries: BTreeMap::new(), pinholes: BTreeMap::new() }
    }

    /// Opens (creating the directory if needed) the journal in `state_dir`. A journal that cannot be
    /// read is an error that names the file: silently starting afresh would forget mappings to delete.
    pub fn open(state_dir: &Path) -> Result<Self> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
        let path = state_dir.join(FILE_NAME);
        let mut entries = BTreeMap::new();
        let mut pinholes = BTreeMap::new();
        match fs::read(&path) {
            Ok(bytes) => {
                let file: JournalFile = serde_json::from_slice(&bytes).with_context(|| {
                    format!("{} is not a valid natbinder journal; move it aside to start afresh", path.display())
                })?;
                if file.version != FORMAT_VERSION {
                    bail!(
                        "{} has format version {}, this natbinder reads {FORMAT_VERSION}",
                        path.display(),
                        file.version
                    );
                }
                let now = unix_now();
                for entry in file.entries {
                    let expired = if entry.permanent {
                        entry.expires_unix + FORGET_PERMANENT_AFTER.as_secs() < now
                    } else {
                        entry.expires_unix < now
                    };
                    if let (Some(key), false) = (entry.key(), expired) {
                        entries.insert(key, entry);
                    }
                }
                for pinhole in file.pinholes {
                    if let (Some(key), false) = (pinhole.key(), pinhole.expires_unix < now) {
                        pinholes.insert(key, pinhole);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        Ok(Self { path: Some(path), entries, pinholes })
    }

    pub fn entries(&self) -> impl Iterator<Item = &JournalEntry> {
        self.entries.values()
    }

    pub fn get(&self, key: &PortKey) -> Option<&JournalEntry> {
        self.entries.get(key)
    }

    /// Records a mapping about to be asked for, or that the gateway granted. Returns the write to
    /// commit, if anything changed.
    pub fn record(
        &mut self,
        key: PortKey,
        internal_client: Ipv4Addr,
        gateway: Ipv4Addr,
        lease: Duration,
    ) -> Option<JournalWrite> {
        let permanent = lease.is_zero();
        let entry = JournalEntry {
            protocol: key.protocol.to_string(),
            port: key.port,
            internal_client,
            gateway,
            permanent,
            expires_unix: unix_now() + lease.as_secs(),
        };
        // An identical entry needs no write; a renewal that only moves the expiry by less than a
        // minute does not either (the expiry matters only to drop entries long gone).
        if let Some(known) = self.entries.get(&key) {
            let same = JournalEntry { expires_unix: known.expires_unix, ..entry.clone() } == *known;
            if same && known.expires_unix.abs_diff(entry.expires_unix) < 60 {
                return None;
            }
        }
        self.entries.insert(key, entry);
        self.snapshot()
    }

    /// Forgets a mapping that is gone from the gateway. Returns the write to commit, if it was known.
    pub fn forget(&mut self, key: &PortKey) -> Option<JournalWrite> {
        self.entries.remove(key)?;
        self.snapshot()
    }

    /// Records a pinhole about to be asked for (`unique_id` None), or that the gateway opened. Returns
    /// the write to commit, if anything changed.
    pub fn record_pinhole(
        &mut self,
        key: PinholeKey,
        gateway: Ipv4Addr,
        unique_id: Option<u16>,
        lease: Duration,
    ) -> Option<JournalWrite> {
        let known = self.pinholes.get(&key);
        let entry = PinholeEntry {
            protocol: key.protocol.to_string(),
            port: key.port,
            address: key.address,
            gateway,
            // A renewal asked without the id keeps the one the gateway gave.
            unique_id: unique_id.or_else(|| known.filter(|k| k.gateway == gateway).and_then(|k| k.unique_id)),
            expires_unix: unix_now() + lease.as_secs(),
        };
        if let Some(known) = known {
            let same = PinholeEntry { expires_unix: known.expires_unix, ..entry.clone() } == *known;
            if same && known.expires_unix.abs_diff(entry.expires_unix) < 60 {
                return None;
            }
        }
        self.pinholes.insert(key, entry);
        self.snapshot()
    }

    /// Forgets a pinhole that is closed. Returns the write to commit, if it was known.
    pub fn forget_pinhole(&mut self, key: &PinholeKey) -> Option<JournalWrite> {
        self.pinholes.remove(key)?;
        self.snapshot()
    }

    pub fn pinholes(&self) -> impl Iterator<Item = &PinholeEntry> {
        self.pinholes.values()
    }

    fn snapshot(&self) -> Option<JournalWrite> {
        let path = self.path.clone()?;
        let file = JournalFile {
            version: FORMAT_VERSION,
            entries: self.entries.values().cloned().collect(),
            pinholes: self.pinholes.values().cloned().collect(),
        };
        // Plain strings, numbers and addresses: encoding cannot fail.
        let bytes = serde_json::to_vec_pretty(&file).expect("encoding the journal");
        let durable = self.entries.values().any(|e| e.permanent);
        Some(JournalWrite { path, bytes, durable })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("natbinder-journal-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn survives_a_restart_and_forgets_what_was_deleted() {
        let d = dir("restart");
        let tcp = PortKey::new(Protocol::Tcp, 8080);
        let udp = PortKey::new(Protocol::Udp, 27015);
        {
            let mut j = Journal::open(&d).unwrap();
            j.record(tcp, ME, GW, Duration::from_secs(3600)).unwrap().commit().unwrap();
            j.record(udp, ME, GW, Duration::ZERO).unwrap().commit().unwrap();
            assert!(j.record(udp, ME, GW, Duration::ZERO).is_none(), "nothing changed: no write");
            j.forget(&tcp).unwrap().commit().unwrap();
            assert!(j.forget(&tcp).is_none(), "forgetting twice writes once");
            // A write left uncommitted (a crash before it) leaves the previous version on disk.
            let _lost = j.record(tcp, ME, GW, Duration::from_secs(60));
        }
        let j = Journal::open(&d).unwrap();
        assert!(j.get(&tcp).is_none() && j.get(&udp).is_some(), "the last committed version is read back");
        let mut j = j;
        j.record(tcp, ME, GW, Duration::from_secs(60)).unwrap().commit().unwrap();
        let j = Journal::open(&d).unwrap();
        let entries: Vec<_> = j.entries().cloned().collect();
        assert_eq!(entries.len(), 2);
        assert!(j.get(&udp).unwrap().permanent);
        assert!(!j.get(&tcp).unwrap().permanent);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pinholes_survive_a_restart_with_their_ids_and_expire() {
        let d = dir("pinholes");
        let key = PinholeKey { protocol: Protocol::Tcp, port: 8080, address: "2001:db8:77::10".parse().unwrap() };
        {
            let mut j = Journal::open(&d).unwrap();
            j.record_pinhole(key, GW, None, Duration::from_secs(3600)).unwrap().commit().unwrap();
            j.record_pinhole(key, GW, Some(7), Duration::from_secs(3600)).unwrap().commit().unwrap();
            assert!(j.record_pinhole(key, GW, None, Duration::from_secs(3600)).is_none(), "a renewal keeps the id");
        }
        let mut j = Journal::open(&d).unwrap();
        let entries: Vec<PinholeEntry> = j.pinholes().cloned().collect();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].key(), entries[0].unique_id, entries[0].gateway), (Some(key), Some(7), GW));
        j.forget_pinhole(&key).unwrap().commit().unwrap();
        let text = fs::read_to_string(d.join(FILE_NAME)).unwrap();
        assert!(!text.contains("pinholes"), "a journal without pinholes reads in older versions: {text}");
        fs::write(
            d.join(FILE_NAME),
            r#"{"version":1,"entries":[],"pinholes":[
                {"protocol":"udp","port":9,"address":"2001:db8::1","gateway":"192.168.1.1","unique_id":3,"expires_unix":5}
            ]}"#,
        )
        .unwrap();
        assert_eq!(Journal::open(&d).unwrap().pinholes().count(), 0, "an expired pinhole is gone by itself");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn expired_leases_are_dropped_on_open() {
        let d = dir("expired");
        fs::create_dir_all(&d).unwrap();
        let file = r#"{"version":1,"entries":[
            {"protocol":"tcp","port":1,"internal_client":"192.168.1.10","gateway":"192.168.1.1","permanent":false,"expires_unix":5},
            {"protocol":"udp","port":2,"internal_client":"192.168.1.10","gateway":"192.168.1.1","permanent":true,"expires_unix":5},
            {"protocol":"tcp","port":3,"internal_client":"192.168.1.10","gateway":"192.168.1.1","permanent":false,"expires_unix":99999999999}
        ]}"#;
        fs::write(d.join(FILE_NAME), file).unwrap();
        let j = Journal::open(&d).unwrap();
        let ports: Vec<u16> = j.entries().map(|e| e.port).collect();
        assert_eq!(ports, vec![3]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupt_journal_is_an_error_that_names_the_file() {
        let d = dir("corrupt");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join(FILE_NAME), b"{not json").unwrap();
        let err = format!("{:#}", Journal::open(&d).err().unwrap());
        assert!(err.contains("mappings.json") && err.contains("move it aside"), "{err}");
        fs::remove_dir_all(&d).unwrap();
    }
}
