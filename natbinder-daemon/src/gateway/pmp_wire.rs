//! NAT-PMP (RFC 6886) and PCP (RFC 6887) on the wire: encoding requests, decoding replies and
//! announcements. Pure functions, no I/O; every decoder takes bytes any LAN host may have sent and
//! never panics (fuzzed by fuzz/fuzz_targets/pmp_reply.rs).
//!
//! What this module does not judge: whether a reply came from the gateway's address and port 5351,
//! whether its opcode and PCP nonce match the request in flight, and what its epoch says about the
//! gateway's state. Those need the request and the socket, and belong to the client.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::Protocol;

/// The port NAT-PMP and PCP servers listen on.
pub const SERVER_PORT: u16 = 5351;
/// The port clients listen on for multicast announcements (NAT-PMP address changes, PCP ANNOUNCE).
pub const ANNOUNCE_PORT: u16 = 5350;
/// Where gateways multicast their announcements.
pub const ANNOUNCE_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
/// Longest PCP message (RFC 6887 §7).
pub const PCP_MAX_MESSAGE: usize = 1100;
pub const NATPMP_VERSION: u8 = 0;
pub const PCP_VERSION: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{0} bytes is too short for a {1}")]
    TooShort(usize, &'static str),
    #[error("{0} bytes is longer than any valid {1}")]
    TooLong(usize, &'static str),
    #[error("a PCP message of {0} bytes is not a multiple of 4")]
    NotMultipleOfFour(usize),
    #[error("not a response (opcode byte {0:#04x})")]
    NotAResponse(u8),
    #[error("unknown protocol version {0}")]
    UnknownVersion(u8),
    /// A NAT-PMP success reply to an opcode this module does not know; carries the request opcode
    /// (the reply's opcode byte minus 128).
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    #[error("malformed option: {0}")]
    MalformedOption(&'static str),
}

// ---- NAT-PMP ------------------------------------------------------------------------------------

pub const NATPMP_OP_EXTERNAL_ADDRESS: u8 = 0;
pub const NATPMP_OP_MAP_UDP: u8 = 1;
pub const NATPMP_OP_MAP_TCP: u8 = 2;
/// Added to the request opcode in every NAT-PMP reply (RFC 6886 §3.2).
pub const NATPMP_REPLY_OPCODE_OFFSET: u8 = 128;
/// Version, opcode, result code and epoch: all an error reply needs to carry (RFC 6886 §3.5).
pub const NATPMP_REPLY_HEADER_LEN: usize = 8;
/// The header plus the external IPv4 address (RFC 6886 §3.2).
pub const NATPMP_EXTERNAL_ADDRESS_REPLY_LEN: usize = 12;
/// The header plus internal port, mapped external port and lifetime (RFC 6886 §3.3); the longest
/// NAT-PMP reply.
pub const NATPMP_MAP_REPLY_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatPmpRequest {
    ExternalAddress,
    /// lifetime_secs 0 with suggested_external_port 0 deletes the mapping of `internal_port`.
    Map {
        protocol: Protocol,
        internal_port: u16,
        suggested_external_port: u16,
        lifetime_secs: u32,
    },
}

impl NatPmpRequest {
    pub fn opcode(&self) -> u8 {
        match self {
            NatPmpRequest::ExternalAddress => NATPMP_OP_EXTERNAL_ADDRESS,
            NatPmpRequest::Map { protocol: Protocol::Udp, .. } => NATPMP_OP_MAP_UDP,
            NatPmpRequest::Map { protocol: Protocol::Tcp, .. } => NATPMP_OP_MAP_TCP,
        }
    }

    /// RFC 6886 §3.2 (2 bytes) or §3.3 (12 bytes), network byte order.
    pub fn encode(&self) -> Vec<u8> {
        let mut packet = vec![NATPMP_VERSION, self.opcode()];
        if let NatPmpRequest::Map { internal_port, suggested_external_port, lifetime_secs, .. } = *self {
            packet.extend_from_slice(&[0, 0]); // reserved
            packet.extend_from_slice(&internal_port.to_be_bytes());
            packet.extend_from_slice(&suggested_external_port.to_be_bytes());
            packet.extend_from_slice(&lifetime_secs.to_be_bytes());
        }
        packet
    }
}

/// RFC 6886 §3.5 result codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatPmpResult {
    Success,
    UnsupportedVersion,
    /// Not authorized/refused (e.g. the box supports mapping but the user turned it off).
    NotAuthorized,
    /// Network failure (e.g. the NAT box itself has not obtained a DHCP lease).
    NetworkFailure,
    /// Out of resources (the NAT box cannot create any more mappings at this time).
    OutOfResources,
    UnsupportedOpcode,
    Other(u16),
}

impl NatPmpResult {
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => NatPmpResult::Success,
            1 => NatPmpResult::UnsupportedVersion,
            2 => NatPmpResult::NotAuthorized,
            3 => NatPmpResult::NetworkFailure,
            4 => NatPmpResult::OutOfResources,
            5 => NatPmpResult::UnsupportedOpcode,
            other => NatPmpResult::Other(other),
        }
    }

    pub fn code(&self) -> u16 {
        match *self {
            NatPmpResult::Success => 0,
            NatPmpResult::UnsupportedVersion => 1,
            NatPmpResult::NotAuthorized => 2,
            NatPmpResult::NetworkFailure => 3,
            NatPmpResult::OutOfResources => 4,
            NatPmpResult::UnsupportedOpcode => 5,
            NatPmpResult::Other(code) => code,
        }
    }

    /// The RFC's meaning, for logs: "unsupported opcode" (Display adds the code: "5 (unsupported
    /// opcode)").
    pub fn meaning(&self) -> &'static str {
        match self {
            NatPmpResult::Success => "success",
            NatPmpResult::UnsupportedVersion => "unsupported version",
            NatPmpResult::NotAuthorized => "not authorized/refused",
            NatPmpResult::NetworkFailure => "network failure",
            NatPmpResult::OutOfResources => "out of resources",
            NatPmpResult::UnsupportedOpcode => "unsupported opcode",
            NatPmpResult::Other(_) => "a result code RFC 6886 does not define",
        }
    }
}

impl std::fmt::Display for NatPmpResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NAT-PMP result {} ({})", self.code(), self.meaning())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatPmpBody {
    ExternalAddress(Ipv4Addr),
    Map {
        protocol: Protocol,
        internal_port: u16,
        external_port: u16,
        lifetime_secs: u32,
    },
    /// An error reply may carry only the 8-byte header.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatPmpResponse {
    /// The request's opcode (the reply's opcode minus 128).
    pub opcode: u8,
    pub result: NatPmpResult,
    /// Seconds since the gateway's port-mapping table was initialised.
    pub epoch_secs: u32,
    pub body: NatPmpBody,
}

// ---- PCP ----------------------------------------------------------------------------------------

pub const PCP_OP_ANNOUNCE: u8 = 0;
pub const PCP_OP_MAP: u8 = 1;
pub const PCP_OPTION_PREFER_FAILURE: u8 = 2;
/// The R bit of the opcode byte: set in responses, clear in requests (RFC 6887 §7.2).
pub const PCP_RESPONSE_BIT: u8 = 0x80;
/// Common request and response header (RFC 6887 §7.1, §7.2); also the shortest PCP message.
pub const PCP_HEADER_LEN: usize = 24;
/// MAP opcode data, in requests and responses alike (RFC 6887 §11.1).
pub const PCP_MAP_DATA_LEN: usize = 36;
/// Option code, reserved byte and option length (RFC 6887 §7.3).
const PCP_OPTION_HEADER_LEN: usize = 4;
/// IANA protocol numbers as PCP carries them (one byte, unlike the kernel's u16 constants).
const IANA_PROTOCOL_TCP: u8 = 6;
const IANA_PROTOCOL_UDP: u8 = 17;

/// RFC 6887 §7.4 result codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcpResult {
    Success,
    UnsuppVersion,
    NotAuthorized,
    MalformedRequest,
    UnsuppOpcode,
    UnsuppOption,
    MalformedOption,
    NetworkFailure,
    NoResources,
    UnsuppProtocol,
    UserExQuota,
    CannotProvideExternal,
    AddressMismatch,
    ExcessiveRemotePeers,
    Other(u8),
}

impl PcpResult {
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => PcpResult::Success,
            1 => PcpResult::UnsuppVersion,
            2 => PcpResult::NotAuthorized,
            3 => PcpResult::MalformedRequest,
            4 => PcpResult::UnsuppOpcode,
            5 => PcpResult::UnsuppOption,
            6 => PcpResult::MalformedOption,
            7 => PcpResult::NetworkFailure,
            8 => PcpResult::NoResources,
            9 => PcpResult::UnsuppProtocol,
            10 => PcpResult::UserExQuota,
            11 => PcpResult::CannotProvideExternal,
            12 => PcpResult::AddressMismatch,
            13 => PcpResult::ExcessiveRemotePeers,
            other => PcpResult::Other(other),
        }
    }

    pub fn code(&self) -> u8 {
        match *self {
            PcpResult::Success => 0,
            PcpResult::UnsuppVersion => 1,
            PcpResult::NotAuthorized => 2,
            PcpResult::MalformedRequest => 3,
            PcpResult::UnsuppOpcode => 4,
            PcpResult::UnsuppOption => 5,
            PcpResult::MalformedOption => 6,
            PcpResult::NetworkFailure => 7,
            PcpResult::NoResources => 8,
            PcpResult::UnsuppProtocol => 9,
            PcpResult::UserExQuota => 10,
            PcpResult::CannotProvideExternal => 11,
            PcpResult::AddressMismatch => 12,
            PcpResult::ExcessiveRemotePeers => 13,
            PcpResult::Other(code) => code,
        }
    }

    /// The RFC's name and meaning, for logs: "USER_EX_QUOTA: this host has too many mappings on the
    /// gateway".
    pub fn meaning(&self) -> &'static str {
        match self {
            PcpResult::Success => "SUCCESS: the request succeeded",
            PcpResult::UnsuppVersion => "UNSUPP_VERSION: the gateway does not speak this PCP version",
            PcpResult::NotAuthorized => {
                "NOT_AUTHORIZED: the gateway's policy does not allow this operation for this host"
            }
            PcpResult::MalformedRequest => "MALFORMED_REQUEST: the gateway could not parse the request",
            PcpResult::UnsuppOpcode => "UNSUPP_OPCODE: the gateway does not support this opcode",
            PcpResult::UnsuppOption => "UNSUPP_OPTION: the gateway does not support a mandatory option in the request",
            PcpResult::MalformedOption => {
                "MALFORMED_OPTION: an option in the request is malformed (bad length, or repeated)"
            }
            PcpResult::NetworkFailure => {
                "NETWORK_FAILURE: the gateway has a network problem (e.g. no external address yet)"
            }
            PcpResult::NoResources => "NO_RESOURCES: the gateway cannot create more mappings at this time",
            PcpResult::UnsuppProtocol => "UNSUPP_PROTOCOL: the gateway does not map this transport protocol",
            PcpResult::UserExQuota => "USER_EX_QUOTA: this host has too many mappings on the gateway",
            PcpResult::CannotProvideExternal => {
                "CANNOT_PROVIDE_EXTERNAL: the gateway cannot provide the suggested external port or address"
            }
            PcpResult::AddressMismatch => {
                "ADDRESS_MISMATCH: the gateway saw a different source address than the client address in the \
                 request: another NAT sits between this host and the gateway"
            }
            PcpResult::ExcessiveRemotePeers => {
                "EXCESSIVE_REMOTE_PEERS: the gateway could not create the filters the FILTER options asked for"
            }
            PcpResult::Other(_) => "a result code RFC 6887 does not define",
        }
    }
}

impl std::fmt::Display for PcpResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PCP result {} {}", self.code(), self.meaning())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcpMapRequest {
    pub nonce: [u8; 12],
    pub protocol: Protocol,
    pub internal_port: u16,
    pub suggested_external_port: u16,
    /// None: no preference, sent as the all-zeros address of the client's family (RFC 6887 §11.1):
    /// ::ffff:0.0.0.0 for an IPv4 mapping, :: for an IPv6 one (a pinhole: the external address is the
    /// client's own).
    pub suggested_external_ip: Option<IpAddr>,
    /// 0 deletes.
    pub lifetime_secs: u32,
    /// This host's address as it sends (the PCP client IP field; IPv4-mapped for IPv4). Over IPv6 the
    /// mapping is a firewall pinhole to this address.
    pub client_ip: IpAddr,
    /// Adds the PREFER_FAILURE option (RFC 6887 §13.2).
    pub prefer_failure: bool,
}

impl PcpMapRequest {
    /// Header (24 bytes), MAP opcode data (36 bytes) and, with `prefer_failure`, the 4-byte
    /// PREFER_FAILURE option: 60 or 64 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut packet = encode_pcp_request_header(PCP_OP_MAP, self.lifetime_secs, self.client_ip);
        packet.extend_from_slice(&self.nonce);
        packet.push(iana_protocol(self.protocol));
        packet.extend_from_slice(&[0, 0, 0]); // reserved
        packet.extend_from_slice(&self.internal_port.to_be_bytes());
        packet.extend_from_slice(&self.suggested_external_port.to_be_bytes());
        let no_preference = match self.client_ip {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        packet.extend_from_slice(&pcp_address(self.suggested_external_ip.unwrap_or(no_preference)));
        if self.prefer_failure {
            // Code, reserved, length 0: the option carries no data.
            packet.extend_from_slice(&[PCP_OPTION_PREFER_FAILURE, 0, 0, 0]);
        }
        packet
    }
}

/// An ANNOUNCE request (RFC 6887 §14.1): lifetime 0, no opcode data. Used to probe for a PCP server
/// and read its epoch.
pub fn encode_pcp_announce(client_ip: IpAddr) -> Vec<u8> {
    encode_pcp_request_header(PCP_OP_ANNOUNCE, 0, client_ip)
}

/// RFC 6887 §7.1: version, R=0 and opcode, reserved, requested lifetime, client IP.
fn encode_pcp_request_header(opcode: u8, lifetime_secs: u32, client_ip: IpAddr) -> Vec<u8> {
    let mut packet = Vec::with_capacity(PCP_HEADER_LEN + PCP_MAP_DATA_LEN + PCP_OPTION_HEADER_LEN);
    packet.extend_from_slice(&[PCP_VERSION, opcode & !PCP_RESPONSE_BIT, 0, 0]);
    packet.extend_from_slice(&lifetime_secs.to_be_bytes());
    packet.extend_from_slice(&pcp_address(client_ip));
    packet
}

/// PCP's 128-bit address fields (RFC 6887 §5): IPv4 addresses IPv4-mapped, IPv6 ones as they are.
fn pcp_address(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn iana_protocol(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => IANA_PROTOCOL_TCP,
        Protocol::Udp => IANA_PROTOCOL_UDP,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcpBody {
    Announce,
    Map {
        nonce: [u8; 12],
        /// IANA protocol number as sent (6 TCP, 17 UDP, 0 all); None when it is neither TCP nor UDP.
        protocol: Option<Protocol>,
        internal_port: u16,
        assigned_external_port: u16,
        /// IPv4-mapped addresses come back as IpAddr::V4.
        assigned_external_ip: IpAddr,
    },
    /// An error reply to another opcode, or a body shorter than its opcode needs (allowed for errors).
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcpResponse {
    /// The version byte as received (a server that supports only an older version answers
    /// UNSUPP_VERSION with its own version here).
    pub version: u8,
    pub opcode: u8,
    pub result: PcpResult,
    pub lifetime_secs: u32,
    pub epoch_secs: u32,
    pub body: PcpBody,
}

/// Anything a gateway sends to a NAT-PMP/PCP client: a reply on the request socket, or a multicast
/// announcement on 224.0.0.1:5350.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    NatPmp(NatPmpResponse),
    Pcp(PcpResponse),
}

/// Decodes a reply or announcement, dispatching on the version byte (0 NAT-PMP, 1 or 2 PCP).
///
/// Version 1 is the pre-RFC PCP draft: a server that speaks only it answers a version 2 request
/// with UNSUPP_VERSION in that version's header, which has the same common layout.
pub fn parse_reply(bytes: &[u8]) -> Result<Reply, WireError> {
    let (Some(&version), Some(&opcode_byte)) = (bytes.first(), bytes.get(1)) else {
        return Err(WireError::TooShort(bytes.len(), "NAT-PMP or PCP reply"));
    };
    match version {
        NATPMP_VERSION => parse_natpmp_reply(bytes, opcode_byte).map(Reply::NatPmp),
        1 | PCP_VERSION => parse_pcp_response(bytes, version, opcode_byte).map(Reply::Pcp),
        other => Err(WireError::UnknownVersion(other)),
    }
}

/// RFC 6886 §3.2, §3.3, §3.5. `bytes` holds at least the version and opcode bytes.
fn parse_natpmp_reply(bytes: &[u8], opcode_byte: u8) -> Result<NatPmpResponse, WireError> {
    let Some(opcode) = opcode_byte.checked_sub(NATPMP_REPLY_OPCODE_OFFSET) else {
        return Err(WireError::NotAResponse(opcode_byte));
    };
    let len = bytes.len();
    if len < NATPMP_REPLY_HEADER_LEN {
        return Err(WireError::TooShort(len, "NAT-PMP reply header"));
    }
    if len > NATPMP_MAP_REPLY_LEN {
        return Err(WireError::TooLong(len, "NAT-PMP reply"));
    }
    let result = NatPmpResult::from_code(be_u16(bytes, 2));
    let epoch_secs = be_u32(bytes, 4);
    let is_error = result != NatPmpResult::Success;
    let body = match opcode {
        NATPMP_OP_EXTERNAL_ADDRESS if len >= NATPMP_EXTERNAL_ADDRESS_REPLY_LEN => {
            NatPmpBody::ExternalAddress(Ipv4Addr::new(bytes[8], bytes[9], bytes[10], bytes[11]))
        }
        NATPMP_OP_EXTERNAL_ADDRESS if is_error => NatPmpBody::None,
        NATPMP_OP_EXTERNAL_ADDRESS => return Err(WireError::TooShort(len, "NAT-PMP external address reply")),
        NATPMP_OP_MAP_UDP | NATPMP_OP_MAP_TCP if len >= NATPMP_MAP_REPLY_LEN => NatPmpBody::Map {
            protocol: if opcode == NATPMP_OP_MAP_UDP { Protocol::Udp } else { Protocol::Tcp },
            internal_port: be_u16(bytes, 8),
            external_port: be_u16(bytes, 10),
            lifetime_secs: be_u32(bytes, 12),
        },
        NATPMP_OP_MAP_UDP | NATPMP_OP_MAP_TCP if is_error => NatPmpBody::None,
        NATPMP_OP_MAP_UDP | NATPMP_OP_MAP_TCP => return Err(WireError::TooShort(len, "NAT-PMP mapping reply")),
        // A NAT-PMP-only gateway answers a PCP request with UNSUPP_VERSION and opcode 128 + the
        // PCP opcode byte: the client must see that error to fall back, whatever the opcode.
        _ if is_error => NatPmpBody::None,
        _ => return Err(WireError::UnknownOpcode(opcode)),
    };
    Ok(NatPmpResponse { opcode, result, epoch_secs, body })
}

/// RFC 6887 §7.2 (header), §7.3 (options), §11.1 (MAP), §14.1 (ANNOUNCE). `bytes` holds at least
/// the version and opcode bytes.
fn parse_pcp_response(bytes: &[u8], version: u8, opcode_byte: u8) -> Result<PcpResponse, WireError> {
    if opcode_byte & PCP_RESPONSE_BIT == 0 {
        return Err(WireError::NotAResponse(opcode_byte));
    }
    let opcode = opcode_byte & !PCP_RESPONSE_BIT;
    let len = bytes.len();
    if len < PCP_HEADER_LEN {
        return Err(WireError::TooShort(len, "PCP response header"));
    }
    if len > PCP_MAX_MESSAGE {
        return Err(WireError::TooLong(len, "PCP message"));
    }
    if !len.is_multiple_of(4) {
        return Err(WireError::NotMultipleOfFour(len));
    }
    let result = PcpResult::from_code(bytes[3]);
    let lifetime_secs = be_u32(bytes, 4);
    let epoch_secs = be_u32(bytes, 8);
    let map_data_end = PCP_HEADER_LEN + PCP_MAP_DATA_LEN;
    // Where options start; None when the opcode data's length is unknown, so options cannot be found.
    let (body, options_start) = match opcode {
        PCP_OP_ANNOUNCE => (PcpBody::Announce, Some(PCP_HEADER_LEN)),
        PCP_OP_MAP if len >= map_data_end => {
            (parse_pcp_map_data(&bytes[PCP_HEADER_LEN..map_data_end]), Some(map_data_end))
        }
        // Error responses may lack the opcode data: an UNSUPP_VERSION answer is the bare header,
        // and a request the server could not parse may come back cut short.
        PCP_OP_MAP if result != PcpResult::Success => (PcpBody::Other, None),
        PCP_OP_MAP => return Err(WireError::TooShort(len, "PCP MAP success response")),
        _ => (PcpBody::Other, None),
    };
    if let Some(start) = options_start {
        check_pcp_options(&bytes[start..])?;
    }
    Ok(PcpResponse { version, opcode, result, lifetime_secs, epoch_secs, body })
}

/// `data` is exactly the 36 bytes of MAP opcode data.
fn parse_pcp_map_data(data: &[u8]) -> PcpBody {
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&data[..12]);
    let protocol = match data[12] {
        IANA_PROTOCOL_TCP => Some(Protocol::Tcp),
        IANA_PROTOCOL_UDP => Some(Protocol::Udp),
        _ => None,
    };
    let mut address = [0u8; 16];
    address.copy_from_slice(&data[20..36]);
    let address = Ipv6Addr::from(address);
    let assigned_external_ip = match address.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(address),
    };
    PcpBody::Map {
        nonce,
        protocol,
        internal_port: be_u16(data, 16),
        assigned_external_port: be_u16(data, 18),
        assigned_external_ip,
    }
}

/// Walks the options that follow the opcode data, checking that each fits in the message. None of
/// them changes what a response means to natbinder, so unknown ones are skipped, not refused.
fn check_pcp_options(mut options: &[u8]) -> Result<(), WireError> {
    while !options.is_empty() {
        if options.len() < PCP_OPTION_HEADER_LEN {
            return Err(WireError::MalformedOption("option header runs past the end of the message"));
        }
        let data_len = usize::from(be_u16(options, 2));
        // Option data is padded with zeros to a multiple of 4 bytes.
        let padded_len = data_len.div_ceil(4) * 4;
        let Some(rest) = options.get(PCP_OPTION_HEADER_LEN + padded_len..) else {
            return Err(WireError::MalformedOption("option data runs past the end of the message"));
        };
        options = rest;
    }
    Ok(())
}

/// Callers check the length first.
fn be_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

/// Callers check the length first.
fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every vector below is written out by hand from the RFC layouts, field by field; none comes from
    // the encoders, so an encoder bug cannot hide a decoder bug or the other way round.

    const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 23);
    /// ::ffff:192.168.1.23
    const CLIENT_MAPPED: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 23];
    /// ::ffff:0.0.0.0, "no preference".
    const UNSPECIFIED_MAPPED: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0];
    /// ::ffff:203.0.113.7
    const EXTERNAL_MAPPED: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 203, 0, 113, 7];
    const EXTERNAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
    const NONCE: [u8; 12] = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c];

    fn concat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    // ---- NAT-PMP reply vectors (RFC 6886 §3.2, §3.3, §3.5) ----

    /// External address reply: version 0, op 128, result 0, epoch 86400, 203.0.113.7.
    const NATPMP_EXTERNAL_ADDRESS_REPLY: [u8; 12] = [0, 128, 0, 0, 0x00, 0x01, 0x51, 0x80, 203, 0, 113, 7];
    /// TCP map reply: op 130, result 0, epoch 3600, internal 8080, external 8081, lifetime 7200.
    const NATPMP_TCP_MAP_REPLY: [u8; 16] =
        [0, 130, 0, 0, 0x00, 0x00, 0x0e, 0x10, 0x1f, 0x90, 0x1f, 0x91, 0x00, 0x00, 0x1c, 0x20];
    /// UDP map reply: op 129, result 0, epoch 1, internal 54321, external 54322, lifetime 60.
    const NATPMP_UDP_MAP_REPLY: [u8; 16] = [0, 129, 0, 0, 0, 0, 0, 1, 0xd4, 0x31, 0xd4, 0x32, 0, 0, 0, 60];
    /// Header-only error reply to a TCP map request: result 3 (network failure), epoch 42.
    const NATPMP_TCP_MAP_NETWORK_FAILURE: [u8; 8] = [0, 130, 0, 3, 0, 0, 0, 42];
    /// Full-length error reply to a UDP map request: result 2 (refused), internal 5000, external 0.
    const NATPMP_UDP_MAP_REFUSED_WITH_BODY: [u8; 16] = [0, 129, 0, 2, 0, 0, 0, 9, 0x13, 0x88, 0, 0, 0, 0, 0, 0];
    /// What a NAT-PMP-only miniupnpd sends back to a PCP MAP request: op 128 + 1, UNSUPP_VERSION, header only.
    const NATPMP_UNSUPPORTED_VERSION_TO_PCP_MAP: [u8; 8] = [0, 129, 0, 1, 0, 0, 0x02, 0x00];
    /// ... and to a PCP ANNOUNCE request: op 128 + 0.
    const NATPMP_UNSUPPORTED_VERSION_TO_PCP_ANNOUNCE: [u8; 8] = [0, 128, 0, 1, 0, 0, 0x02, 0x00];

    // ---- PCP response vectors (RFC 6887 §7.2, §11.1, §14.1) ----

    /// Common response header: version 2, R | opcode, reserved, result, lifetime, epoch, 12 reserved.
    fn pcp_response_header(opcode_byte: u8, result: u8, lifetime: [u8; 4], epoch: [u8; 4]) -> Vec<u8> {
        concat(&[&[2, opcode_byte, 0, result], &lifetime, &epoch, &[0; 12]])
    }

    /// MAP opcode data: nonce, protocol, 3 reserved, internal port, external port, external address.
    fn pcp_map_data(protocol: u8, internal_port: [u8; 2], external_port: [u8; 2], address: [u8; 16]) -> Vec<u8> {
        concat(&[&NONCE, &[protocol, 0, 0, 0], &internal_port, &external_port, &address])
    }

    /// A granted TCP mapping: lifetime 7200, epoch 12345, internal 8080, external 8081 on 203.0.113.7.
    fn pcp_tcp_map_success() -> Vec<u8> {
        concat(&[
            &pcp_response_header(0x81, 0, [0, 0, 0x1c, 0x20], [0, 0, 0x30, 0x39]),
            &pcp_map_data(6, [0x1f, 0x90], [0x1f, 0x91], EXTERNAL_MAPPED),
        ])
    }

    /// An ANNOUNCE response (or multicast announcement): lifetime 0, epoch 5.
    fn pcp_announce() -> Vec<u8> {
        pcp_response_header(0x80, 0, [0; 4], [0, 0, 0, 5])
    }

    /// UNSUPP_VERSION to a MAP request, header only, lifetime 1800 (a long-lifetime error).
    fn pcp_unsupp_version(version: u8) -> Vec<u8> {
        let mut packet = pcp_response_header(0x81, 1, [0, 0, 0x07, 0x08], [0, 0, 0, 7]);
        packet[0] = version;
        packet
    }

    fn pcp_map_body(response: Reply) -> PcpBody {
        match response {
            Reply::Pcp(PcpResponse { body, .. }) => body,
            other => panic!("expected a PCP response, got {other:?}"),
        }
    }

    // ---- encoders ----

    #[test]
    fn natpmp_requests_are_the_rfc_bytes() {
        assert_eq!(NatPmpRequest::ExternalAddress.encode(), [0, 0]);
        let tcp = NatPmpRequest::Map {
            protocol: Protocol::Tcp,
            internal_port: 8080,
            suggested_external_port: 8081,
            lifetime_secs: 7200,
        };
        assert_eq!(tcp.encode(), [0, 2, 0, 0, 0x1f, 0x90, 0x1f, 0x91, 0x00, 0x00, 0x1c, 0x20]);
        let udp = NatPmpRequest::Map {
            protocol: Protocol::Udp,
            internal_port: 0xfffe,
            suggested_external_port: 0x0102,
            lifetime_secs: 0xdead_beef,
        };
        assert_eq!(udp.encode(), [0, 1, 0, 0, 0xff, 0xfe, 0x01, 0x02, 0xde, 0xad, 0xbe, 0xef]);
        let delete = NatPmpRequest::Map {
            protocol: Protocol::Udp,
            internal_port: 5000,
            suggested_external_port: 0,
            lifetime_secs: 0,
        };
        assert_eq!(delete.encode(), [0, 1, 0, 0, 0x13, 0x88, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            (NatPmpRequest::ExternalAddress.opcode(), udp.opcode(), tcp.opcode()),
            (NATPMP_OP_EXTERNAL_ADDRESS, NATPMP_OP_MAP_UDP, NATPMP_OP_MAP_TCP)
        );
    }

    fn tcp_map_request() -> PcpMapRequest {
        PcpMapRequest {
            nonce: NONCE,
            protocol: Protocol::Tcp,
            internal_port: 8080,
            suggested_external_port: 8080,
            suggested_external_ip: None,
            lifetime_secs: 7200,
            client_ip: CLIENT.into(),
            prefer_failure: false,
        }
    }

    #[test]
    fn a_pcp_map_request_is_header_and_map_data() {
        let expected = concat(&[
            &[2, 1, 0, 0],             // version 2, R=0 | MAP, reserved
            &[0, 0, 0x1c, 0x20],       // requested lifetime 7200
            &CLIENT_MAPPED,            // client IP
            &NONCE,                    // mapping nonce
            &[6, 0, 0, 0],             // TCP, reserved
            &[0x1f, 0x90, 0x1f, 0x90], // internal 8080, suggested external 8080
            &UNSPECIFIED_MAPPED,       // no suggested external address
        ]);
        assert_eq!(expected.len(), 60);
        assert_eq!(tcp_map_request().encode(), expected);
    }

    #[test]
    fn a_pcp_map_request_carries_the_suggested_address_and_prefer_failure() {
        let request = PcpMapRequest {
            protocol: Protocol::Udp,
            internal_port: 51413,
            suggested_external_port: 51414,
            suggested_external_ip: Some(EXTERNAL.into()),
            lifetime_secs: 0,
            prefer_failure: true,
            ..tcp_map_request()
        };
        let expected = concat(&[
            &[2, 1, 0, 0],
            &[0, 0, 0, 0],
            &CLIENT_MAPPED,
            &NONCE,
            &[17, 0, 0, 0],
            &[0xc8, 0xd5, 0xc8, 0xd6],
            &EXTERNAL_MAPPED,
            &[2, 0, 0, 0], // PREFER_FAILURE, reserved, length 0
        ]);
        assert_eq!(expected.len(), 64);
        assert_eq!(request.encode(), expected);
    }

    #[test]
    fn a_pcp_announce_request_is_a_bare_header() {
        let expected = concat(&[&[2, 0, 0, 0], &[0, 0, 0, 0], &CLIENT_MAPPED]);
        assert_eq!(encode_pcp_announce(CLIENT.into()), expected);
    }

    #[test]
    fn an_ipv6_map_names_the_client_as_it_is_and_suggests_the_all_zeros_ipv6_address() {
        let client: Ipv6Addr = "2001:db8:77::10".parse().unwrap();
        let request = PcpMapRequest { client_ip: client.into(), ..tcp_map_request() };
        let expected = concat(&[
            &[2, 1, 0, 0],
            &[0, 0, 0x1c, 0x20],
            &client.octets(),
            &NONCE,
            &[6, 0, 0, 0],
            &[0x1f, 0x90, 0x1f, 0x90],
            &[0; 16], // ::, not ::ffff:0.0.0.0 (RFC 6887 §11.1: the family's all-zeros address)
        ]);
        assert_eq!(request.encode(), expected);
        assert_eq!(encode_pcp_announce(client.into())[8..24], client.octets());
        // miniupnpd answers a pinhole with the client's own address as the external one.
        let reply = parse_reply(&pcp_server_grants(&request.encode(), [0, 0, 0, 9], client.octets())).unwrap();
        let Reply::Pcp(PcpResponse { body: PcpBody::Map { assigned_external_ip, .. }, .. }) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(assigned_external_ip, IpAddr::V6(client));
    }

    // ---- NAT-PMP decoding ----

    #[test]
    fn decodes_the_natpmp_external_address() {
        assert_eq!(
            parse_reply(&NATPMP_EXTERNAL_ADDRESS_REPLY),
            Ok(Reply::NatPmp(NatPmpResponse {
                opcode: NATPMP_OP_EXTERNAL_ADDRESS,
                result: NatPmpResult::Success,
                epoch_secs: 86400,
                body: NatPmpBody::ExternalAddress(EXTERNAL),
            }))
        );
    }

    #[test]
    fn decodes_natpmp_tcp_and_udp_mappings() {
        assert_eq!(
            parse_reply(&NATPMP_TCP_MAP_REPLY),
            Ok(Reply::NatPmp(NatPmpResponse {
                opcode: NATPMP_OP_MAP_TCP,
                result: NatPmpResult::Success,
                epoch_secs: 3600,
                body: NatPmpBody::Map {
                    protocol: Protocol::Tcp,
                    internal_port: 8080,
                    external_port: 8081,
                    lifetime_secs: 7200
                },
            }))
        );
        assert_eq!(
            parse_reply(&NATPMP_UDP_MAP_REPLY),
            Ok(Reply::NatPmp(NatPmpResponse {
                opcode: NATPMP_OP_MAP_UDP,
                result: NatPmpResult::Success,
                epoch_secs: 1,
                body: NatPmpBody::Map {
                    protocol: Protocol::Udp,
                    internal_port: 54321,
                    external_port: 54322,
                    lifetime_secs: 60
                },
            }))
        );
    }

    #[test]
    fn a_natpmp_error_may_be_header_only_or_carry_its_body() {
        assert_eq!(
            parse_reply(&NATPMP_TCP_MAP_NETWORK_FAILURE),
            Ok(Reply::NatPmp(NatPmpResponse {
                opcode: NATPMP_OP_MAP_TCP,
                result: NatPmpResult::NetworkFailure,
                epoch_secs: 42,
                body: NatPmpBody::None,
            }))
        );
        assert_eq!(
            parse_reply(&NATPMP_UDP_MAP_REFUSED_WITH_BODY),
            Ok(Reply::NatPmp(NatPmpResponse {
                opcode: NATPMP_OP_MAP_UDP,
                result: NatPmpResult::NotAuthorized,
                epoch_secs: 9,
                body: NatPmpBody::Map {
                    protocol: Protocol::Udp,
                    internal_port: 5000,
                    external_port: 0,
                    lifetime_secs: 0
                },
            }))
        );
        // An external address error: header only, and with the (zero) address.
        let header_only = [0, 128, 0, 3, 0, 0, 0, 1];
        let Ok(Reply::NatPmp(reply)) = parse_reply(&header_only) else { panic!("header-only error refused") };
        assert_eq!((reply.result, reply.body), (NatPmpResult::NetworkFailure, NatPmpBody::None));
        let with_address = [0, 128, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0];
        let Ok(Reply::NatPmp(reply)) = parse_reply(&with_address) else { panic!("full-length error refused") };
        assert_eq!(reply.body, NatPmpBody::ExternalAddress(Ipv4Addr::UNSPECIFIED));
    }

    #[test]
    fn a_natpmp_only_gateway_refusing_pcp_says_unsupported_version() {
        for (packet, opcode) in [
            (NATPMP_UNSUPPORTED_VERSION_TO_PCP_MAP, PCP_OP_MAP),
            (NATPMP_UNSUPPORTED_VERSION_TO_PCP_ANNOUNCE, PCP_OP_ANNOUNCE),
        ] {
            assert_eq!(
                parse_reply(&packet),
                Ok(Reply::NatPmp(NatPmpResponse {
                    opcode,
                    result: NatPmpResult::UnsupportedVersion,
                    epoch_secs: 512,
                    body: NatPmpBody::None,
                }))
            );
        }
        // A PCP opcode NAT-PMP does not have (PEER, 2 | 128 = 130 is a TCP map; 3 is not defined).
        let unknown_opcode_error = [0, 131, 0, 1, 0, 0, 0, 0];
        let Ok(Reply::NatPmp(reply)) = parse_reply(&unknown_opcode_error) else { panic!("error refused") };
        assert_eq!((reply.opcode, reply.body), (3, NatPmpBody::None));
        let full_length_unknown_opcode_error = [0, 255, 0, 5, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
        let Ok(Reply::NatPmp(reply)) = parse_reply(&full_length_unknown_opcode_error) else { panic!("error refused") };
        assert_eq!((reply.opcode, reply.result, reply.body), (127, NatPmpResult::UnsupportedOpcode, NatPmpBody::None));
    }

    #[test]
    fn natpmp_errors_name_what_is_wrong() {
        let cases: &[(&[u8], WireError)] = &[
            (&[], WireError::TooShort(0, "NAT-PMP or PCP reply")),
            (&[0], WireError::TooShort(1, "NAT-PMP or PCP reply")),
            (&[0, 128, 0, 0, 0, 0, 0], WireError::TooShort(7, "NAT-PMP reply header")),
            // A request echoed back, or another client's request seen on the wire.
            (&[0, 0], WireError::NotAResponse(0)),
            (&[0, 2, 0, 0, 0x1f, 0x90, 0x1f, 0x90, 0, 0, 0x1c, 0x20], WireError::NotAResponse(2)),
            (&[0, 127, 0, 0, 0, 0, 0, 0], WireError::NotAResponse(127)),
            // Success needs the body.
            (&[0, 128, 0, 0, 0, 0, 0, 1], WireError::TooShort(8, "NAT-PMP external address reply")),
            (&[0, 128, 0, 0, 0, 0, 0, 1, 203, 0, 113], WireError::TooShort(11, "NAT-PMP external address reply")),
            (&[0, 130, 0, 0, 0, 0, 0, 1], WireError::TooShort(8, "NAT-PMP mapping reply")),
            (&NATPMP_TCP_MAP_REPLY[..15], WireError::TooShort(15, "NAT-PMP mapping reply")),
            (&[0, 131, 0, 0, 0, 0, 0, 1], WireError::UnknownOpcode(3)),
            (&[0, 255, 0, 0, 0, 0, 0, 1], WireError::UnknownOpcode(127)),
        ];
        for (packet, expected) in cases {
            assert_eq!(parse_reply(packet).as_ref(), Err(expected), "{packet:02x?}");
        }
        let too_long = concat(&[&NATPMP_TCP_MAP_REPLY, &[0]]);
        assert_eq!(parse_reply(&too_long), Err(WireError::TooLong(17, "NAT-PMP reply")));
        assert_eq!(parse_reply(&too_long).unwrap_err().to_string(), "17 bytes is longer than any valid NAT-PMP reply");
    }

    #[test]
    fn natpmp_trailing_bytes_within_the_longest_reply_are_ignored() {
        let padded = concat(&[&NATPMP_EXTERNAL_ADDRESS_REPLY, &[0, 0, 0, 0]]);
        assert_eq!(parse_reply(&padded), parse_reply(&NATPMP_EXTERNAL_ADDRESS_REPLY));
    }

    // ---- PCP decoding ----

    #[test]
    fn decodes_a_granted_pcp_mapping() {
        assert_eq!(
            parse_reply(&pcp_tcp_map_success()),
            Ok(Reply::Pcp(PcpResponse {
                version: 2,
                opcode: PCP_OP_MAP,
                result: PcpResult::Success,
                lifetime_secs: 7200,
                epoch_secs: 12345,
                body: PcpBody::Map {
                    nonce: NONCE,
                    protocol: Some(Protocol::Tcp),
                    internal_port: 8080,
                    assigned_external_port: 8081,
                    assigned_external_ip: IpAddr::V4(EXTERNAL),
                },
            }))
        );
    }

    #[test]
    fn pcp_map_protocols_and_ipv6_external_addresses() {
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let udp_v6 = concat(&[
            &pcp_response_header(0x81, 0, [0, 0, 0, 60], [0, 0, 0, 1]),
            &pcp_map_data(17, [0, 53], [0, 53], v6),
        ]);
        assert_eq!(
            pcp_map_body(parse_reply(&udp_v6).unwrap()),
            PcpBody::Map {
                nonce: NONCE,
                protocol: Some(Protocol::Udp),
                internal_port: 53,
                assigned_external_port: 53,
                assigned_external_ip: IpAddr::V6("2001:db8::1".parse().unwrap()),
            }
        );
        // Protocol 0 ("all protocols") and SCTP (132) are not ours to name.
        for protocol in [0, 132] {
            let packet = concat(&[
                &pcp_response_header(0x81, 0, [0, 0, 0, 60], [0, 0, 0, 1]),
                &pcp_map_data(protocol, [0, 0], [0, 0], EXTERNAL_MAPPED),
            ]);
            let PcpBody::Map { protocol: decoded, .. } = pcp_map_body(parse_reply(&packet).unwrap()) else {
                panic!("MAP body expected")
            };
            assert_eq!(decoded, None, "protocol {protocol}");
        }
        // The all-zero address is not IPv4-mapped: it stays IPv6.
        let zero = concat(&[&pcp_response_header(0x81, 0, [0; 4], [0; 4]), &pcp_map_data(6, [0, 1], [0, 1], [0; 16])]);
        let PcpBody::Map { assigned_external_ip, .. } = pcp_map_body(parse_reply(&zero).unwrap()) else {
            panic!("MAP body expected")
        };
        assert_eq!(assigned_external_ip, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    }

    #[test]
    fn decodes_a_pcp_announce() {
        assert_eq!(
            parse_reply(&pcp_announce()),
            Ok(Reply::Pcp(PcpResponse {
                version: 2,
                opcode: PCP_OP_ANNOUNCE,
                result: PcpResult::Success,
                lifetime_secs: 0,
                epoch_secs: 5,
                body: PcpBody::Announce,
            }))
        );
    }

    #[test]
    fn pcp_errors_may_omit_the_opcode_data() {
        for version in [1, 2] {
            assert_eq!(
                parse_reply(&pcp_unsupp_version(version)),
                Ok(Reply::Pcp(PcpResponse {
                    version,
                    opcode: PCP_OP_MAP,
                    result: PcpResult::UnsuppVersion,
                    lifetime_secs: 1800,
                    epoch_secs: 7,
                    body: PcpBody::Other,
                }))
            );
        }
        // A short MAP body on an error: 24 + 12 bytes (the nonce only).
        let partial = concat(&[&pcp_response_header(0x81, 3, [0; 4], [0; 4]), &NONCE]);
        let Ok(Reply::Pcp(reply)) = parse_reply(&partial) else { panic!("short error refused") };
        assert_eq!((reply.result, reply.body), (PcpResult::MalformedRequest, PcpBody::Other));
    }

    #[test]
    fn a_pcp_error_with_the_request_copied_back_is_decoded() {
        // USER_EX_QUOTA with the request's MAP data copied back and the PREFER_FAILURE option.
        let refused = concat(&[
            &pcp_response_header(0x81, 10, [0, 0, 0, 30], [0, 0, 0, 99]),
            &pcp_map_data(17, [0x13, 0x88], [0x13, 0x88], UNSPECIFIED_MAPPED),
            &[2, 0, 0, 0],
        ]);
        assert_eq!(
            parse_reply(&refused),
            Ok(Reply::Pcp(PcpResponse {
                version: 2,
                opcode: PCP_OP_MAP,
                result: PcpResult::UserExQuota,
                lifetime_secs: 30,
                epoch_secs: 99,
                body: PcpBody::Map {
                    nonce: NONCE,
                    protocol: Some(Protocol::Udp),
                    internal_port: 5000,
                    assigned_external_port: 5000,
                    assigned_external_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                },
            }))
        );
    }

    #[test]
    fn other_pcp_opcodes_are_decoded_without_a_body() {
        // A PEER response (opcode 2, 56 bytes of opcode data) and an unassigned opcode.
        let peer = concat(&[&pcp_response_header(0x82, 0, [0, 0, 0, 60], [0, 0, 0, 1]), &[0; 56]]);
        let Ok(Reply::Pcp(reply)) = parse_reply(&peer) else { panic!("PEER response refused") };
        assert_eq!((reply.opcode, reply.body), (2, PcpBody::Other));
        let unassigned = pcp_response_header(0xff, 4, [0; 4], [0; 4]);
        let Ok(Reply::Pcp(reply)) = parse_reply(&unassigned) else { panic!("unassigned opcode refused") };
        assert_eq!((reply.opcode, reply.result, reply.body), (127, PcpResult::UnsuppOpcode, PcpBody::Other));
    }

    #[test]
    fn pcp_options_are_walked_and_unknown_ones_skipped() {
        let with_options = concat(&[
            &pcp_tcp_map_success(),
            &[2, 0, 0, 0],                                           // PREFER_FAILURE, no data
            &[0x80, 0, 0, 5, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0, 0, 0], // unknown optional option, 5 bytes + 3 padding
            &[1, 0, 0, 16],                                          // THIRD_PARTY, an IPv6 address
            &CLIENT_MAPPED,
        ]);
        assert_eq!(with_options.len(), 60 + 4 + 12 + 20);
        assert_eq!(parse_reply(&with_options), parse_reply(&pcp_tcp_map_success()));
        let announce_with_option = concat(&[&pcp_announce(), &[0x81, 0, 0, 4, 1, 2, 3, 4]]);
        assert_eq!(parse_reply(&announce_with_option), parse_reply(&pcp_announce()));
        // The longest message: one option filling it to exactly 1100 bytes.
        let longest = concat(&[&pcp_announce(), &[0x80, 0, 0x04, 0x30], &[0; 1072]]);
        assert_eq!(longest.len(), PCP_MAX_MESSAGE);
        assert_eq!(parse_reply(&longest), parse_reply(&pcp_announce()));
    }

    #[test]
    fn pcp_errors_name_what_is_wrong() {
        let header = pcp_announce();
        let truncated_option = concat(&[&pcp_tcp_map_success(), &[0x80, 0, 0, 8, 1, 2, 3, 4]]);
        let padding_past_the_end = concat(&[&pcp_announce(), &[0x80, 0, 0, 5, 1, 2, 3, 4]]);
        let huge_option_length = concat(&[&pcp_announce(), &[0x80, 0, 0xff, 0xff]]);
        let too_long = concat(&[&pcp_announce(), &[0x80, 0, 0x04, 0x34], &[0; 1076]]);
        let map_success = pcp_tcp_map_success();
        let mut request = pcp_announce();
        request[1] = PCP_OP_MAP; // R bit clear: a request, e.g. another client's, or our own looped back
        let cases: Vec<(&[u8], WireError)> = vec![
            (&header[..23], WireError::TooShort(23, "PCP response header")),
            (&header[..2], WireError::TooShort(2, "PCP response header")),
            (&[2], WireError::TooShort(1, "NAT-PMP or PCP reply")),
            (&request, WireError::NotAResponse(PCP_OP_MAP)),
            (&request[..2], WireError::NotAResponse(PCP_OP_MAP)),
            (&map_success[..59], WireError::NotMultipleOfFour(59)),
            (&map_success[..26], WireError::NotMultipleOfFour(26)),
            (&too_long, WireError::TooLong(1104, "PCP message")),
            // A successful MAP must say what was mapped.
            (&map_success[..56], WireError::TooShort(56, "PCP MAP success response")),
            (&map_success[..24], WireError::TooShort(24, "PCP MAP success response")),
            (&truncated_option, WireError::MalformedOption("option data runs past the end of the message")),
            (&padding_past_the_end, WireError::MalformedOption("option data runs past the end of the message")),
            (&huge_option_length, WireError::MalformedOption("option data runs past the end of the message")),
        ];
        for (packet, expected) in &cases {
            assert_eq!(parse_reply(packet).as_ref(), Err(expected), "{} bytes: {packet:02x?}", packet.len());
        }
        assert_eq!(
            parse_reply(&map_success[..59]).unwrap_err().to_string(),
            "a PCP message of 59 bytes is not a multiple of 4"
        );
    }

    #[test]
    fn unknown_versions_are_refused() {
        for version in [3, 4, 0x7f, 0xff] {
            let mut packet = pcp_announce();
            packet[0] = version;
            assert_eq!(parse_reply(&packet), Err(WireError::UnknownVersion(version)));
            assert_eq!(parse_reply(&packet[..2]), Err(WireError::UnknownVersion(version)));
        }
        assert_eq!(WireError::UnknownVersion(3).to_string(), "unknown protocol version 3");
        assert_eq!(WireError::NotAResponse(1).to_string(), "not a response (opcode byte 0x01)");
    }

    // ---- result codes ----

    #[test]
    fn result_codes_round_trip_and_name_the_rfc_codes() {
        for code in 0..=u16::MAX {
            assert_eq!(NatPmpResult::from_code(code).code(), code);
            assert_eq!(matches!(NatPmpResult::from_code(code), NatPmpResult::Other(_)), code > 5, "{code}");
        }
        for code in 0..=u8::MAX {
            assert_eq!(PcpResult::from_code(code).code(), code);
            assert_eq!(matches!(PcpResult::from_code(code), PcpResult::Other(_)), code > 13, "{code}");
        }
        let natpmp_meanings: Vec<_> = (0..=6).map(|code| NatPmpResult::from_code(code).meaning()).collect();
        assert_eq!(
            natpmp_meanings[..6],
            [
                "success",
                "unsupported version",
                "not authorized/refused",
                "network failure",
                "out of resources",
                "unsupported opcode"
            ]
        );
        let pcp_names = [
            "SUCCESS",
            "UNSUPP_VERSION",
            "NOT_AUTHORIZED",
            "MALFORMED_REQUEST",
            "UNSUPP_OPCODE",
            "UNSUPP_OPTION",
            "MALFORMED_OPTION",
            "NETWORK_FAILURE",
            "NO_RESOURCES",
            "UNSUPP_PROTOCOL",
            "USER_EX_QUOTA",
            "CANNOT_PROVIDE_EXTERNAL",
            "ADDRESS_MISMATCH",
            "EXCESSIVE_REMOTE_PEERS",
        ];
        for (code, name) in pcp_names.iter().enumerate() {
            let meaning = PcpResult::from_code(code as u8).meaning();
            assert!(meaning.starts_with(&format!("{name}: ")), "{code}: {meaning}");
        }
        assert_eq!(NatPmpResult::UnsupportedOpcode.to_string(), "NAT-PMP result 5 (unsupported opcode)");
        assert_eq!(NatPmpResult::Other(77).code(), 77);
        assert!(NatPmpResult::Other(77).to_string().starts_with("NAT-PMP result 77 ("));
        assert_eq!(
            PcpResult::UserExQuota.to_string(),
            "PCP result 10 USER_EX_QUOTA: this host has too many mappings on the gateway"
        );
        assert_eq!(
            PcpResult::AddressMismatch.meaning(),
            "ADDRESS_MISMATCH: the gateway saw a different source address than the client address in the request: \
             another NAT sits between this host and the gateway"
        );
        assert!(PcpResult::Other(200).to_string().starts_with("PCP result 200 "));
    }

    // ---- properties ----

    /// xorshift64: deterministic values without a dependency.
    struct Values(u64);
    impl Values {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Ports and lifetimes at the edges, then pseudo-random ones.
    fn ports_and_lifetimes() -> Vec<(u16, u16, u32)> {
        let mut cases = vec![(0, 0, 0), (1, 1, 1), (u16::MAX, u16::MAX, u32::MAX), (0x00ff, 0xff00, 0x00ff_ff00)];
        let mut values = Values(0x9e37_79b9_7f4a_7c15);
        cases.extend((0..2000).map(|_| {
            let v = values.next();
            (v as u16, (v >> 16) as u16, (v >> 32) as u32)
        }));
        cases
    }

    /// What a NAT-PMP server does with a map request (RFC 6886 §3.3): opcode + 128, result and epoch,
    /// the internal port echoed, the suggested port and lifetime granted as asked.
    fn natpmp_server_grants(request: &[u8], epoch: [u8; 4]) -> Vec<u8> {
        concat(&[&[0, request[1] + 128, 0, 0], &epoch, &request[4..12]])
    }

    /// What a PCP server does with a MAP request (RFC 6887 §11): R bit set, result, lifetime granted
    /// as asked, epoch, reserved where the client address was, MAP data echoed with the external port
    /// and address it assigned, options copied back.
    fn pcp_server_grants(request: &[u8], epoch: [u8; 4], external_address: [u8; 16]) -> Vec<u8> {
        concat(&[
            &[request[0], request[1] | 0x80, 0, 0],
            &request[4..8],
            &epoch,
            &[0; 12],
            &request[24..44],
            &external_address,
            &request[60..],
        ])
    }

    #[test]
    fn what_is_asked_for_comes_back_through_a_server_that_grants_it() {
        let mut values = Values(7);
        for (internal_port, external_port, lifetime_secs) in ports_and_lifetimes() {
            let epoch = (values.next() as u32).to_be_bytes();
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let request = NatPmpRequest::Map {
                    protocol,
                    internal_port,
                    suggested_external_port: external_port,
                    lifetime_secs,
                };
                let reply = parse_reply(&natpmp_server_grants(&request.encode(), epoch));
                assert_eq!(
                    reply,
                    Ok(Reply::NatPmp(NatPmpResponse {
                        opcode: request.opcode(),
                        result: NatPmpResult::Success,
                        epoch_secs: u32::from_be_bytes(epoch),
                        body: NatPmpBody::Map { protocol, internal_port, external_port, lifetime_secs },
                    }))
                );

                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&values.next().to_be_bytes());
                let suggested = Ipv4Addr::from(values.next() as u32);
                let request = PcpMapRequest {
                    nonce,
                    protocol,
                    internal_port,
                    suggested_external_port: external_port,
                    suggested_external_ip: Some(suggested.into()),
                    lifetime_secs,
                    client_ip: CLIENT.into(),
                    prefer_failure: internal_port % 2 == 0,
                };
                let reply =
                    parse_reply(&pcp_server_grants(&request.encode(), epoch, suggested.to_ipv6_mapped().octets()));
                assert_eq!(
                    reply,
                    Ok(Reply::Pcp(PcpResponse {
                        version: PCP_VERSION,
                        opcode: PCP_OP_MAP,
                        result: PcpResult::Success,
                        lifetime_secs,
                        epoch_secs: u32::from_be_bytes(epoch),
                        body: PcpBody::Map {
                            nonce,
                            protocol: Some(protocol),
                            internal_port,
                            assigned_external_port: external_port,
                            assigned_external_ip: IpAddr::V4(suggested),
                        },
                    }))
                );
            }
        }
    }

    fn valid_replies() -> Vec<Vec<u8>> {
        vec![
            NATPMP_EXTERNAL_ADDRESS_REPLY.to_vec(),
            NATPMP_TCP_MAP_REPLY.to_vec(),
            NATPMP_UDP_MAP_REPLY.to_vec(),
            NATPMP_TCP_MAP_NETWORK_FAILURE.to_vec(),
            NATPMP_UDP_MAP_REFUSED_WITH_BODY.to_vec(),
            NATPMP_UNSUPPORTED_VERSION_TO_PCP_MAP.to_vec(),
            pcp_tcp_map_success(),
            concat(&[&pcp_tcp_map_success(), &[2, 0, 0, 0], &[0x80, 0, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0]]),
            pcp_announce(),
            pcp_unsupp_version(1),
            pcp_unsupp_version(2),
        ]
    }

    #[test]
    fn no_prefix_truncation_or_mutation_of_a_valid_reply_panics() {
        let mut parsed = 0usize;
        let mut check = |packet: &[u8]| {
            let outcome = parse_reply(packet);
            // Whatever is accepted respects the size rules of its protocol.
            match outcome {
                Ok(Reply::NatPmp(_)) => assert!((8..=16).contains(&packet.len()), "{packet:02x?}"),
                Ok(Reply::Pcp(_)) => {
                    assert!(packet.len() >= 24 && packet.len() <= PCP_MAX_MESSAGE && packet.len().is_multiple_of(4))
                }
                Err(_) => {}
            }
            parsed += 1;
        };
        for valid in valid_replies() {
            assert!(parse_reply(&valid).is_ok(), "{valid:02x?}");
            for end in 0..=valid.len() {
                check(&valid[..end]);
                check(&valid[end..]);
            }
            for at in 0..valid.len() {
                let mut mutated = valid.clone();
                for byte in 0..=u8::MAX {
                    mutated[at] = byte;
                    check(&mutated);
                }
                // Two bytes at once reach option lengths and version/opcode combinations.
                for other in 0..valid.len() {
                    let mut mutated = valid.clone();
                    mutated[at] ^= 0xff;
                    mutated[other] = mutated[other].wrapping_add(0x81);
                    check(&mutated);
                }
            }
            for extra in [1, 2, 3, 4, 8, 12, 1100] {
                for fill in [0x00, 0x04, 0xff] {
                    let mut longer = valid.clone();
                    longer.extend(std::iter::repeat_n(fill, extra));
                    check(&longer);
                }
            }
        }
        let mut values = Values(0xdead_beef);
        for _ in 0..20_000 {
            let len = (values.next() % 140) as usize;
            let mut packet: Vec<u8> = (0..len).map(|_| values.next() as u8).collect();
            if let Some(first) = packet.first_mut() {
                *first %= 4; // mostly the versions that get past the dispatch
            }
            if let Some(second) = packet.get_mut(1) {
                *second |= 0x80;
            }
            check(&packet);
        }
        assert!(parsed > 100_000);
    }
}
