//! IPv6 firewall pinholes through UPnP IGDv2's WANIPv6FirewallControl:1 service: AddPinhole,
//! UpdatePinhole, DeletePinhole, GetFirewallStatus, GetOutboundPinholeTimeout, CheckPinholeWorking and
//! GetPinholePackets. As in [`super::igd_soap`], each action is a pure request builder, a pure bounded
//! parser that never panics (tested on recorded-style answers, fuzzed by `fuzz/fuzz_targets/pinhole_answers.rs`)
//! and a thin async call.
//!
//! Why not igd-next's `ipv6` feature: a gateway opens a pinhole only for the address the request comes
//! from (miniupnpd answers 606 otherwise), and a host has several IPv6 addresses (stable, temporary,
//! one per prefix), so every request must leave from the address it opens. igd-next's HTTP client
//! cannot choose its source address; the transport here binds a socket to it and speaks HTTP/1.1 over
//! it with hyper's connection-level client.
//!
//! The parsers reuse igd_soap's bounded SOAP reading (1 MiB, depth and element limits, no DTD) and
//! refuse values the service cannot send (a UniqueID above 65535, a boolean spelled "2", a number with a
//! sign): nothing is guessed.
use std::{
    fmt,
    net::{IpAddr, Ipv6Addr, SocketAddrV6},
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{
    body::{Body as _, Bytes, Incoming},
    client::conn::http1,
    header::{CONNECTION, CONTENT_TYPE, HOST},
    Request, Response, StatusCode, Uri,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

use super::{
    igd_soap::{
        build_soap_request, excerpt, parse_soap_response, SoapArguments, SoapError, SoapRequest, MAX_FIELD_BYTES,
        MAX_RESPONSE_BYTES,
    },
    AddError,
};
use crate::Protocol;

/// The service type: there is no other version of the service.
pub const WAN_IPV6_FIREWALL_CONTROL: &str = "urn:schemas-upnp-org:service:WANIPv6FirewallControl:1";
/// Shortest lease the service accepts (A_ARG_TYPE_LeaseTime is 1..=86400 s).
pub const MIN_PINHOLE_LEASE: Duration = Duration::from_secs(1);
/// Longest lease the service accepts: a pinhole is renewed with UpdatePinhole before it ends.
pub const MAX_PINHOLE_LEASE: Duration = Duration::from_secs(86_400);

const ADD_PINHOLE: &str = "AddPinhole";
const UPDATE_PINHOLE: &str = "UpdatePinhole";
const DELETE_PINHOLE: &str = "DeletePinhole";
const GET_FIREWALL_STATUS: &str = "GetFirewallStatus";
const GET_OUTBOUND_PINHOLE_TIMEOUT: &str = "GetOutboundPinholeTimeout";
const CHECK_PINHOLE_WORKING: &str = "CheckPinholeWorking";
const GET_PINHOLE_PACKETS: &str = "GetPinholePackets";

/// IANA protocol numbers, as the service's Protocol argument carries them.
const IANA_TCP: u16 = 6;
const IANA_UDP: u16 = 17;

// ---------------------------------------------------------------------------------------------------
// Errors

/// A UPnP error a WANIPv6FirewallControl:1 gateway answers, by its meaning in that service (the 7xx
/// codes mean other things in WANIPConnection: 708 is InvalidLayer2Address there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PinholeFault {
    /// 401: the gateway does not offer the action (it has no such service, or not this optional action).
    InvalidAction,
    /// 402: the gateway refused the arguments (miniupnpd: a lease outside 1..=86400 s, a bad UniqueID).
    InvalidArgs,
    /// 501: the gateway tried and failed (miniupnpd: its firewall backend refused the rule).
    ActionFailed,
    /// 606: the request did not come from the address being opened, or the gateway's policy forbids it
    /// (miniupnpd also refuses internal ports below 1024).
    ActionNotAuthorized,
    /// 701: no room for another pinhole.
    PinholeSpaceExhausted,
    /// 702: the gateway's IPv6 firewall is disabled, so it keeps no pinholes.
    FirewallDisabled,
    /// 703: the gateway does not let UPnP control points open inbound pinholes.
    InboundPinholeNotAllowed,
    /// 704: no pinhole has this UniqueID (it expired, was deleted, or the gateway restarted).
    NoSuchEntry,
    /// 705: the gateway does not filter this protocol.
    ProtocolNotSupported,
    /// 706: the internal port cannot be a wildcard.
    InternalPortWildcardingNotAllowed,
    /// 707: the protocol cannot be a wildcard.
    ProtocolWildcardingNotAllowed,
    /// 708 WildCardNotPermittedInSrcIP: the internal client (the host the pinhole opens to) cannot be a
    /// wildcard.
    WildcardNotPermittedInSrcIp,
    /// 709 NoTrafficReceived: no packet has gone through the pinhole yet, so the gateway cannot tell
    /// whether it works. Not a failure of the pinhole.
    NoTrafficReceived,
    /// A code the service does not define.
    Other(u16),
}

impl PinholeFault {
    pub fn from_code(code: u16) -> Self {
        match code {
            401 => Self::InvalidAction,
            402 => Self::InvalidArgs,
            501 => Self::ActionFailed,
            606 => Self::ActionNotAuthorized,
            701 => Self::PinholeSpaceExhausted,
            702 => Self::FirewallDisabled,
            703 => Self::InboundPinholeNotAllowed,
            704 => Self::NoSuchEntry,
            705 => Self::ProtocolNotSupported,
            706 => Self::InternalPortWildcardingNotAllowed,
            707 => Self::ProtocolWildcardingNotAllowed,
            708 => Self::WildcardNotPermittedInSrcIp,
            709 => Self::NoTrafficReceived,
            other => Self::Other(other),
        }
    }

    pub fn code(self) -> u16 {
        match self {
            Self::InvalidAction => 401,
            Self::InvalidArgs => 402,
            Self::ActionFailed => 501,
            Self::ActionNotAuthorized => 606,
            Self::PinholeSpaceExhausted => 701,
            Self::FirewallDisabled => 702,
            Self::InboundPinholeNotAllowed => 703,
            Self::NoSuchEntry => 704,
            Self::ProtocolNotSupported => 705,
            Self::InternalPortWildcardingNotAllowed => 706,
            Self::ProtocolWildcardingNotAllowed => 707,
            Self::WildcardNotPermittedInSrcIp => 708,
            Self::NoTrafficReceived => 709,
            Self::Other(code) => code,
        }
    }

    /// What the code means for natbinder, for error messages.
    pub fn meaning(self) -> &'static str {
        match self {
            Self::InvalidAction => "the gateway does not offer this action",
            Self::InvalidArgs => "the gateway refused the arguments",
            Self::ActionFailed => "the gateway failed to carry out the action",
            Self::ActionNotAuthorized => {
                "not authorized: the request must come from the address being opened, and miniupnpd also \
                 refuses ports below 1024"
            }
            Self::PinholeSpaceExhausted => "the gateway has no room for more pinholes",
            Self::FirewallDisabled => "the gateway's IPv6 firewall is disabled, so it keeps no pinholes",
            Self::InboundPinholeNotAllowed => "the gateway does not let UPnP open inbound pinholes",
            Self::NoSuchEntry => "no pinhole has this UniqueID (it expired, or the gateway restarted)",
            Self::ProtocolNotSupported => "the gateway does not support this protocol",
            Self::InternalPortWildcardingNotAllowed => "the internal port cannot be a wildcard",
            Self::ProtocolWildcardingNotAllowed => "the protocol cannot be a wildcard",
            Self::WildcardNotPermittedInSrcIp => "the internal client cannot be a wildcard",
            Self::NoTrafficReceived => "no traffic went through the pinhole yet, so the gateway cannot tell",
            Self::Other(_) => "a code WANIPv6FirewallControl:1 does not define",
        }
    }
}

/// Why a pinhole call did not produce an answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PinholeError {
    /// The gateway answered with a SOAP Fault carrying a UPnPError.
    #[error(
        "{action}: the gateway answered UPnP error {} {}: {}",
        .fault.code(),
        excerpt(.description),
        .fault.meaning()
    )]
    Upnp { action: &'static str, fault: PinholeFault, description: String },
    /// The gateway answered, but not with a usable SOAP message or HTTP answer. The reason names the action.
    #[error("malformed answer from the gateway: {0}")]
    Malformed(String),
    /// The gateway could not be reached from the source address (connection refused or reset, no
    /// answer in time): rediscover it (miniupnpd listens on another port after a restart).
    #[error("the gateway did not answer: {0}")]
    Unreachable(String),
    /// A socket could not be bound to the source address: it is not, or no longer, one of this host's
    /// (a temporary address that expired, a prefix that went away).
    #[error("cannot send from the address to open: {0}")]
    SourceUnusable(String),
    /// The request itself could not be formed (port 0, a control URL that does not point at the gateway).
    #[error("invalid pinhole request: {0}")]
    InvalidRequest(String),
}

impl PinholeError {
    /// The UPnP error the gateway answered, if that is what this is.
    pub fn fault(&self) -> Option<PinholeFault> {
        match self {
            Self::Upnp { fault, .. } => Some(*fault),
            _ => None,
        }
    }

    /// 704: the pinhole is not (or no longer) there; add it again.
    pub fn is_no_such_entry(&self) -> bool {
        self.fault() == Some(PinholeFault::NoSuchEntry)
    }

    /// 702: the gateway's IPv6 firewall is off.
    pub fn is_firewall_disabled(&self) -> bool {
        self.fault() == Some(PinholeFault::FirewallDisabled)
    }

    /// 703: the gateway's policy forbids UPnP pinholes.
    pub fn is_inbound_pinhole_not_allowed(&self) -> bool {
        self.fault() == Some(PinholeFault::InboundPinholeNotAllowed)
    }

    /// 606: sent from another address than the one opened, or forbidden by policy.
    pub fn is_not_authorized(&self) -> bool {
        self.fault() == Some(PinholeFault::ActionNotAuthorized)
    }

    /// 709 (CheckPinholeWorking): nothing went through yet; not a verdict on the pinhole.
    pub fn is_no_traffic_received(&self) -> bool {
        self.fault() == Some(PinholeFault::NoTrafficReceived)
    }

    /// The gateway will not open pinholes for anyone as it is configured now (702, 703), or does not offer
    /// the action (401): retrying soon is pointless; GetFirewallStatus tells when that changes.
    pub fn pinholes_unavailable(&self) -> bool {
        matches!(
            self.fault(),
            Some(PinholeFault::FirewallDisabled | PinholeFault::InboundPinholeNotAllowed | PinholeFault::InvalidAction)
        )
    }

    /// An error of igd_soap's SOAP reading, for `action`'s answer.
    fn from_soap(action: &'static str, error: SoapError) -> Self {
        match error {
            SoapError::Upnp { code, description } => {
                Self::Upnp { action, fault: PinholeFault::from_code(code), description }
            }
            SoapError::Malformed(reason) => Self::Malformed(format!("{action}: {reason}")),
            SoapError::Transport(reason) => Self::Unreachable(format!("{action}: {reason}")),
            SoapError::InvalidRequest(reason) => Self::InvalidRequest(format!("{action}: {reason}")),
        }
    }
}

/// For the reconciler: 606 and 701 have their own kinds, a gateway that cannot be reached from the
/// address (or an address that is gone) is Unreachable, every other refusal is Refused and names its code.
impl From<PinholeError> for AddError {
    fn from(error: PinholeError) -> Self {
        match error {
            PinholeError::Upnp { fault: PinholeFault::ActionNotAuthorized, .. } => {
                AddError::NotAuthorized(error.to_string())
            }
            PinholeError::Upnp { fault: PinholeFault::PinholeSpaceExhausted, .. } => {
                AddError::NoResources(error.to_string())
            }
            PinholeError::Unreachable(reason) => AddError::Unreachable(reason),
            PinholeError::SourceUnusable(_) => AddError::Unreachable(error.to_string()),
            other => AddError::Refused(other.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Where requests go, and from where

/// Where pinhole requests go and which address they leave from. Formed by [`PinholeEndpoint::new`],
/// which keeps the requests on the gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinholeEndpoint {
    source: Ipv6Addr,
    gateway: SocketAddrV6,
    control_path: String,
}

impl PinholeEndpoint {
    /// * `source`: the address requests leave from, which is also the address AddPinhole opens (the
    ///   gateway checks that they are the same).
    /// * `gateway`: the gateway's IPv6 address, with the port its description document was served on
    ///   (where a relative control URL points) and, for a link-local address, the LAN interface's index
    ///   as `scope_id`.
    /// * `description_host`: the address the description document was fetched from, usually the IPv4
    ///   gateway. An absolute control URL may name it or `gateway`'s address; its path (and port) is then
    ///   used on `gateway`. Any other host is refused: the description comes from a LAN device, which
    ///   must not send our requests elsewhere.
    /// * `control_url`: the WANIPv6FirewallControl service's controlURL from the description.
    pub fn new(
        source: Ipv6Addr,
        gateway: SocketAddrV6,
        description_host: IpAddr,
        control_url: &str,
    ) -> Result<Self, PinholeError> {
        let invalid =
            |why: String| PinholeError::InvalidRequest(format!("control URL {}: {why}", excerpt(control_url)));
        if source.is_unspecified() || source.is_multicast() || source.to_ipv4_mapped().is_some() {
            return Err(PinholeError::InvalidRequest(format!("{source} cannot be a pinhole's address")));
        }
        if source.is_unicast_link_local() && gateway.scope_id() == 0 {
            return Err(PinholeError::InvalidRequest(format!(
                "the link-local source {source} needs a link-local gateway with its interface as scope_id"
            )));
        }
        let gateway_ip = *gateway.ip();
        if gateway_ip.is_unspecified() || gateway_ip.is_multicast() || gateway_ip.to_ipv4_mapped().is_some() {
            return Err(PinholeError::InvalidRequest(format!("{gateway_ip} cannot be the gateway")));
        }
        if gateway_ip.is_unicast_link_local() && gateway.scope_id() == 0 {
            return Err(PinholeError::InvalidRequest(format!(
                "the link-local gateway {gateway_ip} needs its interface: give the interface index as scope_id"
            )));
        }
        let base = url::Url::parse(&format!("http://[{gateway_ip}]:{}/", gateway.port()))
            .map_err(|e| PinholeError::InvalidRequest(format!("gateway address {gateway}: {e}")))?;
        let url = base.join(control_url).map_err(|e| invalid(e.to_string()))?;
        if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() || url.fragment().is_some()
        {
            return Err(invalid("not a plain http URL".into()));
        }
        let host: IpAddr = match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.into(),
            Some(url::Host::Ipv6(ip)) => ip.into(),
            _ => return Err(invalid("the host is not an IP address".into())),
        };
        if host != IpAddr::V6(gateway_ip) && host != description_host {
            return Err(invalid(format!("points at {host}, not at the gateway ({gateway_ip} or {description_host})")));
        }
        let port =
            url.port_or_known_default().filter(|&port| port != 0).ok_or_else(|| invalid("no usable port".into()))?;
        let mut control_path = url.path().to_owned();
        if let Some(query) = url.query() {
            control_path.push('?');
            control_path.push_str(query);
        }
        // The path goes on the HTTP request line: it must be one hyper accepts, checked here rather than
        // at every call.
        control_path.parse::<Uri>().map_err(|e| invalid(format!("not usable as a request path: {e}")))?;
        Ok(Self { source, gateway: SocketAddrV6::new(gateway_ip, port, 0, gateway.scope_id()), control_path })
    }

    /// The address requests leave from and AddPinhole opens.
    pub fn source(&self) -> Ipv6Addr {
        self.source
    }

    /// Where requests go (port from the control URL, zone kept).
    pub fn gateway(&self) -> SocketAddrV6 {
        self.gateway
    }

    /// The path (and query) POSTed to.
    pub fn control_path(&self) -> &str {
        &self.control_path
    }

    /// The `Host:` header: the address without its zone. The zone names one of this host's interfaces,
    /// which means nothing to the gateway; a plain `[address]:port` is what a gateway checking Host reads.
    fn host_header(&self) -> String {
        format!("[{}]:{}", self.gateway.ip(), self.gateway.port())
    }

    /// The source with the zone a link-local address needs to be bound: the gateway's link.
    fn bind_address(&self) -> SocketAddrV6 {
        let scope_id = if self.source.is_unicast_link_local() { self.gateway.scope_id() } else { 0 };
        SocketAddrV6::new(self.source, 0, 0, scope_id)
    }
}

impl fmt::Display for PinholeEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{} from {}", self.gateway, self.control_path, self.source)
    }
}

// ---------------------------------------------------------------------------------------------------
// Request builders

/// AddPinhole: inbound `protocol` traffic from any remote host and port to `internal_client`'s
/// `internal_port`, for `lease` clamped to [`MIN_PINHOLE_LEASE`]..=[`MAX_PINHOLE_LEASE`].
pub fn build_add_pinhole_request(
    internal_client: Ipv6Addr,
    protocol: Protocol,
    internal_port: u16,
    lease: Duration,
) -> Result<SoapRequest, PinholeError> {
    check_internal_side(ADD_PINHOLE, internal_client, internal_port)?;
    build(
        ADD_PINHOLE,
        &[
            // Empty: any remote host; 0: any remote port.
            ("RemoteHost", String::new()),
            ("RemotePort", "0".to_owned()),
            ("InternalClient", internal_client.to_string()),
            ("InternalPort", internal_port.to_string()),
            ("Protocol", iana_protocol(protocol).to_string()),
            ("LeaseTime", lease_secs(lease).to_string()),
        ],
    )
}

/// UpdatePinhole: extends pinhole `unique_id` to `lease` from now (clamped like AddPinhole's).
pub fn build_update_pinhole_request(unique_id: u16, lease: Duration) -> Result<SoapRequest, PinholeError> {
    build(UPDATE_PINHOLE, &[("UniqueID", unique_id.to_string()), ("NewLeaseTime", lease_secs(lease).to_string())])
}

pub fn build_delete_pinhole_request(unique_id: u16) -> Result<SoapRequest, PinholeError> {
    build(DELETE_PINHOLE, &[("UniqueID", unique_id.to_string())])
}

pub fn build_get_firewall_status_request() -> Result<SoapRequest, PinholeError> {
    build(GET_FIREWALL_STATUS, &[])
}

/// GetOutboundPinholeTimeout: how long the gateway keeps an idle outbound `protocol` flow from
/// `internal_client`'s `internal_port` to anywhere open.
pub fn build_get_outbound_pinhole_timeout_request(
    internal_client: Ipv6Addr,
    protocol: Protocol,
    internal_port: u16,
) -> Result<SoapRequest, PinholeError> {
    check_internal_side(GET_OUTBOUND_PINHOLE_TIMEOUT, internal_client, internal_port)?;
    build(
        GET_OUTBOUND_PINHOLE_TIMEOUT,
        &[
            ("RemoteHost", String::new()),
            ("RemotePort", "0".to_owned()),
            ("InternalClient", internal_client.to_string()),
            ("InternalPort", internal_port.to_string()),
            ("Protocol", iana_protocol(protocol).to_string()),
        ],
    )
}

pub fn build_check_pinhole_working_request(unique_id: u16) -> Result<SoapRequest, PinholeError> {
    build(CHECK_PINHOLE_WORKING, &[("UniqueID", unique_id.to_string())])
}

pub fn build_get_pinhole_packets_request(unique_id: u16) -> Result<SoapRequest, PinholeError> {
    build(GET_PINHOLE_PACKETS, &[("UniqueID", unique_id.to_string())])
}

fn build(action: &'static str, arguments: &[(&str, String)]) -> Result<SoapRequest, PinholeError> {
    build_soap_request(WAN_IPV6_FIREWALL_CONTROL, action, arguments).map_err(|e| PinholeError::from_soap(action, e))
}

/// Wildcards are what the service calls port 0 and an empty client; natbinder opens one port of one
/// address, never "any".
fn check_internal_side(action: &str, internal_client: Ipv6Addr, internal_port: u16) -> Result<(), PinholeError> {
    if internal_port == 0 {
        return Err(PinholeError::InvalidRequest(format!("{action}: internal port 0 is a wildcard, not a port")));
    }
    if internal_client.is_unspecified() || internal_client.is_multicast() {
        return Err(PinholeError::InvalidRequest(format!("{action}: {internal_client} is not a host's address")));
    }
    Ok(())
}

fn iana_protocol(protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Tcp => IANA_TCP,
        Protocol::Udp => IANA_UDP,
    }
}

fn lease_secs(lease: Duration) -> u64 {
    lease.clamp(MIN_PINHOLE_LEASE, MAX_PINHOLE_LEASE).as_secs()
}

// ---------------------------------------------------------------------------------------------------
// Response parsers

/// What GetFirewallStatus tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirewallStatus {
    /// Whether the gateway filters inbound IPv6 at all.
    pub firewall_enabled: bool,
    /// Whether UPnP control points may open pinholes in it.
    pub inbound_pinhole_allowed: bool,
}

/// AddPinhole's answer: the pinhole's UniqueID (UpdatePinhole, DeletePinhole and the checks name it).
pub fn parse_add_pinhole_response(body: &str) -> Result<u16, PinholeError> {
    let arguments = answer_arguments(body, ADD_PINHOLE)?;
    parse_number(required(&arguments, "UniqueID", ADD_PINHOLE)?, "UniqueID", ADD_PINHOLE)
}

/// UpdatePinhole's answer carries nothing; 704 (the pinhole is gone) stays an error: add it again.
pub fn parse_update_pinhole_response(body: &str) -> Result<(), PinholeError> {
    answer_arguments(body, UPDATE_PINHOLE).map(drop)
}

/// DeletePinhole's answer carries nothing. 704 NoSuchEntry is success: deleting what is not there is
/// what was asked for.
pub fn parse_delete_pinhole_response(body: &str) -> Result<(), PinholeError> {
    match answer_arguments(body, DELETE_PINHOLE) {
        Ok(_) => Ok(()),
        Err(error) if error.is_no_such_entry() => Ok(()),
        Err(error) => Err(error),
    }
}

pub fn parse_get_firewall_status_response(body: &str) -> Result<FirewallStatus, PinholeError> {
    let arguments = answer_arguments(body, GET_FIREWALL_STATUS)?;
    let flag = |name| parse_boolean(required(&arguments, name, GET_FIREWALL_STATUS)?, name, GET_FIREWALL_STATUS);
    Ok(FirewallStatus {
        firewall_enabled: flag("FirewallEnabled")?,
        inbound_pinhole_allowed: flag("InboundPinholeAllowed")?,
    })
}

/// GetOutboundPinholeTimeout's answer: how long an idle outbound flow stays open.
pub fn parse_get_outbound_pinhole_timeout_response(body: &str) -> Result<Duration, PinholeError> {
    let arguments = answer_arguments(body, GET_OUTBOUND_PINHOLE_TIMEOUT)?;
    let seconds: u32 = parse_number(
        required(&arguments, "OutboundPinholeTimeout", GET_OUTBOUND_PINHOLE_TIMEOUT)?,
        "OutboundPinholeTimeout",
        GET_OUTBOUND_PINHOLE_TIMEOUT,
    )?;
    Ok(Duration::from_secs(seconds.into()))
}

/// CheckPinholeWorking's IsWorking. A gateway that saw no traffic yet answers 709 instead
/// ([`PinholeError::is_no_traffic_received`]): no verdict either way.
pub fn parse_check_pinhole_working_response(body: &str) -> Result<bool, PinholeError> {
    let arguments = answer_arguments(body, CHECK_PINHOLE_WORKING)?;
    parse_boolean(required(&arguments, "IsWorking", CHECK_PINHOLE_WORKING)?, "IsWorking", CHECK_PINHOLE_WORKING)
}

/// GetPinholePackets' count of packets that went through the pinhole.
pub fn parse_get_pinhole_packets_response(body: &str) -> Result<u32, PinholeError> {
    let arguments = answer_arguments(body, GET_PINHOLE_PACKETS)?;
    parse_number(required(&arguments, "PinholePackets", GET_PINHOLE_PACKETS)?, "PinholePackets", GET_PINHOLE_PACKETS)
}

fn answer_arguments(body: &str, action: &'static str) -> Result<SoapArguments, PinholeError> {
    parse_soap_response(body, action).map_err(|e| PinholeError::from_soap(action, e))
}

fn required<'a>(arguments: &'a SoapArguments, name: &str, action: &str) -> Result<&'a str, PinholeError> {
    arguments.get(name).ok_or_else(|| PinholeError::Malformed(format!("{action}: {name} is missing")))
}

/// Gateways pad values with whitespace; anything longer than a field can be is refused before reading.
fn bounded<'a>(text: &'a str, field: &str, action: &str) -> Result<&'a str, PinholeError> {
    if text.len() > MAX_FIELD_BYTES {
        return Err(PinholeError::Malformed(format!(
            "{action}: {field} of {} bytes, more than {MAX_FIELD_BYTES}",
            text.len()
        )));
    }
    Ok(text.trim())
}

/// UPnP's unsigned types (ui2, ui4) are decimal digits without a sign; a value out of the type's range
/// is malformed, not truncated.
fn parse_number<T: std::str::FromStr>(text: &str, field: &str, action: &str) -> Result<T, PinholeError> {
    let digits = bounded(text, field, action)?;
    let number =
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) { digits.parse().ok() } else { None };
    number.ok_or_else(|| {
        PinholeError::Malformed(format!(
            "{action}: {field} {} is not a number in the range of {}",
            excerpt(text),
            std::any::type_name::<T>()
        ))
    })
}

/// UPnP booleans: 0/1, false/true, no/yes (UDA 2.0, 2.5), the words in any case.
fn parse_boolean(text: &str, field: &str, action: &str) -> Result<bool, PinholeError> {
    let text = bounded(text, field, action)?;
    if text == "1" || text.eq_ignore_ascii_case("true") || text.eq_ignore_ascii_case("yes") {
        Ok(true)
    } else if text == "0" || text.eq_ignore_ascii_case("false") || text.eq_ignore_ascii_case("no") {
        Ok(false)
    } else {
        Err(PinholeError::Malformed(format!("{action}: {field} {} is not a boolean", excerpt(text))))
    }
}

// ---------------------------------------------------------------------------------------------------
// Calls

/// Opens `protocol` `port` on the endpoint's source address to any remote host, for `lease` (clamped to
/// 1 s..=1 day: renew with [`update_pinhole`]). Returns the pinhole's UniqueID.
pub async fn add_pinhole(
    endpoint: &PinholeEndpoint,
    protocol: Protocol,
    port: u16,
    lease: Duration,
    timeout: Duration,
) -> Result<u16, PinholeError> {
    let request = build_add_pinhole_request(endpoint.source, protocol, port, lease)?;
    call(endpoint, ADD_PINHOLE, &request, timeout, parse_add_pinhole_response).await
}

/// Extends pinhole `unique_id` to `lease` from now. A 704 error ([`PinholeError::is_no_such_entry`])
/// means it is gone: add it again.
pub async fn update_pinhole(
    endpoint: &PinholeEndpoint,
    unique_id: u16,
    lease: Duration,
    timeout: Duration,
) -> Result<(), PinholeError> {
    let request = build_update_pinhole_request(unique_id, lease)?;
    call(endpoint, UPDATE_PINHOLE, &request, timeout, parse_update_pinhole_response).await
}

/// Closes pinhole `unique_id`; success too when it is not there (704).
pub async fn delete_pinhole(endpoint: &PinholeEndpoint, unique_id: u16, timeout: Duration) -> Result<(), PinholeError> {
    let request = build_delete_pinhole_request(unique_id)?;
    call(endpoint, DELETE_PINHOLE, &request, timeout, parse_delete_pinhole_response).await
}

pub async fn get_firewall_status(
    endpoint: &PinholeEndpoint,
    timeout: Duration,
) -> Result<FirewallStatus, PinholeError> {
    let request = build_get_firewall_status_request()?;
    call(endpoint, GET_FIREWALL_STATUS, &request, timeout, parse_get_firewall_status_response).await
}

/// How long the gateway keeps an idle outbound `protocol` flow from the source's `port` open. An optional
/// action: miniupnpd answers 501.
pub async fn get_outbound_pinhole_timeout(
    endpoint: &PinholeEndpoint,
    protocol: Protocol,
    port: u16,
    timeout: Duration,
) -> Result<Duration, PinholeError> {
    let request = build_get_outbound_pinhole_timeout_request(endpoint.source, protocol, port)?;
    call(endpoint, GET_OUTBOUND_PINHOLE_TIMEOUT, &request, timeout, parse_get_outbound_pinhole_timeout_response).await
}

/// Whether traffic went through pinhole `unique_id`. 709 ([`PinholeError::is_no_traffic_received`]):
/// none yet, which says nothing about the pinhole.
pub async fn check_pinhole_working(
    endpoint: &PinholeEndpoint,
    unique_id: u16,
    timeout: Duration,
) -> Result<bool, PinholeError> {
    let request = build_check_pinhole_working_request(unique_id)?;
    call(endpoint, CHECK_PINHOLE_WORKING, &request, timeout, parse_check_pinhole_working_response).await
}

pub async fn get_pinhole_packets(
    endpoint: &PinholeEndpoint,
    unique_id: u16,
    timeout: Duration,
) -> Result<u32, PinholeError> {
    let request = build_get_pinhole_packets_request(unique_id)?;
    call(endpoint, GET_PINHOLE_PACKETS, &request, timeout, parse_get_pinhole_packets_response).await
}

/// Sends `request` and parses the answer, whatever its HTTP status: SOAP Faults come with 500. When the
/// body is not a SOAP answer, the status (a 404 page, a 403 from a Host check) is the better clue.
async fn call<T>(
    endpoint: &PinholeEndpoint,
    action: &'static str,
    request: &SoapRequest,
    timeout: Duration,
    parse: fn(&str) -> Result<T, PinholeError>,
) -> Result<T, PinholeError> {
    let (status, body) = match tokio::time::timeout(timeout, exchange(endpoint, action, request)).await {
        Ok(answer) => answer?,
        Err(_elapsed) => {
            return Err(PinholeError::Unreachable(format!("{action} to {endpoint}: no answer within {timeout:?}")))
        }
    };
    match parse(&body) {
        Err(PinholeError::Malformed(reason))
            if !(status.is_success() || status == StatusCode::INTERNAL_SERVER_ERROR) =>
        {
            Err(PinholeError::Malformed(format!("{reason} (HTTP status {status})")))
        }
        parsed => parsed,
    }
}

/// One HTTP/1.1 exchange on a connection of its own, from the endpoint's source address. Unbounded in
/// time: [`call`] bounds it, and dropping it closes the connection.
async fn exchange(
    endpoint: &PinholeEndpoint,
    action: &'static str,
    request: &SoapRequest,
) -> Result<(StatusCode, String), PinholeError> {
    let what = format!("{action} to {endpoint}");
    let unreachable =
        |step: &str, error: &dyn fmt::Display| PinholeError::Unreachable(format!("{what}: {step}: {error}"));
    let socket = TcpSocket::new_v6().map_err(|e| unreachable("opening an IPv6 TCP socket", &e))?;
    socket.bind(endpoint.bind_address().into()).map_err(|e| {
        PinholeError::SourceUnusable(format!(
            "{what}: binding to {} failed: {e}; it must be a current address of this host (a temporary \
             address may have expired): open pinholes for the addresses the LAN interface has now",
            endpoint.source
        ))
    })?;
    let stream = socket.connect(endpoint.gateway.into()).await.map_err(|e| unreachable("connecting", &e))?;
    let (mut sender, connection) =
        http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await.map_err(|e| hyper_failure(&what, e))?;
    let http_request = Request::post(endpoint.control_path.as_str())
        .header(HOST, endpoint.host_header())
        .header(CONTENT_TYPE, "text/xml; charset=\"utf-8\"")
        .header("SOAPAction", request.soap_action.as_str())
        // One request per connection: nothing is left open on the gateway.
        .header(CONNECTION, "close")
        .body(Full::new(Bytes::from(request.body.clone())))
        .map_err(|e| PinholeError::InvalidRequest(format!("{what}: {e}")))?;
    let answer = async {
        let response = sender.send_request(http_request).await.map_err(|e| hyper_failure(&what, e))?;
        read_answer(response, &what).await
    };
    let mut answer = std::pin::pin!(answer);
    let mut connection = std::pin::pin!(connection);
    // The connection must be driven for the answer to arrive. If it ends first, the answer has either
    // been received already (and is read from hyper's buffer) or fails with the connection's error.
    tokio::select! {
        answer = &mut answer => answer,
        _ended = &mut connection => answer.await,
    }
}

/// The body, refused when over [`MAX_RESPONSE_BYTES`] (before reading when the length is announced).
async fn read_answer(response: Response<Incoming>, what: &str) -> Result<(StatusCode, String), PinholeError> {
    let status = response.status();
    let mut body = response.into_body();
    let too_big =
        || PinholeError::Malformed(format!("{what}: the answer is over the {MAX_RESPONSE_BYTES} bytes accepted"));
    if body.size_hint().lower() > MAX_RESPONSE_BYTES as u64 {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| hyper_failure(what, e))?;
        if let Ok(data) = frame.into_data() {
            if data.len() > MAX_RESPONSE_BYTES - bytes.len() {
                return Err(too_big());
            }
            bytes.extend_from_slice(&data);
        }
    }
    let body = String::from_utf8(bytes)
        .map_err(|e| PinholeError::Malformed(format!("{what}: the answer is not UTF-8 ({e})")))?;
    Ok((status, body))
}

/// An answer that is not HTTP is malformed; a connection that fails or closes early is unreachable.
fn hyper_failure(what: &str, error: hyper::Error) -> PinholeError {
    if error.is_parse() || error.is_parse_status() {
        PinholeError::Malformed(format!("{what}: the answer is not valid HTTP: {error}"))
    } else {
        PinholeError::Unreachable(format!("{what}: the HTTP exchange failed: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddr},
        time::Instant,
    };

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        task::JoinHandle,
    };

    use super::*;

    /// A global address of this host, as AddPinhole's InternalClient (documentation prefix).
    const HOST_ADDRESS: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x20);
    const IPV4_GATEWAY: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 1));
    const ROUTER_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    const SECOND: Duration = Duration::from_secs(1);

    /// The envelope miniupnpd 2.3 wraps every answer in (upnpsoap.c BuildSendAndCloseSoapResp).
    fn miniupnpd_envelope(body_content: &str) -> String {
        format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>{body_content}</s:Body></s:Envelope>\r\n"
        )
    }

    /// miniupnpd's answer to a WANIPv6FirewallControl action: each argument on its own line.
    fn miniupnpd_answer(action: &str, arguments: &str) -> String {
        miniupnpd_envelope(&format!(
            "<u:{action}Response xmlns:u=\"{WAN_IPV6_FIREWALL_CONTROL}\">\r\n{arguments}</u:{action}Response>\r\n"
        ))
    }

    /// miniupnpd's SoapError(), sent with HTTP 500.
    fn miniupnpd_fault(code: u16, description: &str) -> String {
        format!(
            "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><s:Fault>\
             <faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>\
             <UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>{code}</errorCode>\
             <errorDescription>{description}</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>\r\n"
        )
    }

    fn add_answer(unique_id: &str) -> String {
        miniupnpd_answer("AddPinhole", &format!("<UniqueID>{unique_id}</UniqueID>\r\n"))
    }

    fn firewall_status_answer(enabled: &str, allowed: &str) -> String {
        miniupnpd_answer(
            "GetFirewallStatus",
            &format!(
                "<FirewallEnabled>{enabled}</FirewallEnabled>\r\n\
                 <InboundPinholeAllowed>{allowed}</InboundPinholeAllowed>\r\n"
            ),
        )
    }

    fn assert_malformed<T: fmt::Debug>(result: Result<T, PinholeError>, mentioning: &str) {
        match result {
            Err(PinholeError::Malformed(reason)) => {
                assert!(reason.contains(mentioning), "the reason {reason:?} should mention {mentioning:?}")
            }
            other => panic!("expected Malformed mentioning {mentioning:?}, got {other:?}"),
        }
    }

    // --- Request builders

    /// What miniupnpc and our own builder send: the envelope around `<u:{action}>`.
    fn request_envelope(action: &str, arguments: &str) -> String {
        format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
             <u:{action} xmlns:u=\"urn:schemas-upnp-org:service:WANIPv6FirewallControl:1\">{arguments}</u:{action}>\
             </s:Body></s:Envelope>\r\n"
        )
    }

    #[test]
    fn add_pinhole_opens_one_port_of_one_address_to_any_remote_host() {
        let request = build_add_pinhole_request(HOST_ADDRESS, Protocol::Tcp, 8080, Duration::from_secs(3600)).unwrap();
        assert_eq!(request.soap_action, "\"urn:schemas-upnp-org:service:WANIPv6FirewallControl:1#AddPinhole\"");
        assert_eq!(
            request.body,
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>\
             <u:AddPinhole xmlns:u=\"urn:schemas-upnp-org:service:WANIPv6FirewallControl:1\">\
             <RemoteHost></RemoteHost><RemotePort>0</RemotePort><InternalClient>2001:db8:1::20</InternalClient>\
             <InternalPort>8080</InternalPort><Protocol>6</Protocol><LeaseTime>3600</LeaseTime>\
             </u:AddPinhole></s:Body></s:Envelope>\r\n"
        );
        let udp = build_add_pinhole_request(HOST_ADDRESS, Protocol::Udp, 51413, Duration::from_secs(60)).unwrap();
        assert!(udp
            .body
            .contains("<InternalPort>51413</InternalPort><Protocol>17</Protocol><LeaseTime>60</LeaseTime>"));
    }

    #[test]
    fn leases_are_clamped_to_what_the_service_accepts() {
        for (lease, sent) in [
            (Duration::ZERO, "1"),
            (Duration::from_millis(500), "1"),
            (Duration::from_millis(1999), "1"),
            (Duration::from_secs(86_400), "86400"),
            (Duration::from_secs(604_800), "86400"),
            (Duration::MAX, "86400"),
        ] {
            let add = build_add_pinhole_request(HOST_ADDRESS, Protocol::Tcp, 8080, lease).unwrap();
            assert!(add.body.contains(&format!("<LeaseTime>{sent}</LeaseTime>")), "{lease:?}: {}", add.body);
            let update = build_update_pinhole_request(9, lease).unwrap();
            assert!(update.body.contains(&format!("<NewLeaseTime>{sent}</NewLeaseTime>")), "{lease:?}");
        }
    }

    #[test]
    fn wildcards_are_never_asked_for() {
        let refused = [
            build_add_pinhole_request(HOST_ADDRESS, Protocol::Tcp, 0, SECOND),
            build_add_pinhole_request(Ipv6Addr::UNSPECIFIED, Protocol::Tcp, 8080, SECOND),
            build_add_pinhole_request("ff02::1".parse().unwrap(), Protocol::Udp, 8080, SECOND),
            build_get_outbound_pinhole_timeout_request(HOST_ADDRESS, Protocol::Tcp, 0),
        ];
        for result in refused {
            assert!(matches!(result, Err(PinholeError::InvalidRequest(_))), "{result:?}");
        }
    }

    #[test]
    fn the_other_requests_are_the_exact_envelopes() {
        let cases = [
            (
                build_update_pinhole_request(513, Duration::from_secs(7200)).unwrap(),
                "UpdatePinhole",
                "<UniqueID>513</UniqueID><NewLeaseTime>7200</NewLeaseTime>",
            ),
            (build_delete_pinhole_request(65535).unwrap(), "DeletePinhole", "<UniqueID>65535</UniqueID>"),
            (build_get_firewall_status_request().unwrap(), "GetFirewallStatus", ""),
            (
                build_get_outbound_pinhole_timeout_request(HOST_ADDRESS, Protocol::Udp, 3478).unwrap(),
                "GetOutboundPinholeTimeout",
                "<RemoteHost></RemoteHost><RemotePort>0</RemotePort><InternalClient>2001:db8:1::20</InternalClient>\
                 <InternalPort>3478</InternalPort><Protocol>17</Protocol>",
            ),
            (build_check_pinhole_working_request(0).unwrap(), "CheckPinholeWorking", "<UniqueID>0</UniqueID>"),
            (build_get_pinhole_packets_request(7).unwrap(), "GetPinholePackets", "<UniqueID>7</UniqueID>"),
        ];
        for (request, action, arguments) in cases {
            assert_eq!(request.soap_action, format!("\"{WAN_IPV6_FIREWALL_CONTROL}#{action}\""));
            assert_eq!(request.body, request_envelope(action, arguments), "{action}");
        }
    }

    // --- Answers

    #[test]
    fn add_pinhole_answers_the_unique_id() {
        assert_eq!(parse_add_pinhole_response(&add_answer("7")), Ok(7));
        assert_eq!(parse_add_pinhole_response(&add_answer("0")), Ok(0));
        assert_eq!(parse_add_pinhole_response(&add_answer(" 65535\n")), Ok(65535));
    }

    #[test]
    fn impossible_unique_ids_are_malformed_not_guessed() {
        for bad in ["", " ", "-1", "+5", "65536", "0x10", "1.0", "seven", "4294967303"] {
            assert_malformed(parse_add_pinhole_response(&add_answer(bad)), "UniqueID");
        }
        let oversize = format!("{}1", "0".repeat(MAX_FIELD_BYTES));
        assert_malformed(parse_add_pinhole_response(&add_answer(&oversize)), "UniqueID of 1025 bytes");
        assert_malformed(parse_add_pinhole_response(&miniupnpd_answer("AddPinhole", "")), "UniqueID is missing");
        let twice = miniupnpd_answer("AddPinhole", "<UniqueID>1</UniqueID><UniqueID>2</UniqueID>");
        assert_malformed(parse_add_pinhole_response(&twice), "appears twice");
    }

    /// Every code the service defines, with miniupnpd's descriptions (spelling mistakes included).
    const FAULTS: [(u16, &str, PinholeFault); 13] = [
        (401, "Invalid Action", PinholeFault::InvalidAction),
        (402, "Invalid Args", PinholeFault::InvalidArgs),
        (501, "Action Failed", PinholeFault::ActionFailed),
        (606, "Action not authorized", PinholeFault::ActionNotAuthorized),
        (701, "PinholeSpaceExhausted", PinholeFault::PinholeSpaceExhausted),
        (702, "FirewallDisabled", PinholeFault::FirewallDisabled),
        (703, "InboundPinholeNotAllowed", PinholeFault::InboundPinholeNotAllowed),
        (704, "NoSuchEntry", PinholeFault::NoSuchEntry),
        (705, "ProtocolNotSupported", PinholeFault::ProtocolNotSupported),
        (706, "InternalPortWilcardingNotAllowed", PinholeFault::InternalPortWildcardingNotAllowed),
        (707, "ProtocolWilcardingNotAllowed", PinholeFault::ProtocolWildcardingNotAllowed),
        (708, "WildCardNotPermittedInSrcIP", PinholeFault::WildcardNotPermittedInSrcIp),
        (709, "NoTrafficReceived", PinholeFault::NoTrafficReceived),
    ];

    #[test]
    fn each_fault_code_keeps_its_meaning_and_description() {
        for (code, description, fault) in FAULTS {
            assert_eq!(PinholeFault::from_code(code), fault);
            assert_eq!(fault.code(), code);
            let error = parse_add_pinhole_response(&miniupnpd_fault(code, description)).unwrap_err();
            assert_eq!(error, PinholeError::Upnp { action: "AddPinhole", fault, description: description.into() });
            let message = error.to_string();
            assert!(message.starts_with(&format!("AddPinhole: the gateway answered UPnP error {code} ")), "{message}");
            assert!(message.contains(fault.meaning()), "{message}");
            assert_eq!(error.is_no_such_entry(), code == 704);
            assert_eq!(error.is_firewall_disabled(), code == 702);
            assert_eq!(error.is_inbound_pinhole_not_allowed(), code == 703);
            assert_eq!(error.is_not_authorized(), code == 606);
            assert_eq!(error.is_no_traffic_received(), code == 709);
            assert_eq!(error.pinholes_unavailable(), matches!(code, 401 | 702 | 703));
        }
        let unknown = parse_add_pinhole_response(&miniupnpd_fault(799, "Vendor")).unwrap_err();
        assert_eq!(unknown.fault(), Some(PinholeFault::Other(799)));
        assert!(unknown.to_string().contains("UPnP error 799"), "{unknown}");
    }

    #[test]
    fn update_answers_nothing_and_704_means_add_it_again() {
        assert_eq!(parse_update_pinhole_response(&miniupnpd_answer("UpdatePinhole", "")), Ok(()));
        let gone = parse_update_pinhole_response(&miniupnpd_fault(704, "NoSuchEntry")).unwrap_err();
        assert!(gone.is_no_such_entry(), "{gone:?}");
        assert_eq!(gone.fault(), Some(PinholeFault::NoSuchEntry));
    }

    #[test]
    fn deleting_what_is_not_there_is_success() {
        assert_eq!(parse_delete_pinhole_response(&miniupnpd_answer("DeletePinhole", "")), Ok(()));
        assert_eq!(parse_delete_pinhole_response(&miniupnpd_fault(704, "NoSuchEntry")), Ok(()));
        let refused = parse_delete_pinhole_response(&miniupnpd_fault(606, "Action not authorized"));
        assert!(refused.as_ref().is_err_and(PinholeError::is_not_authorized), "{refused:?}");
    }

    #[test]
    fn firewall_status_reads_every_boolean_spelling() {
        for (enabled, allowed, expected) in [
            ("1", "1", (true, true)),
            ("1", "0", (true, false)),
            ("0", "1", (false, true)),
            ("TRUE", "no", (true, false)),
            (" yes ", "False", (true, false)),
            ("false", "Yes", (false, true)),
        ] {
            let status = parse_get_firewall_status_response(&firewall_status_answer(enabled, allowed)).unwrap();
            assert_eq!((status.firewall_enabled, status.inbound_pinhole_allowed), expected, "{enabled} {allowed}");
        }
        for bad in ["2", "", "on", "-1", "tru"] {
            assert_malformed(parse_get_firewall_status_response(&firewall_status_answer(bad, "1")), "FirewallEnabled");
            assert_malformed(
                parse_get_firewall_status_response(&firewall_status_answer("1", bad)),
                "InboundPinholeAllowed",
            );
        }
        let only_one = miniupnpd_answer("GetFirewallStatus", "<FirewallEnabled>1</FirewallEnabled>");
        assert_malformed(parse_get_firewall_status_response(&only_one), "InboundPinholeAllowed is missing");
    }

    #[test]
    fn check_pinhole_working_is_a_verdict_or_no_traffic_yet() {
        let working = |value: &str| {
            parse_check_pinhole_working_response(&miniupnpd_answer(
                "CheckPinholeWorking",
                &format!("<IsWorking>{value}</IsWorking>\r\n"),
            ))
        };
        assert_eq!(working("1"), Ok(true));
        assert_eq!(working("0"), Ok(false));
        assert_eq!(working("true"), Ok(true));
        assert_malformed(working("maybe"), "IsWorking \"maybe\" is not a boolean");
        let no_traffic = parse_check_pinhole_working_response(&miniupnpd_fault(709, "NoTrafficReceived")).unwrap_err();
        assert!(no_traffic.is_no_traffic_received() && !no_traffic.is_no_such_entry(), "{no_traffic:?}");
    }

    #[test]
    fn packet_counts_and_timeouts_are_unsigned_32_bit() {
        let packets = |value: &str| {
            parse_get_pinhole_packets_response(&miniupnpd_answer(
                "GetPinholePackets",
                &format!("<PinholePackets>{value}</PinholePackets>\r\n"),
            ))
        };
        assert_eq!(packets("0"), Ok(0));
        assert_eq!(packets("4294967295"), Ok(u32::MAX));
        for bad in ["4294967296", "-1", "", "1e3"] {
            assert_malformed(packets(bad), "PinholePackets");
        }
        let timeout = |value: &str| {
            parse_get_outbound_pinhole_timeout_response(&miniupnpd_answer(
                "GetOutboundPinholeTimeout",
                &format!("<OutboundPinholeTimeout>{value}</OutboundPinholeTimeout>\r\n"),
            ))
        };
        assert_eq!(timeout("120"), Ok(Duration::from_secs(120)));
        assert_malformed(timeout("4294967296"), "OutboundPinholeTimeout");
    }

    #[test]
    fn another_actions_answer_is_malformed() {
        assert_malformed(
            parse_update_pinhole_response(&add_answer("3")),
            "UpdatePinhole: the SOAP Body holds neither UpdatePinholeResponse nor a Fault",
        );
        assert_malformed(parse_delete_pinhole_response(&add_answer("3")), "neither DeletePinholeResponse");
    }

    #[test]
    fn garbage_dtds_and_oversize_answers_are_refused() {
        for garbage in ["", "not xml", "<html><body>404</body></html>", "<a></b>"] {
            assert!(matches!(parse_add_pinhole_response(garbage), Err(PinholeError::Malformed(_))), "{garbage:?}");
            assert!(matches!(parse_delete_pinhole_response(garbage), Err(PinholeError::Malformed(_))));
        }
        let laughs = "<?xml version=\"1.0\"?><!DOCTYPE Envelope [<!ENTITY a \"aaaaaaaaaa\">\
            <!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;\">]>\
            <Envelope><Body><AddPinholeResponse><UniqueID>&b;</UniqueID></AddPinholeResponse></Body></Envelope>";
        assert_malformed(parse_add_pinhole_response(laughs), "DTD");
        let huge = miniupnpd_answer("AddPinhole", &format!("<UniqueID>1</UniqueID>{}", " ".repeat(MAX_RESPONSE_BYTES)));
        assert_malformed(parse_add_pinhole_response(&huge), "more than the 1048576 accepted");
    }

    #[test]
    fn every_truncation_of_an_answer_is_an_error() {
        let answers = [
            add_answer("7"),
            firewall_status_answer("1", "1"),
            miniupnpd_answer("DeletePinhole", ""),
            miniupnpd_answer("CheckPinholeWorking", "<IsWorking>1</IsWorking>"),
            miniupnpd_answer("GetPinholePackets", "<PinholePackets>12</PinholePackets>"),
        ];
        for answer in answers {
            let complete = answer.trim_end().len();
            for cut in (0..complete).filter(|&cut| answer.is_char_boundary(cut)) {
                let truncated = &answer[..cut];
                assert!(parse_add_pinhole_response(truncated).is_err(), "accepted {truncated:?}");
                assert!(parse_get_firewall_status_response(truncated).is_err(), "accepted {truncated:?}");
                assert!(parse_delete_pinhole_response(truncated).is_err(), "accepted {truncated:?}");
                assert!(parse_check_pinhole_working_response(truncated).is_err(), "accepted {truncated:?}");
                assert!(parse_get_pinhole_packets_response(truncated).is_err(), "accepted {truncated:?}");
            }
        }
    }

    #[test]
    fn error_messages_quote_untrusted_text_briefly() {
        let reason = parse_add_pinhole_response(&add_answer(&"9".repeat(500))).unwrap_err().to_string();
        assert!(reason.len() < 200, "{reason}");
        let fault = parse_add_pinhole_response(&miniupnpd_fault(501, &"d".repeat(1000))).unwrap_err().to_string();
        assert!(fault.len() < 200, "{fault}");
    }

    #[test]
    fn refusals_become_the_add_errors_the_reconciler_acts_on() {
        let upnp = |code| PinholeError::Upnp {
            action: "AddPinhole",
            fault: PinholeFault::from_code(code),
            description: String::new(),
        };
        assert!(matches!(AddError::from(upnp(606)), AddError::NotAuthorized(m) if m.contains("606")));
        assert!(matches!(AddError::from(upnp(701)), AddError::NoResources(m) if m.contains("701")));
        for code in [702, 703, 704, 705, 402, 501, 799] {
            let converted = AddError::from(upnp(code));
            assert!(
                matches!(&converted, AddError::Refused(m) if m.contains(&format!("UPnP error {code}"))),
                "{code}: {converted:?}"
            );
        }
        assert!(matches!(AddError::from(PinholeError::Unreachable("x".into())), AddError::Unreachable(m) if m == "x"));
        assert!(matches!(AddError::from(PinholeError::SourceUnusable("x".into())), AddError::Unreachable(_)));
        assert!(matches!(AddError::from(PinholeError::Malformed("x".into())), AddError::Refused(_)));
    }

    // --- Endpoint

    fn router(port: u16) -> SocketAddrV6 {
        SocketAddrV6::new(ROUTER_LINK_LOCAL, port, 0, 3)
    }

    #[test]
    fn a_relative_control_url_is_on_the_gateways_port() {
        let endpoint = PinholeEndpoint::new(HOST_ADDRESS, router(5000), IPV4_GATEWAY, "/ctl/IP6FCtl").unwrap();
        assert_eq!((endpoint.gateway(), endpoint.control_path()), (router(5000), "/ctl/IP6FCtl"));
        assert_eq!(endpoint.source(), HOST_ADDRESS);
        let relative = PinholeEndpoint::new(HOST_ADDRESS, router(5000), IPV4_GATEWAY, "ctl/IP6FCtl?x=1").unwrap();
        assert_eq!(relative.control_path(), "/ctl/IP6FCtl?x=1");
    }

    #[test]
    fn an_absolute_control_url_on_the_ipv4_gateway_is_sent_to_the_ipv6_gateway() {
        let endpoint =
            PinholeEndpoint::new(HOST_ADDRESS, router(5000), IPV4_GATEWAY, "http://192.168.1.1:5000/ctl/IP6FCtl")
                .unwrap();
        assert_eq!((endpoint.gateway(), endpoint.control_path()), (router(5000), "/ctl/IP6FCtl"));
        // The URL's port is where the service is, whatever port the description came from.
        let other_port =
            PinholeEndpoint::new(HOST_ADDRESS, router(5000), IPV4_GATEWAY, "http://192.168.1.1:49000/upnp/fw").unwrap();
        assert_eq!((other_port.gateway(), other_port.control_path()), (router(49000), "/upnp/fw"));
        let default_port =
            PinholeEndpoint::new(HOST_ADDRESS, router(5000), IPV4_GATEWAY, "http://192.168.1.1/c").unwrap();
        assert_eq!(default_port.gateway(), router(80));
        let on_ipv6 =
            PinholeEndpoint::new(HOST_ADDRESS, router(5000), IPV4_GATEWAY, "http://[fe80::1]:5001/c").unwrap();
        assert_eq!((on_ipv6.gateway(), on_ipv6.control_path()), (router(5001), "/c"));
    }

    #[test]
    fn a_control_url_elsewhere_is_refused() {
        for refused in [
            "http://10.0.0.1:5000/ctl",
            "http://192.168.1.2:5000/ctl",
            "http://[2001:db8::99]:5000/ctl",
            "http://[fe80::2]:5000/ctl",
            "http://router.lan/ctl",
            "https://192.168.1.1/ctl",
            "http://u:p@192.168.1.1/c",
            "/c#f",
            "http://[fe80::1%25eth0]:5000/ctl",
            "http://192.168.1.1:0/ctl",
        ] {
            let result = PinholeEndpoint::new(HOST_ADDRESS, router(5000), IPV4_GATEWAY, refused);
            assert!(matches!(result, Err(PinholeError::InvalidRequest(_))), "{refused} was accepted: {result:?}");
        }
    }

    #[test]
    fn unusable_addresses_are_refused_with_what_to_fix() {
        let no_zone =
            PinholeEndpoint::new(HOST_ADDRESS, SocketAddrV6::new(ROUTER_LINK_LOCAL, 5000, 0, 0), IPV4_GATEWAY, "/c");
        assert!(matches!(&no_zone, Err(PinholeError::InvalidRequest(m)) if m.contains("scope_id")), "{no_zone:?}");
        for source in ["::", "ff02::1", "::ffff:192.168.1.20"] {
            let result = PinholeEndpoint::new(source.parse().unwrap(), router(5000), IPV4_GATEWAY, "/c");
            assert!(matches!(result, Err(PinholeError::InvalidRequest(_))), "{source}: {result:?}");
        }
        let global_router = SocketAddrV6::new("2001:db8::1".parse().unwrap(), 5000, 0, 0);
        let link_local_source = PinholeEndpoint::new("fe80::20".parse().unwrap(), global_router, IPV4_GATEWAY, "/c");
        assert!(matches!(link_local_source, Err(PinholeError::InvalidRequest(_))), "{link_local_source:?}");
    }

    #[test]
    fn the_zone_is_kept_for_connecting_and_left_out_of_the_host_header() {
        let endpoint = PinholeEndpoint::new(HOST_ADDRESS, router(5000), IPV4_GATEWAY, "/ctl/IP6FCtl").unwrap();
        assert_eq!(endpoint.to_string(), "http://[fe80::1%3]:5000/ctl/IP6FCtl from 2001:db8:1::20");
        assert_eq!(endpoint.host_header(), "[fe80::1]:5000");
        assert_eq!(endpoint.bind_address(), SocketAddrV6::new(HOST_ADDRESS, 0, 0, 0));
        let link_local_source = "fe80::20".parse().unwrap();
        let on_link = PinholeEndpoint::new(link_local_source, router(5000), IPV4_GATEWAY, "/c").unwrap();
        assert_eq!(on_link.bind_address(), SocketAddrV6::new(link_local_source, 0, 0, 3));
    }

    // --- Calls, against a gateway faked on [::1] (the only IPv6 address a test may send to)

    /// What the fake gateway received.
    struct Received {
        peer: SocketAddr,
        /// Request line and headers, header names lower-cased.
        head: String,
        body: String,
    }

    fn loopback_endpoint(port: u16) -> PinholeEndpoint {
        let gateway = SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0);
        // As the description fetched over IPv4 names it: an absolute URL on the IPv4 gateway.
        let control_url = format!("http://192.168.1.1:{port}/ctl/IP6FCtl");
        PinholeEndpoint::new(Ipv6Addr::LOCALHOST, gateway, IPV4_GATEWAY, &control_url).unwrap()
    }

    async fn loopback_listener() -> (TcpListener, u16) {
        let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener, port)
    }

    /// Reads one request (head, then Content-Length bytes of body).
    async fn read_request(stream: &mut tokio::net::TcpStream) -> (String, String) {
        let mut request = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the client closed before sending a whole request");
            request.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&request).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let head = text[..end + 2].to_owned();
                let length = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .expect("no Content-Length in the request");
                if request.len() >= end + 4 + length {
                    let body = String::from_utf8(request[end + 4..end + 4 + length].to_vec()).unwrap();
                    let lowered = head
                        .lines()
                        .map(|line| match line.split_once(':') {
                            Some((name, value)) => format!("{}:{value}\r\n", name.to_ascii_lowercase()),
                            None => format!("{line}\r\n"),
                        })
                        .collect();
                    return (lowered, body);
                }
            }
        }
    }

    /// Answers one request with `pieces`, written one after the other; yields what it received.
    async fn serve_once(pieces: Vec<Vec<u8>>) -> (u16, JoinHandle<Received>) {
        let (listener, port) = loopback_listener().await;
        let server = tokio::spawn(async move {
            let (mut stream, peer) = listener.accept().await.unwrap();
            let (head, body) = read_request(&mut stream).await;
            for piece in pieces {
                // The client may hang up first (an oversize answer): that is its right.
                if stream.write_all(&piece).await.is_err() {
                    break;
                }
                let _ = stream.flush().await;
            }
            Received { peer, head, body }
        });
        (port, server)
    }

    fn plain_answer(status: &str, body: &str) -> Vec<Vec<u8>> {
        vec![format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()]
    }

    fn chunked_answer(status: &str, body: &[u8], chunk_size: usize) -> Vec<Vec<u8>> {
        let mut pieces = vec![format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()];
        for chunk in body.chunks(chunk_size) {
            let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
            piece.extend_from_slice(chunk);
            piece.extend_from_slice(b"\r\n");
            pieces.push(piece);
        }
        pieces.push(b"0\r\n\r\n".to_vec());
        pieces
    }

    #[tokio::test]
    async fn add_pinhole_is_sent_from_the_address_it_opens() {
        let (port, server) = serve_once(plain_answer("200 OK", &add_answer("3"))).await;
        let endpoint = loopback_endpoint(port);
        let added = add_pinhole(&endpoint, Protocol::Tcp, 8080, Duration::from_secs(3600), 5 * SECOND).await;
        assert_eq!(added, Ok(3));
        let received = server.await.unwrap();
        assert_eq!(received.peer.ip(), IpAddr::V6(endpoint.source()), "the request came from another address");
        assert!(received.head.starts_with("POST /ctl/IP6FCtl HTTP/1.1\r\n"), "{}", received.head);
        for header in [
            format!("host: [::1]:{port}\r\n"),
            format!("soapaction: \"{WAN_IPV6_FIREWALL_CONTROL}#AddPinhole\"\r\n"),
            "content-type: text/xml; charset=\"utf-8\"\r\n".to_owned(),
            "connection: close\r\n".to_owned(),
        ] {
            assert!(received.head.contains(&header), "no {header:?} in {}", received.head);
        }
        let expected = build_add_pinhole_request(Ipv6Addr::LOCALHOST, Protocol::Tcp, 8080, Duration::from_secs(3600));
        assert_eq!(received.body, expected.unwrap().body);
        assert!(received.body.contains("<InternalClient>::1</InternalClient>"));
    }

    #[tokio::test]
    async fn the_host_header_has_no_zone_when_the_gateway_has_one() {
        let (port, server) = serve_once(plain_answer("200 OK", &miniupnpd_answer("DeletePinhole", ""))).await;
        // Index 1 is the loopback interface in every network namespace.
        let gateway = SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 1);
        let endpoint = PinholeEndpoint::new(Ipv6Addr::LOCALHOST, gateway, IPV4_GATEWAY, "/ctl/IP6FCtl").unwrap();
        assert_eq!(delete_pinhole(&endpoint, 3, 5 * SECOND).await, Ok(()));
        let received = server.await.unwrap();
        assert!(received.head.contains(&format!("\r\nhost: [::1]:{port}\r\n")), "{}", received.head);
        assert!(received.body.contains("<UniqueID>3</UniqueID>"));
    }

    #[tokio::test]
    async fn a_fault_sent_with_http_500_is_read_as_the_upnp_error() {
        let fault = miniupnpd_fault(606, "Action not authorized");
        let (port, _server) = serve_once(plain_answer("500 Internal Server Error", &fault)).await;
        let added = add_pinhole(&loopback_endpoint(port), Protocol::Udp, 9000, SECOND, 5 * SECOND).await;
        let error = added.unwrap_err();
        assert_eq!(
            error,
            PinholeError::Upnp {
                action: "AddPinhole",
                fault: PinholeFault::ActionNotAuthorized,
                description: "Action not authorized".into()
            }
        );
        assert!(matches!(AddError::from(error), AddError::NotAuthorized(_)));
    }

    #[tokio::test]
    async fn deleting_a_pinhole_the_gateway_does_not_have_succeeds() {
        let fault = miniupnpd_fault(704, "NoSuchEntry");
        let (port, _server) = serve_once(plain_answer("500 Internal Server Error", &fault)).await;
        assert_eq!(delete_pinhole(&loopback_endpoint(port), 12, 5 * SECOND).await, Ok(()));
    }

    #[tokio::test]
    async fn a_chunked_answer_is_decoded() {
        let answer = firewall_status_answer("1", "0");
        let (port, _server) = serve_once(chunked_answer("200 OK", answer.as_bytes(), 7)).await;
        let status = get_firewall_status(&loopback_endpoint(port), 5 * SECOND).await;
        assert_eq!(status, Ok(FirewallStatus { firewall_enabled: true, inbound_pinhole_allowed: false }));
    }

    #[tokio::test]
    async fn the_other_calls_read_their_answers() {
        let endpoint_for = |answer: String| async move {
            let (port, server) = serve_once(plain_answer("200 OK", &answer)).await;
            (loopback_endpoint(port), server)
        };
        let (endpoint, server) = endpoint_for(miniupnpd_answer("UpdatePinhole", "")).await;
        assert_eq!(update_pinhole(&endpoint, 5, Duration::from_secs(600), 5 * SECOND).await, Ok(()));
        assert!(server.await.unwrap().body.contains("<UniqueID>5</UniqueID><NewLeaseTime>600</NewLeaseTime>"));
        let (endpoint, _server) =
            endpoint_for(miniupnpd_answer("CheckPinholeWorking", "<IsWorking>1</IsWorking>")).await;
        assert_eq!(check_pinhole_working(&endpoint, 5, 5 * SECOND).await, Ok(true));
        let (endpoint, _server) =
            endpoint_for(miniupnpd_answer("GetPinholePackets", "<PinholePackets>42</PinholePackets>")).await;
        assert_eq!(get_pinhole_packets(&endpoint, 5, 5 * SECOND).await, Ok(42));
        let (endpoint, server) = endpoint_for(miniupnpd_answer(
            "GetOutboundPinholeTimeout",
            "<OutboundPinholeTimeout>30</OutboundPinholeTimeout>",
        ))
        .await;
        assert_eq!(get_outbound_pinhole_timeout(&endpoint, Protocol::Udp, 3478, 5 * SECOND).await, Ok(30 * SECOND));
        assert!(server
            .await
            .unwrap()
            .body
            .contains("<InternalClient>::1</InternalClient><InternalPort>3478</InternalPort>"));
    }

    #[tokio::test]
    async fn an_oversize_answer_is_refused() {
        let (port, _server) =
            serve_once(chunked_answer("200 OK", &vec![b' '; MAX_RESPONSE_BYTES + 1], 64 * 1024)).await;
        let status = get_firewall_status(&loopback_endpoint(port), 5 * SECOND).await;
        assert_malformed(status, "over the 1048576 bytes accepted");
    }

    #[tokio::test]
    async fn an_announced_oversize_answer_is_refused_before_reading_it() {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_RESPONSE_BYTES + 1);
        // Only the head is sent, and the connection stays open: reading the body would wait for the timeout.
        let (port, _server) = serve_once(vec![head.into_bytes()]).await;
        let started = Instant::now();
        let status = get_firewall_status(&loopback_endpoint(port), 5 * SECOND).await;
        assert_malformed(status, "over the 1048576 bytes accepted");
        assert!(started.elapsed() < 2 * SECOND, "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn an_http_error_page_names_the_status() {
        let (port, _server) = serve_once(plain_answer("404 Not Found", "<html><body>Not Found</body></html>")).await;
        let status = get_firewall_status(&loopback_endpoint(port), 5 * SECOND).await;
        assert_malformed(status, "(HTTP status 404 Not Found)");
    }

    #[tokio::test]
    async fn an_answer_that_is_not_http_is_malformed() {
        let (port, _server) = serve_once(vec![b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()]).await;
        let status = get_firewall_status(&loopback_endpoint(port), 5 * SECOND).await;
        assert_malformed(status, "not valid HTTP");
    }

    #[tokio::test]
    async fn a_silent_gateway_is_unreachable_after_the_given_timeout() {
        let (listener, port) = loopback_listener().await;
        let _silent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(stream);
        });
        let started = Instant::now();
        let added =
            add_pinhole(&loopback_endpoint(port), Protocol::Tcp, 8080, SECOND, Duration::from_millis(300)).await;
        let elapsed = started.elapsed();
        match added {
            Err(PinholeError::Unreachable(reason)) => assert!(reason.contains("no answer within 300ms"), "{reason}"),
            other => panic!("expected Unreachable, got {other:?}"),
        }
        assert!(elapsed >= Duration::from_millis(300) && elapsed < 2 * SECOND, "took {elapsed:?}");
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable() {
        let (listener, port) = loopback_listener().await;
        // Nothing listens any more: connecting is refused, as when miniupnpd restarted on another port.
        drop(listener);
        let status = get_firewall_status(&loopback_endpoint(port), 5 * SECOND).await;
        assert!(matches!(&status, Err(PinholeError::Unreachable(m)) if m.contains("connecting")), "{status:?}");
        assert!(matches!(AddError::from(status.unwrap_err()), AddError::Unreachable(_)));
    }

    #[tokio::test]
    async fn a_source_address_this_host_does_not_have_fails_to_bind_clearly() {
        if std::fs::read_to_string("/proc/sys/net/ipv6/ip_nonlocal_bind").is_ok_and(|v| v.trim() == "1") {
            eprintln!("skipped: net.ipv6.ip_nonlocal_bind=1 lets any address be bound");
            return;
        }
        let (listener, port) = loopback_listener().await;
        let not_ours: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let gateway = SocketAddrV6::new(Ipv6Addr::LOCALHOST, port, 0, 0);
        let endpoint = PinholeEndpoint::new(not_ours, gateway, IPV4_GATEWAY, "/ctl/IP6FCtl").unwrap();
        let added = add_pinhole(&endpoint, Protocol::Tcp, 8080, SECOND, 5 * SECOND).await;
        match &added {
            Err(PinholeError::SourceUnusable(reason)) => {
                assert!(reason.contains("binding to 2001:db8::1 failed"), "{reason}");
                assert!(reason.contains("current address of this host"), "{reason}");
            }
            other => panic!("expected SourceUnusable, got {other:?}"),
        }
        // Nothing was sent: the socket never got an address.
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        assert!(accepted.is_err(), "a connection was made");
    }
}
