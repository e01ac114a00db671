//! Which of the gateway's mappings are natbinder's, on this host: the description tag, and the
//! journal of every mapping natbinder made.
//!
//! The tag (`natbinder@<host> <program>`) finds our mappings on gateways that list descriptions, but
//! only while this host keeps its address. The journal also covers a changed address (DHCP), gateways
//! that drop descriptions, gateways that cannot list their table (NAT-PMP, PCP), and routers that take
//! only permanent leases, whose mappings would otherwise outlive every socket for good. The journal is
//! written one write at a time, in order: an append without fsync in place (it is on the path from
//! bind() to reachable, and costs one write(2)), the rest off the event loop.
use std::{collections::HashSet, net::Ipv4Addr, time::Duration};

use tracing::warn;

use crate::{
    gateway::GatewayEntry,
    host::lan::LanInfo,
    journal::{Journal, JournalWrite},
    table::{PinholeKey, PortKey},
};

/// Prefix of every description natbinder writes; followed by this host's name.
pub const TAG_PREFIX: &str = "natbinder@";
/// Some routers reject long descriptions (IGD 605); stay well under every known limit.
const MAX_DESCRIPTION: usize = 48;
/// Longest host name kept in a description, so the program name always fits too.
const MAX_DESCRIPTION_HOST: usize = 24;

fn clean(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

/// This host's name as it appears in descriptions.
fn description_host(hostname: &str) -> String {
    let mut host = clean(hostname);
    host.truncate(MAX_DESCRIPTION_HOST);
    host
}

/// The description of a mapping: names natbinder, this host and the program.
pub fn description(hostname: &str, comm: &str) -> String {
    let mut d = format!("{TAG_PREFIX}{} {}", description_host(hostname), clean(comm));
    d.truncate(MAX_DESCRIPTION);
    d
}

/// Whether `description` was written by natbinder on the host called `hostname`.
pub fn is_ours(description: &str, hostname: &str) -> bool {
    description
        .strip_prefix(TAG_PREFIX)
        .and_then(|rest| rest.split(' ').next())
        .is_some_and(|owner| owner == description_host(hostname))
}

/// Whose an entry of the gateway's table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryOwner {
    /// natbinder's on this host. `points_here`: to this host's address and the same port.
    Ours { points_here: bool },
    /// Another host's, if enabled: its port is held elsewhere. None: the gateway did not name an address.
    OtherHost(Option<Ipv4Addr>),
    /// This host's, made by something else (upnpc, a program's own UPnP): neither ours nor held.
    ThisHost,
}

pub struct Ownership {
    hostname: String,
    journal: Journal,
}

impl Ownership {
    pub fn new(hostname: String, journal: Journal) -> Self {
        Self { hostname, journal }
    }

    pub fn description(&self, comm: &str) -> String {
        description(&self.hostname, comm)
    }

    /// Sorts one entry of the gateway's table.
    pub fn classify(&self, entry: &GatewayEntry, lan: &LanInfo) -> EntryOwner {
        let key = PortKey::new(entry.protocol, entry.external_port);
        let client = entry.internal_ipv4();
        // Ours: made by us according to the journal (also after this host's address changed, or on
        // gateways that drop descriptions), or tagged with this host's name and pointing here.
        let journalled =
            self.journal.get(&key).is_some_and(|j| j.gateway == lan.gateway && Some(j.internal_client) == client);
        // Some routers report the internal client by host name rather than address: with our tag, such
        // an entry is taken as ours (never as another host's, which would block our own port).
        let client_is_here = client == Some(lan.local) || client.is_none();
        let tagged_here = client_is_here && is_ours(&entry.description, &self.hostname);
        if journalled || tagged_here {
            return EntryOwner::Ours { points_here: client_is_here && entry.internal_port == entry.external_port };
        }
        if client == Some(lan.local) {
            EntryOwner::ThisHost
        } else {
            EntryOwner::OtherHost(client)
        }
    }

    /// Journals a mapping about to be asked for, or that the gateway granted.
    pub async fn record(&mut self, key: PortKey, lan: &LanInfo, lease: Duration) {
        let write = self.journal.record(key, lan.local, lan.gateway, lease);
        self.commit(write).await;
    }

    /// Forgets a mapping that is gone from the gateway.
    pub async fn forget(&mut self, key: PortKey) {
        let write = self.journal.forget(&key);
        self.commit(write).await;
    }

    /// Journal entries for `gateway` that its listing no longer shows are gone: nothing left to delete.
    pub async fn forget_unlisted(&mut self, gateway: Ipv4Addr, listed: &HashSet<PortKey>) {
        let gone: Vec<PortKey> = self
            .journal
            .entries()
            .filter(|j| j.gateway == gateway)
            .filter_map(|j| j.key())
            .filter(|k| !listed.contains(k))
            .collect();
        for key in gone {
            self.forget(key).await;
        }
    }

    /// Journals a pinhole about to be asked for (`unique_id` None), or that the gateway opened.
    pub async fn record_pinhole(
        &mut self,
        key: PinholeKey,
        gateway: Ipv4Addr,
        unique_id: Option<u16>,
        lease: Duration,
    ) {
        let write = self.journal.record_pinhole(key, gateway, unique_id, lease);
        self.commit(write).await;
    }

    /// Forgets a pinhole that is closed.
    pub async fn forget_pinhole(&mut self, key: PinholeKey) {
        let write = self.journal.forget_pinhole(&key);
        self.commit(write).await;
    }

    /// The pinholes the journal says natbinder opened on `gateway`, with their ids.
    pub fn pinholes_on(&self, gateway: Ipv4Addr) -> Vec<(PinholeKey, Option<u16>)> {
        self.journal.pinholes().filter(|p| p.gateway == gateway).filter_map(|p| Some((p.key()?, p.unique_id))).collect()
    }

    /// What the journal says natbinder made on `gateway` for `local`.
    pub fn journalled_on(&self, gateway: Ipv4Addr, local: Ipv4Addr) -> Vec<PortKey> {
        self.journal
            .entries()
            .filter(|j| j.gateway == gateway && j.internal_client == local)
            .filter_map(|j| j.key())
            .collect()
    }
}

impl Ownership {
    /// Commits one journal write: in place if it is quick, else off the event loop. A failed write is
    /// logged (the mapping is made either way) and the journal told, so that the next change writes
    /// the whole file again.
    async fn commit(&mut self, write: Option<JournalWrite>) {
        let Some(write) = write else { return };
        let result = if write.is_quick() {
            write.commit()
        } else {
            tokio::task::spawn_blocking(move || write.commit())
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("writing the journal: {e}")))
        };
        if let Err(e) = result {
            warn!("{e:#}");
            self.journal.write_failed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(client: &str, description: &str, internal_port: u16) -> GatewayEntry {
        GatewayEntry {
            protocol: crate::Protocol::Tcp,
            external_port: 8080,
            internal_client: client.into(),
            internal_port,
            description: description.into(),
            lease_secs: 3600,
            enabled: true,
        }
    }

    #[test]
    fn entries_are_ours_by_tag_or_journal_and_others_hold_the_rest() {
        let lan = LanInfo {
            gateway: "192.168.1.1".parse().unwrap(),
            local: "192.168.1.10".parse().unwrap(),
            interface_index: 2,
        };
        let mut o = Ownership::new("box".into(), Journal::in_memory());
        assert_eq!(
            o.classify(&entry("192.168.1.10", "natbinder@box web", 8080), &lan),
            EntryOwner::Ours { points_here: true }
        );
        assert_eq!(
            o.classify(&entry("box.lan", "natbinder@box web", 8080), &lan),
            EntryOwner::Ours { points_here: true }
        );
        assert_eq!(
            o.classify(&entry("192.168.1.10", "natbinder@box web", 9090), &lan),
            EntryOwner::Ours { points_here: false }
        );
        assert_eq!(o.classify(&entry("192.168.1.10", "upnpc", 8080), &lan), EntryOwner::ThisHost);
        let other: Ipv4Addr = "192.168.1.20".parse().unwrap();
        assert_eq!(
            o.classify(&entry("192.168.1.20", "natbinder@box web", 8080), &lan),
            EntryOwner::OtherHost(Some(other))
        );
        assert_eq!(o.classify(&entry("nas.lan", "Transmission", 8080), &lan), EntryOwner::OtherHost(None));
        // Journalled from this host's previous address (DHCP gave it another): ours, pointing elsewhere.
        let _ = o.journal.record(
            PortKey::new(crate::Protocol::Tcp, 8080),
            "192.168.1.11".parse().unwrap(),
            lan.gateway,
            Duration::from_secs(60),
        );
        assert_eq!(o.classify(&entry("192.168.1.11", "", 8080), &lan), EntryOwner::Ours { points_here: false });
    }
}
