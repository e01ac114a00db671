//! The shipped deny list: ports that are local-only by convention. It applies to every program,
//! after the administrator's own rules (which can override it) and before the scope's default.
//!
//! Each entry says why, because a user who finds a port not forwarded deserves the reason, and a
//! packager who trims the list needs it. Left out on purpose:
//! * 8080: HTTP's common alternate port, which people's own servers use on purpose. qBittorrent's Web
//!   UI also defaults to it (and asks for a password): add a deny rule if you run it there.
//! * 3000, 5173 and other development servers' ports: too generic to tell apart from real servers.
//! * BitTorrent, game and VoIP ports: forwarding those is what natbinder is for.
use crate::Protocol;

/// One entry: a port range (both ends included), a protocol (None: both) and the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeniedPorts {
    pub first: u16,
    pub last: u16,
    pub protocol: Option<Protocol>,
    pub reason: &'static str,
}

const fn tcp(first: u16, last: u16, reason: &'static str) -> DeniedPorts {
    DeniedPorts { first, last, protocol: Some(Protocol::Tcp), reason }
}

const fn udp(first: u16, last: u16, reason: &'static str) -> DeniedPorts {
    DeniedPorts { first, last, protocol: Some(Protocol::Udp), reason }
}

const fn both(first: u16, last: u16, reason: &'static str) -> DeniedPorts {
    DeniedPorts { first, last, protocol: None, reason }
}

pub const DENY_LIST: &[DeniedPorts] = &[
    // Remote control of the machine itself.
    tcp(2375, 2376, "Docker Engine API: whoever reaches it is root on this machine"),
    tcp(2379, 2380, "etcd client and peer API: a cluster's whole state"),
    tcp(3389, 3389, "Remote Desktop (RDP): a constant target of password guessing"),
    tcp(5555, 5555, "Android Debug Bridge over TCP: a shell on the device, no password"),
    tcp(5900, 5910, "VNC: remote desktops, often with a weak or no password"),
    tcp(6000, 6063, "X11: another program's keyboard and screen"),
    tcp(6443, 6443, "Kubernetes API server"),
    tcp(9229, 9229, "Node.js inspector: runs any code it is sent"),
    tcp(10250, 10250, "kubelet API: runs commands in containers"),
    tcp(4713, 4713, "PulseAudio native protocol: the microphone"),
    // Databases and caches, which bind 0.0.0.0 and often trust whoever connects.
    tcp(1433, 1433, "Microsoft SQL Server"),
    tcp(1521, 1521, "Oracle database listener"),
    tcp(3306, 3306, "MySQL / MariaDB"),
    tcp(5432, 5432, "PostgreSQL"),
    tcp(5984, 5984, "CouchDB"),
    tcp(6379, 6379, "Redis: no password by default, and it can write files"),
    tcp(9200, 9200, "Elasticsearch / OpenSearch HTTP API"),
    tcp(9300, 9300, "Elasticsearch transport"),
    both(11211, 11211, "memcached: no authentication, and a UDP amplifier"),
    tcp(27017, 27019, "MongoDB"),
    // Web UIs and file servers that programs open on all addresses for the LAN.
    tcp(8000, 8000, "`python3 -m http.server`'s default: serves its working directory to anyone"),
    tcp(8384, 8384, "Syncthing's web GUI: full control of what is shared"),
    tcp(8888, 8888, "Jupyter: runs code for whoever has the token"),
    tcp(9091, 9091, "Transmission's RPC and web interface"),
    // LAN discovery protocols: they mean nothing beyond the LAN, and answer anyone who asks.
    udp(1900, 1900, "SSDP (UPnP discovery): LAN-only, and an amplifier"),
    udp(3702, 3702, "WS-Discovery: LAN-only, and an amplifier"),
    udp(5350, 5351, "NAT-PMP/PCP: the gateway's own protocol"),
    udp(5353, 5353, "mDNS: LAN-only name resolution (browsers bind it)"),
    udp(5355, 5355, "LLMNR: LAN-only name resolution"),
];

/// The entry that denies `protocol`/`port`, if any.
pub fn denies(protocol: Protocol, port: u16) -> Option<&'static DeniedPorts> {
    DENY_LIST.iter().find(|d| d.protocol.is_none_or(|p| p == protocol) && (d.first..=d.last).contains(&port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_denies_databases_and_web_uis_but_not_the_ports_people_forward() {
        assert!(denies(Protocol::Tcp, 5432).is_some_and(|d| d.reason.contains("PostgreSQL")));
        assert!(denies(Protocol::Tcp, 8000).is_some_and(|d| d.reason.contains("http.server")));
        assert!(denies(Protocol::Udp, 11211).is_some());
        assert!(denies(Protocol::Udp, 5432).is_none(), "PostgreSQL is TCP only");
        for (protocol, port) in
            [(Protocol::Tcp, 6881), (Protocol::Udp, 27015), (Protocol::Tcp, 8080), (Protocol::Tcp, 25565)]
        {
            assert!(denies(protocol, port).is_none(), "{protocol}/{port}");
        }
    }

    /// config/natbinder.toml, the file packages install, comments every entry with its reason.
    #[test]
    fn the_shipped_configuration_explains_every_entry_and_parses() {
        let text = include_str!("../../../config/natbinder.toml");
        for d in DENY_LIST {
            let ports = if d.first == d.last { d.first.to_string() } else { format!("{}-{}", d.first, d.last) };
            let protocol = match d.protocol {
                Some(p) => p.to_string(),
                None => "tcp+udp".to_string(),
            };
            let line = text.lines().find(|l| l.split_whitespace().nth(1) == Some(&format!("{protocol}/{ports}")));
            assert!(
                line.is_some_and(|l| l.contains(&d.reason.replace('`', ""))),
                "{protocol}/{ports} in config/natbinder.toml"
            );
        }
        let entries = text.lines().filter(|l| l.starts_with("#   tcp") || l.starts_with("#   udp")).count();
        assert_eq!(entries, DENY_LIST.len(), "config/natbinder.toml lists ports the deny list does not have");
        crate::config::ConfigFile::parse(text, std::path::Path::new("config/natbinder.toml")).unwrap();
    }

    #[test]
    fn every_entry_is_a_real_range_above_the_privileged_ports_with_a_reason() {
        for d in DENY_LIST {
            assert!(d.first >= 1024 && d.first <= d.last && !d.reason.is_empty(), "{d:?}");
        }
    }
}
