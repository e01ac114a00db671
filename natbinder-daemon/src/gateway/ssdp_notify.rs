//! The gateway's SSDP announcements (NOTIFY on 239.255.255.250:1900): what they say, and when they
//! mean a restart. [`super::announcements`] listens for them.
//!
//! A UPnP device announces itself when it starts and periodically after. A restarted miniupnpd comes
//! back on a new HTTP port with an empty table and a new BOOTID.UPNP.ORG: when the gateway's announced
//! boot id or description URL changes, or it says goodbye, the reconciler finds it again and re-maps
//! everything at once instead of at its next periodic check. Only announcements sent from the default
//! gateway's address count: any LAN device can multicast.
//!
//! Never subscribes to UPnP events (no callback server: CallStranger, CVE-2020-12695).
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

pub const SSDP_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
pub const SSDP_PORT: u16 = 1900;
/// Longest datagram considered; real announcements are a few hundred bytes.
pub const MAX_DATAGRAM: usize = 2048;

/// The parts of a NOTIFY that matter here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    pub kind: NotifyKind,
    /// NT: the device or service type announced.
    pub notification_type: String,
    pub location: Option<String>,
    pub boot_id: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyKind {
    Alive,
    ByeBye,
    Update,
}

impl Notify {
    /// Whether this announces an Internet gateway (its root device or its WAN connection service).
    pub fn is_gateway(&self) -> bool {
        let nt = self.notification_type.to_ascii_lowercase();
        nt.contains("internetgatewaydevice") || nt.contains("wanipconnection") || nt.contains("wanpppconnection")
    }
}

/// Parses one SSDP datagram. Anything that is not a well-formed NOTIFY is None: the LAN may send
/// anything, and nothing it sends is an error worth more than ignoring.
pub fn parse_notify(datagram: &[u8]) -> Option<Notify> {
    if datagram.len() > MAX_DATAGRAM {
        return None;
    }
    let text = std::str::from_utf8(datagram).ok()?;
    let mut lines = text.split("\r\n").flat_map(|l| l.split('\n'));
    let start = lines.next()?.trim();
    if !start.eq_ignore_ascii_case("NOTIFY * HTTP/1.1") {
        return None;
    }
    let (mut nt, mut nts, mut location, mut boot_id) = (None, None, None, None);
    for line in lines {
        if line.trim().is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        match name.trim().to_ascii_uppercase().as_str() {
            "NT" => nt = Some(value.to_string()),
            "NTS" => nts = Some(value.to_ascii_lowercase()),
            "LOCATION" => location = Some(value.to_string()),
            "BOOTID.UPNP.ORG" => boot_id = value.parse().ok(),
            _ => {}
        }
    }
    let kind = match nts?.as_str() {
        "ssdp:alive" => NotifyKind::Alive,
        "ssdp:byebye" => NotifyKind::ByeBye,
        "ssdp:update" => NotifyKind::Update,
        _ => return None,
    };
    Some(Notify { kind, notification_type: nt?, location, boot_id })
}

/// Decides, announcement by announcement, whether the gateway changed.
#[derive(Debug, Default)]
pub struct RestartDetector {
    state: Seen,
}

#[derive(Debug, Default, PartialEq, Eq)]
enum Seen {
    #[default]
    Nothing,
    Alive {
        boot_id: Option<u32>,
        location: Option<String>,
    },
    /// It said goodbye: whatever it announces next is a comeback.
    Gone,
}

impl RestartDetector {
    /// Feeds one announcement that came from the gateway; true when it signals a restart or a move.
    pub fn changed(&mut self, notify: &Notify) -> bool {
        if !notify.is_gateway() {
            return false;
        }
        match notify.kind {
            NotifyKind::ByeBye => std::mem::replace(&mut self.state, Seen::Gone) != Seen::Gone,
            NotifyKind::Alive | NotifyKind::Update => {
                let seen = Seen::Alive { boot_id: notify.boot_id, location: notify.location.clone() };
                match std::mem::replace(&mut self.state, seen) {
                    Seen::Nothing => false,
                    Seen::Gone => true,
                    previous => previous != self.state,
                }
            }
        }
    }
}

/// Whether a datagram's source is the gateway (any port: devices announce from ephemeral ports).
pub fn from_gateway(source: SocketAddr, gateway: Ipv4Addr) -> bool {
    source.ip() == IpAddr::V4(gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIVE: &str = "NOTIFY * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nCACHE-CONTROL: max-age=120\r\n\
        LOCATION: http://192.168.77.1:5555/rootDesc.xml\r\nSERVER: Debian/12 UPnP/1.1 MiniUPnPd/2.3.1\r\n\
        NT: urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\n\
        USN: uuid:3d3cec3a-8cf0-11e0-98ee-001a6bd2d07b::urn:schemas-upnp-org:device:InternetGatewayDevice:2\r\n\
        NTS: ssdp:alive\r\nOPT: \"http://schemas.upnp.org/upnp/1/0/\"; ns=01\r\n01-NLS: 1700000000\r\n\
        BOOTID.UPNP.ORG: 1700000000\r\nCONFIGID.UPNP.ORG: 1337\r\n\r\n";

    #[test]
    fn parses_a_miniupnpd_announcement() {
        let n = parse_notify(ALIVE.as_bytes()).unwrap();
        assert_eq!(n.kind, NotifyKind::Alive);
        assert_eq!(n.boot_id, Some(1_700_000_000));
        assert_eq!(n.location.as_deref(), Some("http://192.168.77.1:5555/rootDesc.xml"));
        assert!(n.is_gateway());
    }

    #[test]
    fn a_new_boot_id_or_location_or_a_goodbye_is_a_change() {
        let mut d = RestartDetector::default();
        let first = parse_notify(ALIVE.as_bytes()).unwrap();
        assert!(!d.changed(&first), "the first announcement only sets the baseline");
        assert!(!d.changed(&first), "a repeated announcement is no change");
        let rebooted =
            parse_notify(ALIVE.replace("1700000000\r\nCONFIGID", "1700000099\r\nCONFIGID").as_bytes()).unwrap();
        assert!(d.changed(&rebooted));
        let moved = parse_notify(
            ALIVE.replace(":5555/", ":6666/").replace("1700000000\r\nCONFIGID", "1700000099\r\nCONFIGID").as_bytes(),
        )
        .unwrap();
        assert!(d.changed(&moved));
        let bye = parse_notify(ALIVE.replace("ssdp:alive", "ssdp:byebye").as_bytes()).unwrap();
        assert!(d.changed(&bye));
        assert!(!d.changed(&bye), "one goodbye is enough");
        assert!(d.changed(&moved), "the first announcement after a goodbye is a comeback");
        assert!(!d.changed(&moved));
        let other =
            parse_notify(ALIVE.replace("InternetGatewayDevice:2\r\nUSN", "MediaServer:1\r\nUSN").as_bytes()).unwrap();
        assert!(!d.changed(&other), "another kind of device is not the gateway");
    }

    #[test]
    fn anything_else_is_ignored() {
        for junk in [
            &b""[..],
            b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\nNT: x\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\nNTS: ssdp:alive\r\n\r\n",
            b"NOTIFY * HTTP/1.1\r\nno colon here\r\n\r\n",
            b"\xff\xfe\x00garbage",
            &[b'A'; MAX_DATAGRAM + 1],
        ] {
            assert_eq!(parse_notify(junk), None, "{:?}", String::from_utf8_lossy(junk));
        }
        let odd_case = ALIVE
            .replace("NTS: ssdp:alive", "nts: SSDP:ALIVE")
            .replace("BOOTID.UPNP.ORG: 1700000000", "BOOTID.UPNP.ORG: nope");
        let n = parse_notify(odd_case.as_bytes()).unwrap();
        assert_eq!((n.kind, n.boot_id), (NotifyKind::Alive, None));
    }

    #[test]
    fn only_the_gateway_counts() {
        let gw = Ipv4Addr::new(192, 168, 77, 1);
        assert!(from_gateway("192.168.77.1:40000".parse().unwrap(), gw));
        assert!(!from_gateway("192.168.77.66:1900".parse().unwrap(), gw));
    }
}
