//! The journal: every mapping natbinder made, kept in its state directory until the mapping is gone.
//!
//! The description tag finds our mappings on gateways that list descriptions, but only while this host
//! keeps its address. The journal also covers a changed address (DHCP), gateways that do not report
//! descriptions, and routers that only take permanent leases, whose mappings would otherwise outlive
//! every socket for good.
//!
//! It is written ahead: a mapping is journalled before it is asked for, so a daemon killed while the
//! request is on its way still knows to delete it. That write sits on the path from bind() to
//! reachable, so it must be cheap at any size: the file is a log of changes, one JSON line each,
//! appended to (one write(2) of a few hundred bytes, no fsync: a process crash loses nothing, the page
//! cache survives it). When the log has grown well past what it describes, it is compacted: the live
//! entries are written to a temporary file, then renamed over the log, so a crash at any point leaves
//! the previous or the next version. Appending keeps a burst of N mappings at O(N) bytes written, where
//! rewriting the whole journal at each change was O(N^2).
//!
//! Against power loss, a change that records a permanent mapping is fsynced (a leased one lost that
//! way ends with its lease), and so is a compaction that holds one. A line torn by power loss can only
//! be the last: it is ignored on reading (with a warning), and the next change rewrites the file.
//!
//! IPv6 pinholes are journalled beside the mappings, with the UniqueID the gateway named each by:
//! they are closed by that id, and a pinhole a crashed run left must be closed before its lease ends
//! (pinholes are always leased).
//!
//! A change returns the write ([`JournalWrite`]) for the caller to commit: an append that needs no
//! fsync is quick enough for the event loop ([`JournalWrite::is_quick`]); the others go where blocking
//! is allowed. A write that failed is reported back ([`Journal::write_failed`]): the next change then
//! rewrites the whole file, so that nothing the failed write held is lost for good.
//!
//! natbinder before the log wrote one JSON document, `mappings.json`: it is read once and replaced.
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
use tracing::warn;

use crate::{
    table::{PinholeKey, PortKey},
    Protocol,
};

const FILE_NAME: &str = "journal.jsonl";
const FORMAT_VERSION: u32 = 2;
/// The single document natbinder wrote before the log (format version 1).
const LEGACY_FILE_NAME: &str = "mappings.json";
const LEGACY_FORMAT_VERSION: u32 = 1;
/// Permanent mappings on a gateway we no longer see are forgotten after this long.
const FORGET_PERMANENT_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);
/// The log is compacted once it holds more than twice the live entries and this many lines: the
/// slack keeps a small journal from being rewritten at every change, and the factor keeps the bytes
/// written per change constant however large it grows.
const COMPACTION_SLACK: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

    fn expired(&self, now: u64) -> bool {
        if self.permanent {
            self.expires_unix.saturating_add(FORGET_PERMANENT_AFTER.as_secs()) < now
        } else {
            self.expires_unix < now
        }
    }
}

/// An IPv6 pinhole natbinder asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// The first line of the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    natbinder_journal: u32,
}

/// One line of the log after the header: an entry as it now is, or one that is gone.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Change {
    Mapping(JournalEntry),
    MappingGone { protocol: String, port: u16 },
    Pinhole(PinholeEntry),
    PinholeGone { protocol: String, port: u16, address: Ipv6Addr },
}

/// The legacy journal (format version 1): one document, rewritten whole at each change.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyFile {
    version: u32,
    entries: Vec<JournalEntry>,
    #[serde(default)]
    pinholes: Vec<PinholeEntry>,
}

pub struct Journal {
    path: Option<PathBuf>,
    entries: BTreeMap<PortKey, JournalEntry>,
    pinholes: BTreeMap<PinholeKey, PinholeEntry>,
    /// Lines in the file as the writes handed out leave it, header included; None when the next write
    /// must rewrite it whole (no file yet, a torn last line, a failed write, the legacy file).
    lines_on_disk: Option<usize>,
}

/// One write of the journal, to be committed in order ([`JournalWrite::commit`] may block).
#[must_use = "a journal change is on disk only once committed"]
pub struct JournalWrite {
    path: PathBuf,
    kind: WriteKind,
    /// fsync: this write holds a permanent mapping.
    durable: bool,
}

enum WriteKind {
    /// One line at the end of the log.
    Append(Vec<u8>),
    /// The whole log, compacted (header and live entries), replacing the file.
    Rewrite(Vec<u8>),
}

impl JournalWrite {
    /// An append without fsync: one write(2) to the page cache, fine on the event loop.
    pub fn is_quick(&self) -> bool {
        matches!(self.kind, WriteKind::Append(_)) && !self.durable
    }

    pub fn commit(self) -> Result<()> {
        let write = || -> std::io::Result<()> {
            match &self.kind {
                WriteKind::Append(line) => {
                    let mut f = fs::OpenOptions::new().append(true).open(&self.path)?;
                    // One write(2): a process killed around it leaves the line whole or absent.
                    f.write_all(line)?;
                    if self.durable {
                        f.sync_data()?;
                    }
                    Ok(())
                }
                WriteKind::Rewrite(bytes) => {
                    let tmp = self.path.with_extension("jsonl.tmp");
                    let mut f = fs::File::create(&tmp)?;
                    f.write_all(bytes)?;
                    if self.durable {
                        f.sync_all()?;
                    }
                    fs::rename(&tmp, &self.path)
                }
            }
        };
        write().with_context(|| format!("writing the journal {}", self.path.display()))
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A change or header as one line. Plain strings, numbers and addresses: encoding cannot fail.
fn line_of<T: Serialize>(value: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(value).expect("encoding a journal line");
    line.push(b'\n');
    line
}

impl Journal {
    /// A journal that keeps nothing on disk (tests, or no state directory).
    pub fn in_memory() -> Self {
        Self { path: None, entries: BTreeMap::new(), pinholes: BTreeMap::new(), lines_on_disk: None }
    }

    /// Opens (creating the directory if needed) the journal in `state_dir`. A journal that cannot be
    /// read is an error that names the file: silently starting afresh would forget mappings to delete.
    pub fn open(state_dir: &Path) -> Result<Self> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
        let path = state_dir.join(FILE_NAME);
        let legacy = state_dir.join(LEGACY_FILE_NAME);
        let mut journal = Self { path: Some(path.clone()), ..Self::in_memory() };
        match fs::read(&path) {
            Ok(bytes) => journal.replay(&path, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match fs::read(&legacy) {
                Ok(bytes) => journal.read_legacy(&legacy, &bytes)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", legacy.display())),
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let now = unix_now();
        journal.entries.retain(|_, e| !e.expired(now));
        journal.pinholes.retain(|_, p| p.expires_unix >= now);
        if legacy.exists() {
            // Replaced by the log: written now, so that the legacy file can go (a crash in between
            // leaves both, and the log wins).
            journal.snapshot().expect("a journal opened from a file has a path").commit()?;
            journal.lines_on_disk = Some(1 + journal.entries.len() + journal.pinholes.len());
            fs::remove_file(&legacy)
                .with_context(|| format!("removing {}, replaced by {}", legacy.display(), path.display()))?;
        }
        Ok(journal)
    }

    /// Reads the log: the header, then each change in order. A last line that does not parse was torn
    /// by power loss (the file then gets rewritten); one followed by more lines is corruption.
    fn replay(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let invalid = |what: String| anyhow::anyhow!("{} {what}; move it aside to start afresh", path.display());
        // NULs are what power loss leaves of a block that was never written.
        let blank = |line: &[u8]| line.iter().all(|b| b.is_ascii_whitespace() || *b == 0);
        let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
        let last = lines.iter().rposition(|line| !blank(line));
        let mut torn = !bytes.is_empty() && !bytes.ends_with(b"\n") || bytes.contains(&0);
        let mut lines_read = 0;
        for (index, line) in lines.iter().enumerate() {
            if blank(line) {
                continue;
            }
            let parsed = if lines_read == 0 {
                serde_json::from_slice::<Header>(line).map(|header| match header.natbinder_journal {
                    FORMAT_VERSION => Ok(()),
                    other => Err(invalid(format!("has format version {other}, this natbinder reads {FORMAT_VERSION}"))),
                })
            } else {
                serde_json::from_slice::<Change>(line).map(|change| {
                    self.apply(change);
                    Ok(())
                })
            };
            match parsed {
                Ok(result) => result?,
                Err(e) if Some(index) == last => {
                    warn!(
                        "{}: line {} is incomplete ({e}), most likely cut short by a power loss; ignoring it",
                        path.display(),
                        index + 1
                    );
                    torn = true;
                }
                Err(e) => return Err(invalid(format!("is not a valid natbinder journal (line {}: {e})", index + 1))),
            }
            lines_read += 1;
        }
        self.lines_on_disk = (!torn && lines_read > 0).then_some(lines_read);
        Ok(())
    }

    fn read_legacy(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let file: LegacyFile = serde_json::from_slice(bytes).with_context(|| {
            format!("{} is not a valid natbinder journal; move it aside to start afresh", path.display())
        })?;
        if file.version != LEGACY_FORMAT_VERSION {
            bail!(
                "{} has format version {}, this natbinder reads {LEGACY_FORMAT_VERSION}",
                path.display(),
                file.version
            );
        }
        for entry in file.entries {
            self.apply(Change::Mapping(entry));
        }
        for pinhole in file.pinholes {
            self.apply(Change::Pinhole(pinhole));
        }
        Ok(())
    }

    /// Applies one change read back. Entries of a protocol this natbinder does not know are skipped.
    fn apply(&mut self, change: Change) {
        match change {
            Change::Mapping(entry) => {
                if let Some(key) = entry.key() {
                    self.entries.insert(key, entry);
                }
            }
            Change::MappingGone { protocol, port } => {
                if let Some(protocol) = protocol_of(&protocol) {
                    self.entries.remove(&PortKey::new(protocol, port));
                }
            }
            Change::Pinhole(entry) => {
                if let Some(key) = entry.key() {
                    self.pinholes.insert(key, entry);
                }
            }
            Change::PinholeGone { protocol, port, address } => {
                if let Some(protocol) = protocol_of(&protocol) {
                    self.pinholes.remove(&PinholeKey { protocol, port, address });
                }
            }
        }
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
        self.entries.insert(key, entry.clone());
        self.write(&Change::Mapping(entry), permanent)
    }

    /// Forgets a mapping that is gone from the gateway. Returns the write to commit, if it was known.
    pub fn forget(&mut self, key: &PortKey) -> Option<JournalWrite> {
        self.entries.remove(key)?;
        self.write(&Change::MappingGone { protocol: key.protocol.to_string(), port: key.port }, false)
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
        self.pinholes.insert(key, entry.clone());
        self.write(&Change::Pinhole(entry), false)
    }

    /// Forgets a pinhole that is closed. Returns the write to commit, if it was known.
    pub fn forget_pinhole(&mut self, key: &PinholeKey) -> Option<JournalWrite> {
        self.pinholes.remove(key)?;
        let change = Change::PinholeGone { protocol: key.protocol.to_string(), port: key.port, address: key.address };
        self.write(&change, false)
    }

    pub fn pinholes(&self) -> impl Iterator<Item = &PinholeEntry> {
        self.pinholes.values()
    }

    /// A write that was handed out failed: what the file holds is unknown, so the next change
    /// rewrites it whole.
    pub fn write_failed(&mut self) {
        self.lines_on_disk = None;
    }

    /// The write for one change (already applied): an append, or the whole log compacted when it has
    /// no file to append to or has grown past twice what it describes.
    fn write(&mut self, change: &Change, durable: bool) -> Option<JournalWrite> {
        let live = self.entries.len() + self.pinholes.len();
        match self.lines_on_disk {
            Some(lines) if lines < 2 * live + COMPACTION_SLACK => {
                let path = self.path.clone()?;
                self.lines_on_disk = Some(lines + 1);
                Some(JournalWrite { path, kind: WriteKind::Append(line_of(change)), durable })
            }
            _ => {
                let write = self.snapshot()?;
                self.lines_on_disk = Some(1 + live);
                Some(write)
            }
        }
    }

    /// The whole log, compacted: the header, then each live entry.
    fn snapshot(&self) -> Option<JournalWrite> {
        let path = self.path.clone()?;
        let mut bytes = line_of(&Header { natbinder_journal: FORMAT_VERSION });
        for entry in self.entries.values() {
            bytes.extend(line_of(&Change::Mapping(entry.clone())));
        }
        for pinhole in self.pinholes.values() {
            bytes.extend(line_of(&Change::Pinhole(pinhole.clone())));
        }
        let durable = self.entries.values().any(|e| e.permanent);
        Some(JournalWrite { path, kind: WriteKind::Rewrite(bytes), durable })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
    const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const HOUR: Duration = Duration::from_secs(3600);

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("natbinder-journal-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn tcp(port: u16) -> PortKey {
        PortKey::new(Protocol::Tcp, port)
    }

    fn ports(j: &Journal) -> Vec<u16> {
        j.entries().map(|e| e.port).collect()
    }

    #[test]
    fn survives_a_restart_and_forgets_what_was_deleted() {
        let d = dir("restart");
        let udp = PortKey::new(Protocol::Udp, 27015);
        {
            let mut j = Journal::open(&d).unwrap();
            j.record(tcp(8080), ME, GW, HOUR).unwrap().commit().unwrap();
            j.record(udp, ME, GW, Duration::ZERO).unwrap().commit().unwrap();
            assert!(j.record(udp, ME, GW, Duration::ZERO).is_none(), "nothing changed: no write");
            j.forget(&tcp(8080)).unwrap().commit().unwrap();
            assert!(j.forget(&tcp(8080)).is_none(), "forgetting twice writes once");
            // A write left uncommitted (a crash before it) leaves the previous version on disk.
            let _lost = j.record(tcp(8080), ME, GW, Duration::from_secs(60));
        }
        let j = Journal::open(&d).unwrap();
        assert!(j.get(&tcp(8080)).is_none() && j.get(&udp).is_some(), "the last committed version is read back");
        let mut j = j;
        j.record(tcp(8080), ME, GW, Duration::from_secs(60)).unwrap().commit().unwrap();
        let j = Journal::open(&d).unwrap();
        assert_eq!(j.entries().count(), 2);
        assert!(j.get(&udp).unwrap().permanent);
        assert!(!j.get(&tcp(8080)).unwrap().permanent);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn changes_are_appended_without_fsync_unless_permanent_and_a_burst_costs_linear_bytes() {
        let d = dir("burst");
        let mut j = Journal::open(&d).unwrap();
        let first = j.record(tcp(1), ME, GW, HOUR).unwrap();
        assert!(!first.is_quick(), "no file yet: the first write creates it whole");
        first.commit().unwrap();
        let leased = j.record(tcp(2), ME, GW, HOUR).unwrap();
        assert!(leased.is_quick(), "a leased mapping is one append, no fsync");
        leased.commit().unwrap();
        let permanent = j.record(tcp(3), ME, GW, Duration::ZERO).unwrap();
        assert!(matches!(permanent.kind, WriteKind::Append(_)) && permanent.durable, "a permanent one is fsynced");
        permanent.commit().unwrap();
        // 1,000 mappings made and deleted: appends, with a compaction now and then.
        let (mut bytes, mut rewrites) = (0, 0);
        let mut commit = |write: JournalWrite| {
            match &write.kind {
                WriteKind::Append(line) => bytes += line.len(),
                WriteKind::Rewrite(all) => {
                    bytes += all.len();
                    rewrites += 1;
                }
            }
            write.commit().unwrap();
        };
        for port in 10_000..11_000 {
            commit(j.record(tcp(port), ME, GW, HOUR).unwrap());
        }
        for port in 10_000..11_000 {
            commit(j.forget(&tcp(port)).unwrap());
        }
        // Rewriting the whole journal at each change wrote ~100 MB for this; the log writes each
        // change about once, plus a compaction each time the file doubles.
        assert!(bytes < 2000 * 130 * 2, "{bytes} bytes written for 2,000 changes");
        assert!((1..=12).contains(&rewrites), "{rewrites} compactions");
        let on_disk = fs::metadata(d.join(FILE_NAME)).unwrap().len();
        assert!(on_disk < 2 * 128 * 130 + 4 * 130, "compaction keeps the file near its live size: {on_disk} bytes");
        let j = Journal::open(&d).unwrap();
        assert_eq!(ports(&j), vec![1, 2, 3], "replayed to what is live");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_the_next_change_rewrites_the_file() {
        let d = dir("torn");
        {
            let mut j = Journal::open(&d).unwrap();
            for port in [1, 2] {
                j.record(tcp(port), ME, GW, HOUR).unwrap().commit().unwrap();
            }
        }
        let path = d.join(FILE_NAME);
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"mapping":{"protocol":"tcp","port":3,"internal_cl"#).unwrap();
        drop(f);
        let mut j = Journal::open(&d).unwrap();
        assert_eq!(ports(&j), vec![1, 2], "the whole lines before the torn one are kept");
        let next = j.record(tcp(4), ME, GW, HOUR).unwrap();
        assert!(matches!(next.kind, WriteKind::Rewrite(_)), "appending after a torn line would corrupt the next");
        next.commit().unwrap();
        // Power loss can also leave a block of NULs where appended lines were.
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0; 512]).unwrap();
        drop(f);
        let j = Journal::open(&d).unwrap();
        assert_eq!(ports(&j), vec![1, 2, 4]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_failed_write_makes_the_next_change_rewrite_the_file() {
        let d = dir("failed");
        let mut j = Journal::open(&d).unwrap();
        j.record(tcp(1), ME, GW, HOUR).unwrap().commit().unwrap();
        // The disk was full: this change never reached the file.
        let _lost = j.record(tcp(2), ME, GW, HOUR).unwrap();
        j.write_failed();
        let next = j.record(tcp(3), ME, GW, HOUR).unwrap();
        assert!(!next.is_quick());
        next.commit().unwrap();
        assert_eq!(ports(&Journal::open(&d).unwrap()), vec![1, 2, 3], "what the failed write held is on disk");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn pinholes_survive_a_restart_with_their_ids_and_expire() {
        let d = dir("pinholes");
        let key = PinholeKey { protocol: Protocol::Tcp, port: 8080, address: "2001:db8:77::10".parse().unwrap() };
        {
            let mut j = Journal::open(&d).unwrap();
            j.record_pinhole(key, GW, None, HOUR).unwrap().commit().unwrap();
            j.record_pinhole(key, GW, Some(7), HOUR).unwrap().commit().unwrap();
            assert!(j.record_pinhole(key, GW, None, HOUR).is_none(), "a renewal keeps the id");
        }
        let mut j = Journal::open(&d).unwrap();
        let entries: Vec<PinholeEntry> = j.pinholes().cloned().collect();
        assert_eq!(entries.len(), 1);
        assert_eq!((entries[0].key(), entries[0].unique_id, entries[0].gateway), (Some(key), Some(7), GW));
        j.forget_pinhole(&key).unwrap().commit().unwrap();
        assert_eq!(Journal::open(&d).unwrap().pinholes().count(), 0, "a closed pinhole is forgotten");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_legacy_journal_is_read_once_and_replaced_by_the_log() {
        let d = dir("legacy");
        fs::create_dir_all(&d).unwrap();
        let legacy = r#"{"version":1,"entries":[
            {"protocol":"tcp","port":1,"internal_client":"192.168.1.10","gateway":"192.168.1.1","permanent":false,"expires_unix":5},
            {"protocol":"udp","port":2,"internal_client":"192.168.1.10","gateway":"192.168.1.1","permanent":true,"expires_unix":5},
            {"protocol":"tcp","port":3,"internal_client":"192.168.1.10","gateway":"192.168.1.1","permanent":false,"expires_unix":99999999999},
            {"protocol":"udp","port":4,"internal_client":"192.168.1.10","gateway":"192.168.1.1","permanent":true,"expires_unix":99999999999}
        ],"pinholes":[
            {"protocol":"udp","port":9,"address":"2001:db8::1","gateway":"192.168.1.1","unique_id":3,"expires_unix":5},
            {"protocol":"tcp","port":3,"address":"2001:db8::1","gateway":"192.168.1.1","unique_id":4,"expires_unix":99999999999}
        ]}"#;
        fs::write(d.join(LEGACY_FILE_NAME), legacy).unwrap();
        let j = Journal::open(&d).unwrap();
        // Expired leases, and permanent mappings not seen for 30 days, are dropped.
        assert_eq!(ports(&j), vec![3, 4]);
        assert_eq!(j.pinholes().map(|p| p.unique_id).collect::<Vec<_>>(), vec![Some(4)]);
        assert!(!d.join(LEGACY_FILE_NAME).exists(), "replaced by the log");
        let j = Journal::open(&d).unwrap();
        assert_eq!((ports(&j), j.pinholes().count()), (vec![3, 4], 1), "the log holds what the legacy file did");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_corrupt_journal_is_an_error_that_names_the_file_and_line() {
        let d = dir("corrupt");
        fs::create_dir_all(&d).unwrap();
        let good = r#"{"mapping":{"protocol":"tcp","port":3,"internal_client":"192.168.1.10","gateway":"192.168.1.1","permanent":false,"expires_unix":99999999999}}"#;
        fs::write(d.join(FILE_NAME), format!("{{\"natbinder_journal\":2}}\n{{not json\n{good}\n")).unwrap();
        let err = format!("{:#}", Journal::open(&d).err().unwrap());
        assert!(err.contains("journal.jsonl") && err.contains("line 2") && err.contains("move it aside"), "{err}");
        fs::write(d.join(FILE_NAME), "{\"natbinder_journal\":3}\n").unwrap();
        let err = format!("{:#}", Journal::open(&d).err().unwrap());
        assert!(err.contains("format version 3"), "{err}");
        fs::remove_file(d.join(FILE_NAME)).unwrap();
        fs::write(d.join(LEGACY_FILE_NAME), b"{not json").unwrap();
        let err = format!("{:#}", Journal::open(&d).err().unwrap());
        assert!(err.contains("mappings.json") && err.contains("move it aside"), "{err}");
        fs::remove_dir_all(&d).unwrap();
    }
}
