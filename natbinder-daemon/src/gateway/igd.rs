//! UPnP IGD through igd-next: SSDP discovery restricted to the default gateway, and the mapping calls
//! translated into [`AddError`]s the reconciler understands. IPv6 pinholes go through
//! [`igd_pinhole`] to the WANIPv6FirewallControl service igd-next finds in the description, sent to
//! the IPv6 router from the address each pinhole opens.
use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    time::Duration,
};

use igd_next::{
    aio::{tokio::Tokio, Gateway as IgdNext},
    AddPortError, GetGenericPortMappingEntryError, PortMappingProtocol, RemovePortError, RequestError, SearchOptions,
};

use super::{
    igd_pinhole::{self, PinholeEndpoint, PinholeFault},
    igd_soap::{self, PortListingQuery, SoapError},
    AddError, Backend, Gateway, GatewayEntry, Granted, MappingRequest, OpenedPinhole, PinholeRequest,
};
use crate::{
    host::{lan::LanInfo, lan6::Ipv6Router},
    table::PinholeService,
    Protocol,
};

/// Time allowed for one SOAP call. A gateway on the LAN answers in milliseconds; igd-next's own limit
/// is 10 s, which would hold every other mapping back that long behind a gateway that went silent.
const SOAP_TIMEOUT: Duration = Duration::from_secs(3);

/// Bounds a gateway call in time; running out means the gateway is not answering.
async fn bounded<T>(call: impl std::future::Future<Output = Result<T, AddError>>) -> Result<T, AddError> {
    tokio::time::timeout(SOAP_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(AddError::Unreachable(format!("no answer within {SOAP_TIMEOUT:?}"))))
}

/// Upper bound on the entries read from a gateway's table, so a broken gateway cannot keep us listing.
const MAX_LISTED_ENTRIES: u32 = 4096;

pub struct IgdGateway {
    inner: IgdNext<Tokio>,
}

impl IgdGateway {
    /// Finds the IGD over SSDP, sending from this host's LAN address. The search goes first to the
    /// default gateway alone (unicast M-SEARCH, UPnP 1.1), so no other LAN device is even asked; gateways
    /// that answer only multicast searches get one next. Only a device at the default gateway's address
    /// is accepted either way: a LAN host answering SSDP cannot redirect our mappings.
    pub async fn discover(lan: &LanInfo, timeout: Duration) -> Result<Self, String> {
        let search = |target: SocketAddr, wait: Duration| {
            let mut options = SearchOptions::default();
            options.bind_addr = SocketAddr::new(IpAddr::V4(lan.local), 0);
            options.broadcast_address = target;
            options.timeout = Some(wait);
            options.single_search_timeout = Some(wait);
            igd_next::aio::tokio::search_gateway(options)
        };
        let unicast_wait = (timeout / 3).max(Duration::from_millis(300));
        let unicast = match ssdp_precheck(lan, unicast_wait).await {
            SsdpPrecheck::PortUnreachable => {
                return Err(format!(
                    "the gateway {} runs no SSDP server (ICMP port unreachable on port 1900)",
                    lan.gateway
                ))
            }
            SsdpPrecheck::Answered => search(SocketAddr::new(IpAddr::V4(lan.gateway), 1900), unicast_wait).await,
            SsdpPrecheck::Silent => Err(igd_next::SearchError::NoResponseWithinTimeout),
        };
        let found = match unicast {
            Ok(found) => found,
            Err(_) => search("239.255.255.250:1900".parse().unwrap(), timeout)
                .await
                .map_err(|e| format!("no UPnP IGD answered SSDP from {} within {timeout:?}: {e}", lan.local))?,
        };
        if found.addr.ip() != IpAddr::V4(lan.gateway) {
            return Err(format!(
                "ignoring the UPnP IGD at {}: it is not the default gateway {}",
                found.addr, lan.gateway
            ));
        }
        Ok(Self { inner: found })
    }
}

enum SsdpPrecheck {
    /// ICMP port unreachable: nothing listens for SSDP on the gateway (UPnP turned off, while NAT-PMP
    /// or PCP may answer). No need to wait out a multicast search.
    PortUnreachable,
    /// The gateway answers unicast searches.
    Answered,
    /// No answer: it may answer only multicast searches.
    Silent,
}

/// One unicast M-SEARCH to the gateway from a connected socket, which is what sees an ICMP error.
async fn ssdp_precheck(lan: &LanInfo, wait: Duration) -> SsdpPrecheck {
    let search = format!(
        "M-SEARCH * HTTP/1.1\r\nHOST: {}:1900\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\
         MAN: \"ssdp:discover\"\r\nMX: 1\r\n\r\n",
        lan.gateway
    );
    let refused = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionRefused;
    let Ok(socket) = tokio::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(lan.local), 0)).await else {
        return SsdpPrecheck::Answered;
    };
    if socket.connect(SocketAddr::new(IpAddr::V4(lan.gateway), 1900)).await.is_err() {
        return SsdpPrecheck::Answered;
    }
    if let Err(e) = socket.send(search.as_bytes()).await {
        return if refused(&e) { SsdpPrecheck::PortUnreachable } else { SsdpPrecheck::Answered };
    }
    let mut buf = [0u8; 2048];
    match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
        Ok(Err(e)) if refused(&e) => SsdpPrecheck::PortUnreachable,
        Ok(_) => SsdpPrecheck::Answered,
        Err(_) => SsdpPrecheck::Silent,
    }
}

fn igd_protocol(p: Protocol) -> PortMappingProtocol {
    match p {
        Protocol::Tcp => PortMappingProtocol::TCP,
        Protocol::Udp => PortMappingProtocol::UDP,
    }
}

/// Transport failures mean the gateway is gone or moved (miniupnpd picks a new port when it restarts).
fn request_error(e: RequestError) -> AddError {
    match e {
        RequestError::ErrorCode(code, text) => AddError::Refused(format!("UPnP error {code} {text}")),
        RequestError::UnsupportedAction(a) => AddError::Refused(format!("the gateway does not support {a}")),
        RequestError::InvalidResponse(r) => AddError::Refused(format!("invalid response: {r}")),
        other => AddError::Unreachable(other.to_string()),
    }
}

impl Gateway for IgdGateway {
    fn describe(&self) -> String {
        format!("UPnP IGD at {} ({})", self.inner.addr, self.inner.service_type)
    }

    fn backend(&self) -> Backend {
        Backend::Upnp
    }

    async fn add(&self, request: &MappingRequest) -> Result<Granted, AddError> {
        let local = SocketAddr::new(IpAddr::V4(request.internal_client), request.port);
        // IGDv2 caps leases at a week; 0 asks for a permanent mapping.
        let lease = request.lease.as_secs().clamp(1, 604_800) as u32;
        let lease = if request.lease.is_zero() { 0 } else { lease };
        let add = self.inner.add_port(igd_protocol(request.protocol), request.port, local, lease, &request.description);
        bounded(async {
            add.await.map(|()| Granted::lease(request.lease)).map_err(|e| match e {
                AddPortError::PortInUse => AddError::Conflict,
                AddPortError::OnlyPermanentLeasesSupported => AddError::PermanentOnly("UPnP error 725".into()),
                AddPortError::ActionNotAuthorized => AddError::NotAuthorized("UPnP error 606".into()),
                AddPortError::SamePortValuesRequired => {
                    AddError::Refused("UPnP error 724 SamePortValuesRequired".into())
                }
                AddPortError::DescriptionTooLong => AddError::Refused("UPnP error 605 description too long".into()),
                // Some IGDv1 routers answer 402 Invalid Args to any lease but 0.
                AddPortError::RequestError(RequestError::ErrorCode(402, text)) if lease != 0 => {
                    AddError::PermanentOnly(format!("UPnP error 402 {text} to a leased mapping"))
                }
                AddPortError::RequestError(RequestError::ErrorCode(728, text)) => {
                    AddError::NoResources(format!("UPnP error 728 {text}"))
                }
                AddPortError::RequestError(e) => request_error(e),
                other => AddError::Refused(other.to_string()),
            })
        })
        .await
    }

    async fn delete(&self, protocol: Protocol, port: u16) -> Result<(), AddError> {
        bounded(async {
            match self.inner.remove_port(igd_protocol(protocol), port).await {
                Ok(()) | Err(RemovePortError::NoSuchPortMapping) => Ok(()),
                Err(RemovePortError::RequestError(e)) => Err(request_error(e)),
                Err(other) => Err(AddError::Refused(other.to_string())),
            }
        })
        .await
    }

    async fn list(&self) -> Result<Vec<GatewayEntry>, AddError> {
        // IGDv2 lists the whole table in one call per protocol; IGDv1 (and v2 gateways that fail the
        // call) are read entry by entry.
        if self.inner.service_type.ends_with(":2") {
            match self.list_in_one_call().await {
                Ok(entries) => return Ok(entries),
                Err(AddError::Unreachable(e)) => return Err(AddError::Unreachable(e)),
                Err(e) => tracing::debug!("GetListOfPortMappings failed ({e}); reading entries one by one"),
            }
        }
        self.list_entry_by_entry().await
    }

    async fn lookup(&self, protocol: Protocol, port: u16) -> Result<Option<GatewayEntry>, AddError> {
        Ok(igd_soap::get_specific_port_mapping_entry(&self.inner, protocol, port, SOAP_TIMEOUT).await?)
    }

    async fn external_address(&self) -> Result<Option<IpAddr>, AddError> {
        bounded(async {
            self.inner.get_external_ip().await.map(Some).map_err(|e| match e {
                igd_next::GetExternalIpError::RequestError(e) => request_error(e),
                other => AddError::Refused(other.to_string()),
            })
        })
        .await
    }

    async fn pinhole_service(&self, router: Ipv6Router, from: Ipv6Addr) -> PinholeService {
        let endpoint = match self.pinhole_endpoint(router, from) {
            Ok(endpoint) => endpoint,
            Err(e) => return PinholeService::Unavailable { why: e.to_string() },
        };
        match igd_pinhole::get_firewall_status(&endpoint, SOAP_TIMEOUT).await {
            Ok(status) if !status.firewall_enabled => PinholeService::FirewallOpen,
            Ok(status) if !status.inbound_pinhole_allowed => PinholeService::Unavailable {
                why: "the gateway's IPv6 firewall allows no inbound pinholes (InboundPinholeAllowed is 0): \
                      turn UPnP pinholes on in the router's settings"
                    .into(),
            },
            Ok(_) => PinholeService::Needed,
            Err(e) => PinholeService::Unavailable { why: format!("asking {endpoint} for its firewall status: {e}") },
        }
    }

    async fn open_pinhole(&self, request: &PinholeRequest) -> Result<OpenedPinhole, AddError> {
        let key = request.key;
        let endpoint = self.pinhole_endpoint(request.router, key.address).map_err(AddError::from)?;
        let id = igd_pinhole::add_pinhole(&endpoint, key.protocol, key.port, request.lease, SOAP_TIMEOUT).await?;
        Ok(OpenedPinhole { lease: request.lease, id: Some(id) })
    }

    async fn renew_pinhole(&self, request: &PinholeRequest, id: Option<u16>) -> Result<OpenedPinhole, AddError> {
        // Without the id the gateway named it by (lost with a journal write), it can only be opened
        // again: the gateway answers with the id it has for it, or a new pinhole.
        let Some(id) = id else { return self.open_pinhole(request).await };
        let endpoint = self.pinhole_endpoint(request.router, request.key.address).map_err(AddError::from)?;
        match igd_pinhole::update_pinhole(&endpoint, id, request.lease, SOAP_TIMEOUT).await {
            Ok(()) => Ok(OpenedPinhole { lease: request.lease, id: Some(id) }),
            // miniupnpd answers an id it does not know (lost in a restart) with 402, not 704: the
            // request is otherwise well-formed, so 402 means the same.
            Err(e) if e.is_no_such_entry() || e.fault() == Some(PinholeFault::InvalidArgs) => {
                Err(AddError::Gone(e.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn close_pinhole(&self, request: &PinholeRequest, id: Option<u16>) -> Result<(), AddError> {
        // Never named by the gateway (its AddPinhole did not answer): nothing to name it by. Its
        // lease ends it.
        let Some(id) = id else { return Ok(()) };
        let endpoint = self.pinhole_endpoint(request.router, request.key.address).map_err(AddError::from)?;
        match igd_pinhole::delete_pinhole(&endpoint, id, SOAP_TIMEOUT).await {
            Ok(()) => Ok(()),
            // Already gone: miniupnpd's answer to an id it does not know (see renew_pinhole).
            Err(e) if e.fault() == Some(PinholeFault::InvalidArgs) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl IgdGateway {
    /// Where pinhole requests from `from` go: the IPv6 router, on the port the description came from
    /// (miniupnpd serves both families on one port), at the firewall service's control path.
    fn pinhole_endpoint(
        &self,
        router: Ipv6Router,
        from: Ipv6Addr,
    ) -> Result<PinholeEndpoint, igd_pinhole::PinholeError> {
        let control_url = self.inner.ipv6_firewall_control_url.as_deref().ok_or_else(|| {
            igd_pinhole::PinholeError::InvalidRequest(
                "the gateway's UPnP IGD offers no WANIPv6FirewallControl service".into(),
            )
        })?;
        let gateway = SocketAddrV6::new(router.address, self.inner.addr.port(), 0, router.scope_id());
        PinholeEndpoint::new(from, gateway, self.inner.addr.ip(), control_url)
    }

    async fn list_in_one_call(&self) -> Result<Vec<GatewayEntry>, AddError> {
        let mut entries = Vec::new();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let query = PortListingQuery {
                protocol,
                start_port: 1,
                end_port: u16::MAX,
                max_entries: igd_soap::MAX_LISTED_ENTRIES as u16,
            };
            match igd_soap::get_list_of_port_mappings(&self.inner, &query, SOAP_TIMEOUT).await {
                Ok(mut listed) => entries.append(&mut listed),
                // 714 NoSuchEntryInArray / 730 PortMappingNotFound: nothing of this protocol.
                Err(SoapError::Upnp { code, .. })
                    if code == igd_soap::UPNP_NO_SUCH_ENTRY_IN_ARRAY
                        || code == igd_soap::UPNP_PORT_MAPPING_NOT_FOUND => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(entries)
    }

    async fn list_entry_by_entry(&self) -> Result<Vec<GatewayEntry>, AddError> {
        let mut entries = Vec::new();
        for index in 0..MAX_LISTED_ENTRIES {
            let Ok(answer) = tokio::time::timeout(SOAP_TIMEOUT, self.inner.get_generic_port_mapping_entry(index)).await
            else {
                return Err(AddError::Unreachable(format!("no answer within {SOAP_TIMEOUT:?}")));
            };
            match answer {
                Ok(e) => entries.push(GatewayEntry {
                    protocol: match e.protocol {
                        PortMappingProtocol::TCP => Protocol::Tcp,
                        PortMappingProtocol::UDP => Protocol::Udp,
                    },
                    external_port: e.external_port,
                    internal_client: e.internal_client,
                    internal_port: e.internal_port,
                    description: e.port_mapping_description,
                    lease_secs: e.lease_duration,
                    enabled: e.enabled,
                }),
                Err(GetGenericPortMappingEntryError::SpecifiedArrayIndexInvalid) => break,
                // Some gateways end the list with 714 NoSuchEntryInArray or another code instead of 713.
                Err(GetGenericPortMappingEntryError::RequestError(RequestError::ErrorCode(_, _))) if index > 0 => break,
                Err(GetGenericPortMappingEntryError::RequestError(e)) => return Err(request_error(e)),
                Err(other) => return Err(AddError::Refused(other.to_string())),
            }
        }
        Ok(entries)
    }
}
