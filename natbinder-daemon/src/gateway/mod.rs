//! Talking to the LAN gateway. The reconciler drives any [`Gateway`]; each protocol lives in its own
//! module (UPnP IGD in [`igd`]; NAT-PMP and PCP later) so that the table and reconciler never see wire
//! details.
pub mod igd;
pub mod igd_soap;
pub mod ssdp_notify;

use std::{future::Future, net::Ipv4Addr, time::Duration};

use crate::Protocol;

/// One port mapping natbinder asks for: external port = internal port, a finite lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappingRequest {
    pub protocol: Protocol,
    pub port: u16,
    pub internal_client: Ipv4Addr,
    pub lease: Duration,
    pub description: String,
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
    /// The gateway answered with another refusal; retried with backoff.
    #[error("the gateway refused the mapping: {0}")]
    Refused(String),
}

/// A gateway that maps ports. Implementations must bound every call in time.
pub trait Gateway: Send + Sync + 'static {
    /// Short human description for logs, e.g. "UPnP IGD at 192.168.1.1:5000".
    fn describe(&self) -> String;
    fn add(&self, request: &MappingRequest) -> impl Future<Output = Result<(), AddError>> + Send;
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
    fn external_address(&self) -> impl Future<Output = Result<std::net::IpAddr, AddError>> + Send;
}
