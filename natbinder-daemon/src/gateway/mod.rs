//! Talking to the LAN gateway. The reconciler drives a [`session::GatewaySession`] per discovered
//! gateway, over any [`Gateway`]; each protocol lives in its own modules so that the table and the
//! reconciler never see wire details:
//! * UPnP IGD: [`igd`] (through igd-next), [`igd_soap`] (the calls igd-next lacks), [`ssdp_notify`];
//! * NAT-PMP and PCP: [`pmp_wire`] (the packets), [`pmp_client`] (one exchange at a time with
//!   retransmission, the epoch rule), [`natpmp`] and [`pcp`] (the mapping calls);
//! * [`select`]: which of them serves, probed side by side;
//! * [`session`]: what natbinder learned about one gateway (external address, permanent leases only,
//!   a NAT in between);
//! * [`signals`]: the one channel for every sign that the gateway changed or lost its state, fed by
//!   [`announcements`] (SSDP and NAT-PMP/PCP, over [`multicast`]), the epoch rule and the host's
//!   network watcher.
pub mod announcements;
pub mod igd;
pub mod igd_pinhole;
pub mod igd_soap;
pub mod multicast;
pub mod natpmp;
pub mod pcp;
pub mod pmp_client;
pub mod pmp_wire;
pub mod select;
pub mod session;
pub mod signals;
pub mod ssdp_notify;

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

pub use select::Backend;

use crate::{
    host::lan6::Ipv6Router,
    table::{PinholeKey, PinholeService},
    Protocol,
};

/// One port mapping natbinder asks for: external port = internal port, a finite lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingRequest {
    pub protocol: Protocol,
    pub port: u16,
    pub internal_client: Ipv4Addr,
    pub lease: Duration,
    pub description: String,
    /// Keep a mapping on another external port if that is what the gateway grants (NAT-PMP, PCP;
    /// VPN providers choose the port themselves), rather than delete it.
    pub accept_other_port: bool,
}

/// One entry of the gateway's table, whoever made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayEntry {
    pub protocol: Protocol,
    pub external_port: u16,
    /// As the gateway reports it: usually a dotted quad, sometimes a host name.
    pub internal_client: String,
    pub internal_port: u16,
    pub description: String,
    pub lease_secs: u32,
    pub enabled: bool,
}

impl GatewayEntry {
    pub fn internal_ipv4(&self) -> Option<Ipv4Addr> {
        self.internal_client.parse().ok()
    }
}

/// Why an add failed, in the terms the reconciler acts on.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The port is held by another host (IGD 718 ConflictInMappingEntry).
    #[error("the port is already mapped on the gateway to another host")]
    Conflict,
    /// The gateway (NAT-PMP, PCP) granted another external port than asked: someone else holds the
    /// port. The offer has been deleted: natbinder keeps external = internal, or nothing.
    #[error("the gateway offered external port {offered} instead: another host holds the port")]
    OtherPortOffered { offered: u16 },
    /// The gateway cannot be reached any more (connection refused, timeout): rediscover it.
    #[error("the gateway did not answer: {0}")]
    Unreachable(String),
    /// The gateway refuses leases (IGD 725 OnlyPermanentLeasesSupported, or 402 Invalid Args on a
    /// leased add): a permanent mapping may be asked for instead, with care.
    #[error("the gateway accepts only permanent mappings: {0}")]
    PermanentOnly(String),
    /// The gateway's table is full (IGD 728 NoPortMapsAvailable); retried with backoff.
    #[error("the gateway has no room for more mappings: {0}")]
    NoResources(String),
    /// The gateway does not let this host map (IGD 606, e.g. miniupnpd's secure mode or allow rules).
    #[error("the gateway does not allow this mapping: {0}")]
    NotAuthorized(String),
    /// The gateway saw this host's requests come from another address than the host's own: another
    /// NAT sits between this host and the gateway (PCP ADDRESS_MISMATCH). Retried with backoff.
    #[error("another NAT sits between this host and the gateway: {0}")]
    BehindAnotherNat(String),
    /// The gateway answered with another refusal; retried with backoff.
    #[error("the gateway refused the mapping: {0}")]
    Refused(String),
    /// The protocol cannot do this at all (NAT-PMP and PCP cannot list the gateway's table).
    #[error("{0}")]
    Unsupported(&'static str),
    /// The gateway no longer holds it (a pinhole's UniqueID it does not know: IGD 704 NoSuchEntry).
    #[error("the gateway no longer holds it: {0}")]
    Gone(String),
}

/// One IPv6 pinhole natbinder asks for: inbound `key.protocol` traffic to `key.address`:`key.port`
/// from anywhere, asked of `router` from `key.address` (gateways open pinholes only for the host
/// that asks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinholeRequest {
    pub key: PinholeKey,
    pub lease: Duration,
    pub router: Ipv6Router,
}

/// What the gateway granted for a pinhole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenedPinhole {
    pub lease: Duration,
    /// How the gateway names it from now on (IGD's UniqueID), where it names it by anything else
    /// than what it opens.
    pub id: Option<u16>,
}

/// What the gateway granted for an add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The lease it will keep the mapping for; zero for a permanent mapping. NAT-PMP and PCP gateways
    /// may grant less than asked (VPN gateways often grant 60 s): renewals follow what was granted.
    pub lease: Duration,
    /// The external address, where the answer tells it (PCP's MAP does).
    pub external_address: Option<IpAddr>,
    /// The external port, when the gateway chose another than asked and the request accepted it.
    pub external_port: Option<u16>,
}

impl Granted {
    pub fn lease(lease: Duration) -> Self {
        Self { lease, external_address: None, external_port: None }
    }
}

/// A gateway that maps ports. Implementations must bound every call in time.
pub trait Gateway: Send + Sync + 'static {
    /// Short human description for logs, e.g. "UPnP IGD at 192.168.1.1:5000".
    fn describe(&self) -> String;
    /// The protocol it speaks, for logs and status.
    fn backend(&self) -> Backend;
    /// Whether the gateway's table can be read ([`Gateway::list`] or [`Gateway::lookup`]). Without it
    /// (NAT-PMP, PCP) a mapping is checked by renewing it, a restart is seen in the epoch, and ports
    /// other hosts hold are learned when an add is refused.
    fn can_read_table(&self) -> bool {
        true
    }
    /// Whether a protocol preferred to this one now answers at the same gateway (asked at each periodic
    /// check): a NAT-PMP gateway that once answered "PCP unsupported" may have learned PCP.
    fn preferred_protocol_answers(&self) -> impl Future<Output = bool> + Send {
        std::future::ready(false)
    }
    /// Checks what an announcement from this gateway tells of its state (the epoch rule, for NAT-PMP
    /// and PCP). Some(why) when it lost its mappings.
    fn observe_announcement(&self, _announcement: &signals::Announcement) -> Option<String> {
        None
    }
    fn add(&self, request: &MappingRequest) -> impl Future<Output = Result<Granted, AddError>> + Send;
    /// Deleting a mapping that is not there is success.
    fn delete(&self, protocol: Protocol, port: u16) -> impl Future<Output = Result<(), AddError>> + Send;
    /// The whole table, as far as the gateway lets this host see it.
    fn list(&self) -> impl Future<Output = Result<Vec<GatewayEntry>, AddError>> + Send;
    /// The entry for one external port, for gateways whose table cannot be listed. None: not mapped.
    fn lookup(
        &self,
        protocol: Protocol,
        port: u16,
    ) -> impl Future<Output = Result<Option<GatewayEntry>, AddError>> + Send;
    /// The gateway's external address. Ok(None) when the protocol tells it only with a mapping (PCP):
    /// the call then only checks that the gateway is there and still has its state.
    fn external_address(&self) -> impl Future<Output = Result<Option<IpAddr>, AddError>> + Send;
    /// Whether [::] listeners need pinholes on this gateway, and whether it can open them: asked at
    /// the start of a session and at each periodic check, from `from` (an address of this host that
    /// pinholes would be opened for) to `router`.
    fn pinhole_service(
        &self,
        _router: Ipv6Router,
        _from: std::net::Ipv6Addr,
    ) -> impl Future<Output = PinholeService> + Send {
        let why = format!("{} cannot open IPv6 pinholes", self.backend());
        std::future::ready(PinholeService::Unavailable { why })
    }
    fn open_pinhole(&self, _request: &PinholeRequest) -> impl Future<Output = Result<OpenedPinhole, AddError>> + Send {
        std::future::ready(Err(AddError::Unsupported("this protocol cannot open IPv6 pinholes")))
    }
    /// Extends a pinhole's lease. [`AddError::Gone`] when the gateway no longer holds it.
    fn renew_pinhole(
        &self,
        _request: &PinholeRequest,
        _id: Option<u16>,
    ) -> impl Future<Output = Result<OpenedPinhole, AddError>> + Send {
        std::future::ready(Err(AddError::Unsupported("this protocol cannot open IPv6 pinholes")))
    }
    /// Closing a pinhole that is not there is success.
    fn close_pinhole(
        &self,
        _request: &PinholeRequest,
        _id: Option<u16>,
    ) -> impl Future<Output = Result<(), AddError>> + Send {
        std::future::ready(Err(AddError::Unsupported("this protocol cannot open IPv6 pinholes")))
    }
}
