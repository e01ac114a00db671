//! Which protocol serves: UPnP IGD, PCP or NAT-PMP, probed side by side at start and whenever the
//! gateway has to be found again (network change, the serving protocol stopped answering).
//!
//! The SSDP search and the port-5351 probe run at the same time. On port 5351 the probes go one after
//! the other, because a gateway gets one request at a time: PCP's ANNOUNCE first (a NAT-PMP-only
//! gateway answers it "unsupported version"), then NAT-PMP's external-address request, in the
//! configured order. The first protocol in the order that answers is used, without waiting for the
//! probes of protocols ranked below it. Nothing is cached between searches: a gateway that answered
//! "unsupported version" to PCP is asked again next time.
use std::{fmt, net::IpAddr, time::Duration};

use tokio::time::Instant;

use super::{
    igd::IgdGateway,
    natpmp::NatPmpGateway,
    pcp::{NonceKey, PcpGateway},
    pmp_client::PmpClient,
    signals::{Announcement, SignalSender},
    AddError, Gateway, GatewayEntry, Granted, MappingRequest, OpenedPinhole, PinholeRequest,
};
use crate::{
    host::{lan::LanInfo, lan6::Ipv6Router},
    table::PinholeService,
    Protocol,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// UPnP IGD (SSDP, SOAP).
    Upnp,
    /// PCP, RFC 6887.
    Pcp,
    /// NAT-PMP, RFC 6886.
    #[value(name = "natpmp")]
    #[serde(rename = "natpmp")]
    NatPmp,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Upnp => "UPnP IGD",
            Backend::Pcp => "PCP",
            Backend::NatPmp => "NAT-PMP",
        })
    }
}

/// UPnP IGD first: only its gateways can list their table, which is what lets a bind of a port
/// another host holds fail with EADDRINUSE before the first attempt to map it. PCP next: nonces,
/// explicit result codes and announced restarts. NAT-PMP last.
pub const DEFAULT_ORDER: [Backend; 3] = [Backend::Upnp, Backend::Pcp, Backend::NatPmp];

/// A gateway speaking whichever protocol was chosen.
pub enum AnyGateway {
    Upnp(IgdGateway),
    Pcp(PcpGateway),
    NatPmp(NatPmpGateway),
}

/// Finds the gateway at `lan.gateway` and the best protocol it answers, by `order` (non-empty), for
/// gateway session `session`: what the NAT-PMP/PCP epoch rule sees goes to `signals`, so tagged.
pub async fn discover(
    lan: &LanInfo,
    order: &[Backend],
    timeout: Duration,
    nonces: &NonceKey,
    signals: &SignalSender,
    session: u64,
) -> Result<AnyGateway, String> {
    let rank = |b: Backend| order.iter().position(|x| *x == b).unwrap_or(usize::MAX);
    let wants_upnp = order.contains(&Backend::Upnp);
    let port_control: Vec<Backend> = order.iter().copied().filter(|b| *b != Backend::Upnp).collect();
    // The best rank the port-5351 probe can still deliver.
    let port_control_rank = port_control.iter().map(|b| rank(*b)).min().unwrap_or(usize::MAX);

    let upnp = async {
        if wants_upnp {
            IgdGateway::discover(lan, timeout).await.map(AnyGateway::Upnp).map_err(|e| format!("UPnP IGD: {e}"))
        } else {
            Err(String::new())
        }
    };
    let deadline = Instant::now() + timeout;
    let pmp = async {
        if port_control.is_empty() {
            Err(String::new())
        } else {
            probe_port_control(lan, &port_control, deadline, nonces, signals, session).await
        }
    };
    tokio::pin!(upnp, pmp);
    let (mut upnp_done, mut pmp_done) = (!wants_upnp, port_control.is_empty());
    let mut best: Option<AnyGateway> = None;
    let mut failures = Vec::new();
    loop {
        if let Some(found) = &best {
            let r = rank(found.backend());
            let better_pending = (!upnp_done && rank(Backend::Upnp) < r) || (!pmp_done && port_control_rank < r);
            if !better_pending {
                return Ok(best.unwrap());
            }
        }
        if upnp_done && pmp_done {
            failures.retain(|f: &String| !f.is_empty());
            return Err(format!("no gateway protocol answered at {}: {}", lan.gateway, failures.join("; ")));
        }
        let found = tokio::select! {
            r = &mut upnp, if !upnp_done => { upnp_done = true; r }
            r = &mut pmp, if !pmp_done => { pmp_done = true; r }
        };
        match found {
            Ok(g) if best.as_ref().is_none_or(|b| rank(g.backend()) < rank(b.backend())) => best = Some(g),
            Ok(_) => {}
            Err(e) => failures.push(e),
        }
    }
}

/// The port-5351 probes, one after the other in `order` (PCP and/or NAT-PMP).
async fn probe_port_control(
    lan: &LanInfo,
    order: &[Backend],
    deadline: Instant,
    nonces: &NonceKey,
    signals: &SignalSender,
    session: u64,
) -> Result<AnyGateway, String> {
    let server = std::net::SocketAddr::from((lan.gateway, super::pmp_wire::SERVER_PORT));
    let mut client = PmpClient::new(lan.local.into(), server, signals.clone(), session)
        .map_err(|e| format!("NAT-PMP/PCP: opening a socket from {} to {}: {e}", lan.local, lan.gateway))?;
    let mut failures = Vec::new();
    for backend in order {
        match backend {
            Backend::Pcp => match PcpGateway::probe(client, nonces.clone(), deadline).await {
                Ok(g) => return Ok(AnyGateway::Pcp(g)),
                Err((c, why)) => {
                    client = c;
                    failures.push(why);
                }
            },
            Backend::NatPmp => match NatPmpGateway::probe(client, deadline).await {
                Ok((g, _)) => {
                    let rank = |b: Backend| order.iter().position(|x| *x == b);
                    let pcp_preferred = rank(Backend::Pcp).is_some_and(|pcp| Some(pcp) < rank(Backend::NatPmp));
                    return Ok(AnyGateway::NatPmp(g.into_serving(pcp_preferred)));
                }
                Err((c, why)) => {
                    client = c;
                    failures.push(why);
                }
            },
            Backend::Upnp => {}
        }
    }
    Err(failures.join("; "))
}

macro_rules! each {
    ($self:ident, $g:ident => $e:expr) => {
        match $self {
            AnyGateway::Upnp($g) => $e,
            AnyGateway::Pcp($g) => $e,
            AnyGateway::NatPmp($g) => $e,
        }
    };
}

impl Gateway for AnyGateway {
    fn describe(&self) -> String {
        each!(self, g => g.describe())
    }

    fn backend(&self) -> Backend {
        each!(self, g => g.backend())
    }

    fn can_read_table(&self) -> bool {
        each!(self, g => g.can_read_table())
    }

    fn observe_announcement(&self, announcement: &Announcement) -> Option<String> {
        each!(self, g => g.observe_announcement(announcement))
    }

    async fn preferred_protocol_answers(&self) -> bool {
        each!(self, g => g.preferred_protocol_answers().await)
    }

    async fn add(&self, request: &MappingRequest) -> Result<Granted, AddError> {
        each!(self, g => g.add(request).await)
    }

    async fn delete(&self, protocol: Protocol, port: u16) -> Result<(), AddError> {
        each!(self, g => g.delete(protocol, port).await)
    }

    async fn list(&self) -> Result<Vec<GatewayEntry>, AddError> {
        each!(self, g => g.list().await)
    }

    async fn lookup(&self, protocol: Protocol, port: u16) -> Result<Option<GatewayEntry>, AddError> {
        each!(self, g => g.lookup(protocol, port).await)
    }

    async fn external_address(&self) -> Result<Option<IpAddr>, AddError> {
        each!(self, g => g.external_address().await)
    }

    async fn pinhole_service(&self, router: Ipv6Router, from: std::net::Ipv6Addr) -> PinholeService {
        each!(self, g => g.pinhole_service(router, from).await)
    }

    async fn open_pinhole(&self, request: &PinholeRequest) -> Result<OpenedPinhole, AddError> {
        each!(self, g => g.open_pinhole(request).await)
    }

    async fn renew_pinhole(&self, request: &PinholeRequest, id: Option<u16>) -> Result<OpenedPinhole, AddError> {
        each!(self, g => g.renew_pinhole(request, id).await)
    }

    async fn close_pinhole(&self, request: &PinholeRequest, id: Option<u16>) -> Result<(), AddError> {
        each!(self, g => g.close_pinhole(request, id).await)
    }
}

/// Parses a backend order as written on the command line or in the file: "upnp,pcp,natpmp".
pub fn parse_order(text: &str) -> Result<Vec<Backend>, String> {
    let mut order = Vec::new();
    for name in text.split(',').map(str::trim) {
        let backend = match name {
            "upnp" => Backend::Upnp,
            "pcp" => Backend::Pcp,
            "natpmp" => Backend::NatPmp,
            other => {
                return Err(format!(
                    "unknown gateway protocol {other:?} in the backend order: use upnp, pcp and natpmp"
                ))
            }
        };
        if order.contains(&backend) {
            return Err(format!("{name} appears twice in the backend order {text:?}"));
        }
        order.push(backend);
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_parse_and_bad_ones_name_the_problem() {
        assert_eq!(parse_order("pcp, natpmp").unwrap(), vec![Backend::Pcp, Backend::NatPmp]);
        assert_eq!(parse_order("upnp,pcp,natpmp").unwrap(), DEFAULT_ORDER.to_vec());
        let e = parse_order("upnp,nat-pmp").unwrap_err();
        assert!(e.contains("\"nat-pmp\"") && e.contains("natpmp"), "{e}");
        assert!(parse_order("pcp,pcp").unwrap_err().contains("twice"));
        assert!(parse_order("").is_err());
    }
}
