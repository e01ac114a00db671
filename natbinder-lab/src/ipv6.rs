//! IPv6 in the lab ([`crate::LabConfig::ipv6`]): global addresses on every host, no NAT, and the
//! gateway's firewall opened per host and port by miniupnpd's IPv6 pinholes (UPnP IGDv2
//! WANIPv6FirewallControl:1, and PCP MAP over IPv6).
//!
//! ```text
//!   lan1 2001:db8:77::10 ─┐                                       ┌─ wan peer 2001:db8:1::100
//!                         ├─ br0 ─ gw ─ wan0 ─────────────────────┘  (route 2001:db8:77::/64 via gw)
//!   lan2 2001:db8:77::20 ─┘  2001:db8:77::1, fe80::1   2001:db8:1::1
//! ```
//! The LAN hosts' default route is the gateway's link-local fe80::1, as a router's advertisement would
//! give it. The gateway forwards IPv6 with the same forward chain as IPv4 (policy drop, established and
//! related accepted, LAN->WAN accepted, then miniupnpd's chain): a WAN peer reaches a LAN host's port only
//! through a pinhole.
//!
//! miniupnpd 2.3.1 (Debian miniupnpd-nftables) as the lab runs it, checked here:
//! - Without `ipv6_listening_ip` its one HTTP socket is dual-stack on br0: the same port answers on
//!   192.168.77.1, [`GW_LAN_IP6`] and [`GW_LAN_LL6`]; PCP listens on [::]:5351 (requests from the WAN
//!   are ignored). With `ipv6_listening_ip` set, HTTP and PCP are bound to that one address: IPv4 UPnP
//!   and link-local requests are refused and SSDP over IPv6 multicast finds nothing.
//! - Pinhole actions are only allowed for the request's source address, compared as text with
//!   InternalClient (write it as the canonical lower-case compressed form), and InternalPort >= 1024
//!   (UPnP only; PCP accepts any port). Otherwise 606.
//! - miniupnpd keeps no pinhole state of its own besides the nftables rules (no `lease_file6` here):
//!   they stay across a restart (ids then start again at 1) and only [`Lab::stop_miniupnpd`] or
//!   [`Lab::flush_gateway_rules`] (which flush the `miniupnpd` chain) lose them.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Ipv6Addr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    os::fd::FromRawFd,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{protocol_name, run_cmd, Lab, Netns, Reach, NATPMP_PORT};

/// The LAN's /64 (documentation prefix; nothing outside the lab's namespaces is ever addressed).
pub const LAN6_PREFIX: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0);
/// The gateway's global address on br0, where miniupnpd's HTTP server and PCP listen (with the lab's
/// default settings also on [`GW_LAN_LL6`] and over IPv4).
pub const GW_LAN_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1);
/// The gateway's link-local address on br0 (the only one it has there; fixed, as many routers do), and
/// the LAN hosts' IPv6 default router.
pub const GW_LAN_LL6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
pub const LAN1_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x10);
pub const LAN2_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 0x20);
/// The WAN side's /64.
pub const WAN6_PREFIX: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0);
pub const GW_WAN_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const WAN_PEER_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100);
/// The pinhole service's type and its control path in miniupnpd's root description (relative: the
/// description has no URLBase, so a client puts the gateway's IPv6 address in front itself).
pub const WANIPV6_FIREWALL_CONTROL: &str = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1";
pub const PINHOLE_CONTROL_PATH: &str = "/ctl/IP6FCtl";

/// An IPv6 pinhole the gateway holds: one accept rule in its `miniupnpd` chain, as miniupnpd 2.3.1
/// writes it (`iif "wan0" th dport 7001 @nh,192,128 0x2001..10 @nh,48,8 0x6 accept`, with
/// `th sport`/`@nh,64,128` when a remote host or port was given). UPnP and PCP pinholes look alike.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayPinhole {
    /// "TCP" or "UDP".
    pub protocol: String,
    pub internal_client: Ipv6Addr,
    pub internal_port: u16,
    /// None for any remote host (what natbinder asks for).
    pub remote_host: Option<Ipv6Addr>,
    /// None for any remote port.
    pub remote_port: Option<u16>,
    /// The UniqueID miniupnpd gave it (from the rule's label `pinhole-<id> ts-<expiry>: <description>`).
    /// Not unique after a miniupnpd restart: ids start again at 1 while old pinholes stay.
    pub unique_id: Option<u16>,
    /// When miniupnpd removes it, in seconds of CLOCK_MONOTONIC (miniupnpd's clock); see
    /// [`GatewayPinhole::remaining`].
    pub expires_at: Option<u64>,
    /// "IGD2 pinhole" (UPnP), "PCP MAP <nonce as 3 little-endian words>" (PCP), or "" once the
    /// pinhole was refreshed (miniupnpd 2.3.1 drops the description when it rewrites the rule).
    pub description: String,
}

impl GatewayPinhole {
    /// Time left until miniupnpd removes the pinhole (zero if due), measured now.
    pub fn remaining(&self) -> Option<Duration> {
        let expires_at = self.expires_at?;
        Some(Duration::from_secs(expires_at).saturating_sub(monotonic_now()))
    }
}

fn monotonic_now() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Reads the pinholes out of `nft -j --debug=netlink list chain inet filter miniupnpd`: that command
/// prints the netlink view of each rule (with miniupnpd's raw rule userdata, which the JSON leaves out)
/// and then one line of JSON. Rules that are not IPv6 pinholes (miniupnpd's IPv4 forward rules in the
/// same chain, `@nh,128,32` / `@nh,72,8`) are skipped. JSON alone (no debug text) also parses, without
/// ids, expiries and descriptions.
pub fn parse_nft_pinholes(nft_output: &str) -> Result<Vec<GatewayPinhole>> {
    let json_start = nft_output.find("{\"nftables\"").ok_or_else(|| anyhow!("`nft -j` printed no JSON"))?;
    let (debug, json) = nft_output.split_at(json_start);
    let labels = parse_netlink_userdata(debug);
    let document: serde_json::Value = serde_json::from_str(json.trim()).context("`nft -j` did not print JSON")?;
    let items = document["nftables"].as_array().ok_or_else(|| anyhow!("`nft -j` printed no \"nftables\" list"))?;
    let mut pinholes = Vec::new();
    for rule in items.iter().filter_map(|item| item.get("rule")) {
        let Some(expressions) = rule["expr"].as_array() else { continue };
        let (mut protocol, mut internal_port, mut internal_client) = (None, None, None);
        let (mut remote_host, mut remote_port, mut accepts) = (None, None, false);
        for expression in expressions {
            if expression.get("accept").is_some() {
                accepts = true;
            }
            let Some(matched) = expression.get("match") else { continue };
            if matched["op"] != "==" {
                continue;
            }
            let (left, right) = (&matched["left"], &matched["right"]);
            let port = || right.as_u64().and_then(|p| u16::try_from(p).ok());
            if let Some(payload) = left.get("payload") {
                let nh = |offset: u64, len: u64| {
                    payload["base"] == "nh" && payload["offset"] == offset && payload["len"] == len
                };
                if nh(48, 8) || (payload["protocol"] == "ip6" && payload["field"] == "nexthdr") {
                    protocol = protocol_name(right);
                } else if nh(192, 128) || (payload["protocol"] == "ip6" && payload["field"] == "daddr") {
                    internal_client = ipv6_value(right);
                } else if nh(64, 128) || (payload["protocol"] == "ip6" && payload["field"] == "saddr") {
                    remote_host = ipv6_value(right);
                } else if payload["field"] == "dport" {
                    internal_port = port();
                    protocol = protocol.or_else(|| protocol_name(&payload["protocol"]));
                } else if payload["field"] == "sport" {
                    remote_port = port();
                }
            } else if left["meta"]["key"] == "l4proto" {
                protocol = protocol_name(right);
            }
        }
        let (true, Some(protocol), Some(internal_port), Some(internal_client)) =
            (accepts, protocol, internal_port, internal_client)
        else {
            continue;
        };
        // nft shows a label in TLV form (as `nft add rule ... comment` writes it) as "comment";
        // miniupnpd's raw userdata only in the netlink debug text.
        let label = rule["comment"]
            .as_str()
            .map(str::to_string)
            .or_else(|| rule["handle"].as_u64().and_then(|h| labels.get(&h).cloned()));
        let (unique_id, expires_at, description) = match label.as_deref().and_then(parse_pinhole_label) {
            Some((id, expiry, description)) => (Some(id), Some(expiry), description),
            None => (None, None, String::new()),
        };
        pinholes.push(GatewayPinhole {
            protocol: protocol.to_string(),
            internal_client,
            internal_port,
            remote_host,
            remote_port,
            unique_id,
            expires_at,
            description,
        });
    }
    Ok(pinholes)
}

/// An address as nft JSON prints a 128-bit raw payload match ("0x20010db8...") or as text.
fn ipv6_value(value: &serde_json::Value) -> Option<Ipv6Addr> {
    let text = value.as_str()?;
    match text.strip_prefix("0x") {
        Some(hex) => u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from),
        None => text.parse().ok(),
    }
}

/// Rule handle -> userdata text from `nft --debug=netlink list chain ...`, whose rules read
/// `inet filter miniupnpd <handle> [<previous handle>]`, expression lines, then `  userdata = { ... }`.
fn parse_netlink_userdata(debug: &str) -> HashMap<u64, String> {
    let mut labels = HashMap::new();
    let mut handle = None;
    for line in debug.lines() {
        if let Some(text) = line.trim().strip_prefix("userdata = { ") {
            if let Some(h) = handle.take() {
                labels.insert(h, text.strip_suffix(" }").unwrap_or(text).to_string());
            }
        } else if !line.starts_with(' ') {
            // A rule header: family, table, chain, handle.
            handle = line.split_whitespace().nth(3).and_then(|h| h.parse().ok());
        }
    }
    labels
}

/// miniupnpd's pinhole label `pinhole-<id> ts-<expiry>: <description>` -> (id, expiry, description).
fn parse_pinhole_label(label: &str) -> Option<(u16, u64, String)> {
    let rest = label.strip_prefix("pinhole-")?;
    let (id, rest) = rest.split_once(" ts-")?;
    let (expiry, description) = rest.split_once(':')?;
    Some((id.parse().ok()?, expiry.parse().ok()?, description.trim().to_string()))
}

/// An address of a lab host as `ip -j addr` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabAddress6 {
    pub address: Ipv6Addr,
    pub prefix_len: u8,
    /// A privacy address the kernel made (RFC 8981), see [`Lab::enable_temporary_addresses6`].
    pub temporary: bool,
    /// preferred_lft 0: still valid, no longer chosen as a source for new connections.
    pub deprecated: bool,
    pub tentative: bool,
    /// Carries `mngtmpaddr`: the kernel makes temporary addresses from its prefix.
    pub mngtmpaddr: bool,
}

/// How [`Lab::address6`] changes an address (`ip addr add|change|replace|del`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressChange {
    Add,
    Change,
    Replace,
    Delete,
}

/// miniupnpd's HTTP answer to a SOAP request: status 200 with the action's response, or 500 with a
/// UPnPError.
#[derive(Clone, Debug)]
pub struct PinholeSoapReply {
    pub status: u16,
    pub body: String,
}

impl PinholeSoapReply {
    /// The UPnP error code (606, 402, 709...), if the gateway refused.
    pub fn error_code(&self) -> Option<u32> {
        self.field("errorCode")?.parse().ok()
    }

    /// The text of element `name` in the body (e.g. "UniqueID", "PinholePackets", "FirewallEnabled").
    pub fn field(&self, name: &str) -> Option<String> {
        let start = self.body.find(&format!("<{name}>"))? + name.len() + 2;
        let end = self.body[start..].find(&format!("</{name}>"))? + start;
        Some(self.body[start..end].to_string())
    }
}

/// A PCP MAP answer (RFC 6887 §11.1), as [`Lab::pcp_map6`] received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcpMap6Reply {
    /// 0 SUCCESS, 2 NOT_AUTHORIZED, 8 NO_RESOURCES, 12 ADDRESS_MISMATCH...
    pub result: u8,
    pub lifetime: u32,
    pub epoch: u32,
    pub nonce: [u8; 12],
    pub protocol: u8,
    pub internal_port: u16,
    pub external_port: u16,
    /// For an IPv6 pinhole miniupnpd answers the client's own address.
    pub external_address: Ipv6Addr,
}

/// Decodes a 60-byte (or longer, with options) PCP MAP response; None for anything else.
pub fn parse_pcp_map6_reply(bytes: &[u8]) -> Option<PcpMap6Reply> {
    if bytes.len() < 60 || bytes[0] != 2 || bytes[1] != 0x81 {
        return None;
    }
    let u32_at = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    let u16_at = |i: usize| u16::from_be_bytes(bytes[i..i + 2].try_into().unwrap());
    Some(PcpMap6Reply {
        result: bytes[3],
        lifetime: u32_at(4),
        epoch: u32_at(8),
        nonce: bytes[24..36].try_into().unwrap(),
        protocol: bytes[36],
        internal_port: u16_at(40),
        external_port: u16_at(42),
        external_address: Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[44..60]).unwrap()),
    })
}

/// A PCP MAP request (RFC 6887 §11.1, no options) for `client`, suggesting the same external port and
/// the all-zeros external address.
pub fn pcp_map6_request(client: Ipv6Addr, nonce: [u8; 12], protocol: u8, internal_port: u16, lifetime: u32) -> Vec<u8> {
    let mut request = vec![2, 1, 0, 0];
    request.extend_from_slice(&lifetime.to_be_bytes());
    request.extend_from_slice(&client.octets());
    request.extend_from_slice(&nonce);
    request.extend_from_slice(&[protocol, 0, 0, 0]);
    request.extend_from_slice(&internal_port.to_be_bytes());
    request.extend_from_slice(&internal_port.to_be_bytes());
    request.extend_from_slice(&Ipv6Addr::UNSPECIFIED.octets());
    request
}

impl Lab {
    /// The gateway's IPv6 pinholes as it really holds them (whoever made them: UPnP or PCP), in rule
    /// order. A refreshed pinhole moves to the end (miniupnpd deletes and re-adds its rule).
    pub fn gateway_pinholes(&self) -> Result<Vec<GatewayPinhole>> {
        let out = self
            .gw
            .exec("nft", &["-j", "--debug=netlink", "list", "chain", "inet", "filter", "miniupnpd"])
            .context("listing the gateway's pinholes")?;
        parse_nft_pinholes(&out)
    }

    /// miniupnpd's WANIPv6FirewallControl control URL on the gateway's global address.
    pub fn pinhole_control_url(&self) -> String {
        format!("http://[{GW_LAN_IP6}]:{}{PINHOLE_CONTROL_PATH}", self.config.http_port)
    }

    /// Changes an IPv6 address of `ns`'s eth0 (a LAN host or the WAN peer): `ip addr <op>
    /// <addr>/64 dev eth0 [nodad] <extra>`. An added address is usable at once (`nodad`). `extra` takes
    /// lifetimes and flags: `["preferred_lft", "0"]` deprecates an address (with Change, also give
    /// `valid_lft`, or it becomes forever), `["mngtmpaddr"]` makes the kernel derive privacy addresses.
    pub fn address6(&self, ns: &Netns, op: AddressChange, addr: Ipv6Addr, extra: &[&str]) -> Result<()> {
        let prefix = format!("{addr}/64");
        let op = match op {
            AddressChange::Add => "add",
            AddressChange::Change => "change",
            AddressChange::Replace => "replace",
            AddressChange::Delete => "del",
        };
        let mut args = vec!["-n", ns.name.as_str(), "addr", op, prefix.as_str(), "dev", "eth0"];
        if op != "del" && !extra.contains(&"nodad") {
            args.push("nodad");
        }
        args.extend_from_slice(extra);
        run_cmd(std::process::Command::new("ip").args(&args))?;
        Ok(())
    }

    /// The global IPv6 addresses of `ns`'s eth0, in the kernel's order (newest first).
    pub fn addresses6(&self, ns: &Netns) -> Result<Vec<LabAddress6>> {
        let out = run_cmd(
            std::process::Command::new("ip")
                .args(["-n", &ns.name, "-j", "-6", "addr", "show", "dev", "eth0", "scope", "global"]),
        )?;
        parse_ip_addresses(&out)
    }

    /// Turns on privacy addresses on `ns`'s eth0 (use_tempaddr=2, and `mngtmpaddr` on its stable
    /// address `stable`) and returns the temporary address the kernel made from the LAN prefix. It is
    /// usable at once (the lab turns DAD off on LAN hosts) and, being preferred, becomes the source of
    /// new connections to global addresses.
    pub fn enable_temporary_addresses6(&self, ns: &Netns, stable: Ipv6Addr) -> Result<Ipv6Addr> {
        ns.sysctl("net/ipv6/conf/eth0/use_tempaddr", "2")?;
        let before = self.addresses6(ns)?;
        self.address6(ns, AddressChange::Change, stable, &["mngtmpaddr"])?;
        self.new_temporary_address(ns, &before)
    }

    /// Rotates the privacy address as the kernel does when one ages: the current temporary address is
    /// deprecated (preferred_lft 0, still valid for `valid_secs`) and the kernel makes a new one at once,
    /// which is returned. Needs [`Lab::enable_temporary_addresses6`] first.
    pub fn rotate_temporary_address6(&self, ns: &Netns, valid_secs: u32) -> Result<Ipv6Addr> {
        let before = self.addresses6(ns)?;
        let current = before
            .iter()
            .find(|a| a.temporary && !a.deprecated)
            .ok_or_else(|| anyhow!("{} has no preferred temporary address", ns.name))?;
        let valid = valid_secs.to_string();
        self.address6(ns, AddressChange::Change, current.address, &["preferred_lft", "0", "valid_lft", &valid])?;
        self.new_temporary_address(ns, &before)
    }

    fn new_temporary_address(&self, ns: &Netns, before: &[LabAddress6]) -> Result<Ipv6Addr> {
        crate::wait_for(Duration::from_secs(2), || {
            let now = self.addresses6(ns).ok()?;
            now.into_iter()
                .find(|a| a.temporary && !a.deprecated && !before.iter().any(|b| b.address == a.address))
                .map(|a| a.address)
        })
        .ok_or_else(|| anyhow!("the kernel made no new temporary address on {}", ns.name))
    }

    /// Sends one WANIPv6FirewallControl action from a program in `from` to miniupnpd at `gateway`
    /// (port `config.http_port`; a link-local gateway such as [`GW_LAN_LL6`] is reached through eth0),
    /// from `source` if given (else the kernel's choice: a privacy address if there is one).
    /// miniupnpd only lets a client open, update or delete pinholes for the exact source address of
    /// the request. `args` go into the body in order, e.g. `[("RemoteHost", ""), ("RemotePort", "0"),
    /// ("InternalClient", "2001:db8:77::20"), ("InternalPort", "7001"), ("Protocol", "6"),
    /// ("LeaseTime", "3600")]`.
    pub fn pinhole_soap(
        &self,
        from: &Netns,
        source: Option<Ipv6Addr>,
        gateway: Ipv6Addr,
        action: &str,
        args: &[(&str, &str)],
    ) -> Result<PinholeSoapReply> {
        let port = self.config.http_port;
        let params: String = args.iter().map(|(k, v)| format!("<{k}>{v}</{k}>")).collect();
        let body = format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><u:{action} \
             xmlns:u=\"{WANIPV6_FIREWALL_CONTROL}\">{params}</u:{action}></s:Body></s:Envelope>\r\n"
        );
        let request = format!(
            "POST {PINHOLE_CONTROL_PATH} HTTP/1.1\r\nHost: [{gateway}]:{port}\r\nContent-Type: text/xml; \
             charset=\"utf-8\"\r\nSOAPAction: \"{WANIPV6_FIREWALL_CONTROL}#{action}\"\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = from.run(move || -> Result<String> {
            let scope = if gateway.is_unicast_link_local() { eth0_index()? } else { 0 };
            let to = SocketAddrV6::new(gateway, port, 0, scope);
            let mut stream = tcp_connect_from(source, to, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(30)))?;
            stream.write_all(request.as_bytes())?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer)?;
            Ok(answer)
        })?;
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no HTTP answer from [{gateway}]:{port}: {answer:?}"))?;
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
        Ok(PinholeSoapReply { status, body })
    }

    /// Another LAN host (lan2) opens a pinhole to itself (any remote host and port) with UPnP, as a
    /// BitTorrent client there would; returns its UniqueID.
    pub fn lan2_opens_pinhole(&self, protocol: &str, port: u16, lease_secs: u32) -> Result<u16> {
        let number = match protocol {
            "TCP" => "6",
            "UDP" => "17",
            _ => bail!("protocol {protocol:?}: TCP or UDP"),
        };
        let (client, port_text, lease) = (LAN2_IP6.to_string(), port.to_string(), lease_secs.to_string());
        let reply = self.pinhole_soap(
            &self.lan2,
            Some(LAN2_IP6),
            GW_LAN_IP6,
            "AddPinhole",
            &[
                ("RemoteHost", ""),
                ("RemotePort", "0"),
                ("InternalClient", &client),
                ("InternalPort", &port_text),
                ("Protocol", number),
                ("LeaseTime", &lease),
            ],
        )?;
        reply
            .field("UniqueID")
            .and_then(|id| id.parse().ok())
            .ok_or_else(|| anyhow!("the gateway refused lan2's pinhole {protocol}/{port}: {}", reply.body))
    }

    /// Sends one PCP MAP request over IPv6 from `client` (an address of `from`) to the gateway's
    /// [`GW_LAN_IP6`]:5351 and waits up to 2 s for the answer. Lifetime 0 deletes. miniupnpd answers an
    /// IPv6 MAP with a pinhole for the internal port (the suggested external port is ignored).
    pub fn pcp_map6(
        &self,
        from: &Netns,
        client: Ipv6Addr,
        nonce: [u8; 12],
        protocol: u8,
        internal_port: u16,
        lifetime: u32,
    ) -> Result<PcpMap6Reply> {
        let request = pcp_map6_request(client, nonce, protocol, internal_port, lifetime);
        let answer = from.run(move || -> Result<Vec<u8>> {
            let socket =
                UdpSocket::bind(SocketAddr::from((client, 0))).with_context(|| format!("binding to {client}"))?;
            socket.connect(SocketAddr::from((GW_LAN_IP6, NATPMP_PORT)))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send(&request)?;
            let mut buffer = [0u8; 1100];
            let n = socket.recv(&mut buffer).context("no PCP answer from the gateway")?;
            Ok(buffer[..n].to_vec())
        })?;
        parse_pcp_map6_reply(&answer).ok_or_else(|| anyhow!("not a PCP MAP answer: {answer:02x?}"))
    }
}

impl Netns {
    /// Writes a sysctl of this namespace (`key` as a path under /proc/sys, e.g.
    /// "net/ipv6/conf/all/forwarding"), from a thread that entered it: no process is started.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = std::path::Path::new("/proc/sys").join(key);
        let value = value.to_string();
        self.run(move || std::fs::write(&path, value).with_context(|| format!("writing {}", path.display())))
    }
}

fn parse_ip_addresses(ip_json: &str) -> Result<Vec<LabAddress6>> {
    let links: serde_json::Value = serde_json::from_str(ip_json).context("`ip -j` did not print JSON")?;
    let mut addresses = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        for info in link["addr_info"].as_array().into_iter().flatten() {
            let Some(address) = info["local"].as_str().and_then(|a| a.parse().ok()) else { continue };
            let flag = |name: &str| info[name].as_bool().unwrap_or(false);
            addresses.push(LabAddress6 {
                address,
                prefix_len: info["prefixlen"].as_u64().unwrap_or(128) as u8,
                temporary: flag("temporary"),
                deprecated: flag("deprecated"),
                tentative: flag("tentative"),
                mngtmpaddr: flag("mngtmpaddr"),
            });
        }
    }
    Ok(addresses)
}

/// eth0's interface index in the calling thread's namespace (for link-local destinations).
fn eth0_index() -> Result<u32> {
    // SAFETY: the name is a NUL-terminated literal.
    let index = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
    if index == 0 {
        bail!("no eth0 here: {}", std::io::Error::last_os_error());
    }
    Ok(index)
}

/// A TCP connection to `to`, from `source` if given (bound before connecting, which std cannot do),
/// failing after `timeout`.
fn tcp_connect_from(source: Option<Ipv6Addr>, to: SocketAddrV6, timeout: Duration) -> Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect_timeout(&SocketAddr::V6(to), timeout).with_context(|| format!("connecting to {to}"));
    };
    // SAFETY: socket(2) returns a new descriptor that nothing else owns; TcpStream takes it over (and
    // closes it on every error path below).
    let stream = unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("creating a TCP socket: {}", std::io::Error::last_os_error());
        }
        TcpStream::from_raw_fd(fd)
    };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let sockaddr = |a: SocketAddrV6| libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: a.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
        sin6_scope_id: a.scope_id(),
    };
    let len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    let local = sockaddr(SocketAddrV6::new(source, 0, 0, 0));
    // SAFETY: bind reads `len` bytes of a value that lives across the call.
    if unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in6).cast(), len) } != 0 {
        bail!("binding to {source}: {}", std::io::Error::last_os_error());
    }
    // connect(2) on a blocking socket gives up after SO_SNDTIMEO.
    stream.set_write_timeout(Some(timeout))?;
    let remote = sockaddr(to);
    // SAFETY: connect reads `len` bytes of a value that lives across the call.
    if unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_in6).cast(), len) } != 0 {
        bail!("connecting from {source} to {to}: {}", std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// From the WAN peer: opens a TCP connection straight to `addr` (a LAN host's own address: IPv6 has no
/// NAT) and `port`, sends `probe` and reads the answer. Without a pinhole the gateway drops the SYN
/// (TimedOut); through a pinhole to a port nobody listens on, the LAN host refuses (Refused).
pub fn tcp6_from_wan(lab: &Lab, addr: Ipv6Addr, port: u16, probe: &str) -> Reach {
    let probe = probe.to_string();
    lab.wan.run(move || crate::tcp_probe(SocketAddr::from((addr, port)), &probe))
}

/// From the WAN peer: sends a UDP datagram to `addr` and `port` from a fresh source port (a new
/// conntrack flow each time), and waits for the echo.
pub fn udp6_from_wan(lab: &Lab, addr: Ipv6Addr, port: u16, probe: &str) -> Reach {
    let probe = probe.to_string();
    lab.wan.run(move || crate::udp_probe(SocketAddr::from((addr, port)), &probe))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nft -j --debug=netlink list chain inet filter miniupnpd` as nftables 1.0.6 printed it in the
    /// lab for miniupnpd 2.3.1 holding: a UPnP pinhole (lan1 TCP 7001), an IPv4 forward rule (upnpc
    /// 8080, must be skipped), a UPnP pinhole restricted to a remote host and port, a PCP pinhole, and
    /// lan2's UPnP pinhole.
    const NFT_OUTPUT: &str = r#"inet filter miniupnpd 1971
  [ meta load iif => reg 1 ]
  [ cmp eq reg 1 0x00000005 ]
  [ payload load 2b @ transport header + 2 => reg 1 ]
  [ cmp eq reg 1 0x0000591b ]
  [ payload load 16b @ network header + 24 => reg 1 ]
  [ cmp eq reg 1 0xb80d0120 0x00007700 0x00000000 0x10000000 ]
  [ payload load 1b @ network header + 6 => reg 1 ]
  [ cmp eq reg 1 0x00000006 ]
  [ immediate reg 0 accept ]
  userdata = { pinhole-1 ts-44713: IGD2 pinhole }
inet filter miniupnpd 1973 1971
  [ meta load iif => reg 1 ]
  [ cmp eq reg 1 0x00000005 ]
  [ payload load 2b @ transport header + 2 => reg 1 ]
  [ cmp eq reg 1 0x0000901f ]
  [ payload load 4b @ network header + 16 => reg 1 ]
  [ cmp eq reg 1 0x0a4da8c0 ]
  [ payload load 1b @ network header + 9 => reg 1 ]
  [ cmp eq reg 1 0x00000006 ]
  [ immediate reg 0 accept ]
  userdata = { natbinder@lab }
inet filter miniupnpd 1974 1973
  [ meta load iif => reg 1 ]
  [ cmp eq reg 1 0x00000005 ]
  [ payload load 2b @ transport header + 2 => reg 1 ]
  [ cmp eq reg 1 0x0000651b ]
  [ payload load 2b @ transport header + 0 => reg 1 ]
  [ cmp eq reg 1 0x0000a00f ]
  [ payload load 16b @ network header + 24 => reg 1 ]
  [ cmp eq reg 1 0xb80d0120 0x00007700 0x00000000 0x10000000 ]
  [ payload load 16b @ network header + 8 => reg 1 ]
  [ cmp eq reg 1 0xb80d0120 0x00000100 0x00000000 0x00010000 ]
  [ payload load 1b @ network header + 6 => reg 1 ]
  [ cmp eq reg 1 0x00000011 ]
  [ immediate reg 0 accept ]
  userdata = { pinhole-2 ts-41713: IGD2 pinhole }
inet filter miniupnpd 1975 1974
  [ meta load iif => reg 1 ]
  [ cmp eq reg 1 0x00000005 ]
  [ payload load 2b @ transport header + 2 => reg 1 ]
  [ cmp eq reg 1 0x0000841c ]
  [ payload load 16b @ network header + 24 => reg 1 ]
  [ cmp eq reg 1 0xb80d0120 0x00007700 0x00000000 0x10000000 ]
  [ payload load 1b @ network header + 6 => reg 1 ]
  [ cmp eq reg 1 0x00000011 ]
  [ immediate reg 0 accept ]
  userdata = { pinhole-3 ts-44713: PCP MAP 04030201080706050c0b0a09 }
inet filter miniupnpd 1976 1975
  [ meta load iif => reg 1 ]
  [ cmp eq reg 1 0x00000005 ]
  [ payload load 2b @ transport header + 2 => reg 1 ]
  [ cmp eq reg 1 0x0000591b ]
  [ payload load 16b @ network header + 24 => reg 1 ]
  [ cmp eq reg 1 0xb80d0120 0x00007700 0x00000000 0x20000000 ]
  [ payload load 1b @ network header + 6 => reg 1 ]
  [ cmp eq reg 1 0x00000006 ]
  [ immediate reg 0 accept ]
  userdata = { pinhole-4 ts-44713:  }
{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"chain": {"family": "inet", "table": "filter", "name": "miniupnpd", "handle": 2}}, {"rule": {"family": "inet", "table": "filter", "chain": "miniupnpd", "handle": 1971, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "wan0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 7001}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 192, "len": 128}}, "right": "0x20010db8007700000000000000000010"}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 48, "len": 8}}, "right": 6}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "miniupnpd", "handle": 1973, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "wan0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 8080}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 128, "len": 32}}, "right": 3232255242}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 72, "len": 8}}, "right": 6}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "miniupnpd", "handle": 1974, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "wan0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 7013}}, {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "sport"}}, "right": 4000}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 192, "len": 128}}, "right": "0x20010db8007700000000000000000010"}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 64, "len": 128}}, "right": "0x20010db8000100000000000000000100"}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 48, "len": 8}}, "right": 17}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "miniupnpd", "handle": 1975, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "wan0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 7300}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 192, "len": 128}}, "right": "0x20010db8007700000000000000000010"}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 48, "len": 8}}, "right": 17}}, {"accept": null}]}}, {"rule": {"family": "inet", "table": "filter", "chain": "miniupnpd", "handle": 1976, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "wan0"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 7001}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 192, "len": 128}}, "right": "0x20010db8007700000000000000000020"}}, {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 48, "len": 8}}, "right": 6}}, {"accept": null}]}}]}
"#;

    fn pinhole(protocol: &str, client: Ipv6Addr, port: u16, id: u16, expiry: u64, description: &str) -> GatewayPinhole {
        GatewayPinhole {
            protocol: protocol.into(),
            internal_client: client,
            internal_port: port,
            remote_host: None,
            remote_port: None,
            unique_id: Some(id),
            expires_at: Some(expiry),
            description: description.into(),
        }
    }

    #[test]
    fn reads_pinholes_with_ids_from_nft_json_and_netlink_userdata() {
        let p = parse_nft_pinholes(NFT_OUTPUT).unwrap();
        assert_eq!(
            p,
            [
                pinhole("TCP", LAN1_IP6, 7001, 1, 44713, "IGD2 pinhole"),
                GatewayPinhole {
                    remote_host: Some(WAN_PEER_IP6),
                    remote_port: Some(4000),
                    ..pinhole("UDP", LAN1_IP6, 7013, 2, 41713, "IGD2 pinhole")
                },
                pinhole("UDP", LAN1_IP6, 7300, 3, 44713, "PCP MAP 04030201080706050c0b0a09"),
                pinhole("TCP", LAN2_IP6, 7001, 4, 44713, ""),
            ]
        );
    }

    #[test]
    fn reads_pinholes_from_json_alone_and_from_tlv_comments() {
        let json = &NFT_OUTPUT[NFT_OUTPUT.find("{\"nftables\"").unwrap()..];
        let p = parse_nft_pinholes(json).unwrap();
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|p| p.unique_id.is_none() && p.expires_at.is_none() && p.description.is_empty()));
        let commented = json.replacen("\"handle\": 1971,", "\"handle\": 1971, \"comment\": \"pinhole-9 ts-5: x\",", 1);
        let p = parse_nft_pinholes(&commented).unwrap();
        assert_eq!((p[0].unique_id, p[0].expires_at, p[0].description.as_str()), (Some(9), Some(5), "x"));
        assert!(parse_nft_pinholes("").is_err());
        assert!(parse_nft_pinholes("{\"nftables\": 3}").is_err());
    }

    #[test]
    fn parses_pinhole_labels() {
        assert_eq!(parse_pinhole_label("pinhole-12 ts-43629: IGD2 pinhole"), Some((12, 43629, "IGD2 pinhole".into())));
        assert_eq!(parse_pinhole_label("pinhole-5 ts-43629: "), Some((5, 43629, String::new())));
        assert_eq!(parse_pinhole_label("natbinder@lab"), None);
        assert_eq!(parse_pinhole_label("pinhole-x ts-1: y"), None);
    }

    #[test]
    fn builds_and_decodes_pcp_map() {
        let nonce = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        let request = pcp_map6_request(LAN1_IP6, nonce, 6, 7001, 3600);
        assert_eq!(request.len(), 60);
        assert_eq!(&request[..8], &[2, 1, 0, 0, 0, 0, 0x0e, 0x10]);
        assert_eq!(&request[40..44], &[0x1b, 0x59, 0x1b, 0x59]);
        // miniupnpd 2.3.1's answer to that request, as received in the lab.
        let hex = "0281000000000e100000000b0000000000000000000000000102030405060708090a0b0c\
                   060000001b591b5920010db8007700000000000000000010";
        let bytes: Vec<u8> =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        let reply = parse_pcp_map6_reply(&bytes).unwrap();
        assert_eq!(
            reply,
            PcpMap6Reply {
                result: 0,
                lifetime: 3600,
                epoch: 11,
                nonce,
                protocol: 6,
                internal_port: 7001,
                external_port: 7001,
                external_address: LAN1_IP6,
            }
        );
        assert!(parse_pcp_map6_reply(&bytes[..59]).is_none());
    }

    #[test]
    fn reads_soap_fields_and_errors() {
        let ok = PinholeSoapReply {
            status: 200,
            body: "<s:Body><u:AddPinholeResponse xmlns:u=\"x\"><UniqueID>3</UniqueID></u:AddPinholeResponse></s:Body>"
                .into(),
        };
        assert_eq!((ok.field("UniqueID").as_deref(), ok.error_code()), (Some("3"), None));
        let refused = PinholeSoapReply {
            status: 500,
            body: "<detail><UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>606</errorCode>\
                   <errorDescription>Action not authorized</errorDescription></UPnPError></detail>"
                .into(),
        };
        assert_eq!(refused.error_code(), Some(606));
    }

    #[test]
    fn parses_ip_json_addresses() {
        let json = r#"[{"ifindex":2,"ifname":"eth0","addr_info":[
            {"family":"inet6","local":"2001:db8:77:0:e029:8dd4:7947:5c4f","prefixlen":64,"scope":"global","temporary":true,"dynamic":true},
            {"family":"inet6","local":"2001:db8:77:0:a0c2:915a:2918:37d","prefixlen":64,"scope":"global","temporary":true,"deprecated":true},
            {"family":"inet6","local":"2001:db8:77::10","prefixlen":64,"scope":"global","nodad":true,"mngtmpaddr":true}]}]"#;
        let a = parse_ip_addresses(json).unwrap();
        assert_eq!(a.len(), 3);
        assert!(a[0].temporary && !a[0].deprecated);
        assert!(a[1].temporary && a[1].deprecated);
        assert_eq!((a[2].address, a[2].mngtmpaddr, a[2].temporary), (LAN1_IP6, true, false));
    }
}
