//! PCP (RFC 6887) MAP as a [`Gateway`], through [`PmpClient`].
//!
//! Each mapping has its own nonce, which the gateway requires for renewals and deletes, and which
//! every reply must echo (a reply with another nonce answers someone else's request). The nonce is
//! derived from a secret key kept in the state directory and the mapping's name (protocol, port, this
//! host's address): a restarted daemon renews or deletes what the previous run made, although it
//! remembers no nonce, and no other host can guess it.
//!
//! IPv6 pinholes are MAPs too (RFC 6887 §6: on a firewall the mapping is a pinhole to the client's
//! own address), sent over IPv6 from the address they open to the IPv6 router's port 5351, one
//! [`PmpClient`] per address: the server maps the address it sees the request come from.
use std::{
    collections::HashMap,
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::time::Instant;
use tracing::{debug, info};

use super::{
    natpmp::exchange_error,
    pmp_client::{ExchangeError, PmpClient},
    pmp_wire::{self, PcpBody, PcpMapRequest, PcpResponse, PcpResult, Reply, PCP_OP_ANNOUNCE, PCP_OP_MAP},
    signals::Announcement,
    AddError, Backend, Gateway, GatewayEntry, Granted, MappingRequest, OpenedPinhole, PinholeRequest,
};
use crate::{host::lan6::Ipv6Router, table::PinholeService, Protocol};

const NONCE_KEY_FILE: &str = "pcp-nonce.key";

/// The secret the per-mapping nonces are derived from.
#[derive(Clone)]
pub struct NonceKey([u8; 16]);

impl NonceKey {
    /// Reads the key from `state_dir`, creating it (mode 0600) on first use.
    pub fn load_or_create(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join(NONCE_KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) if bytes.len() == 16 => return Ok(Self(bytes.try_into().unwrap())),
            Ok(bytes) => anyhow::bail!(
                "{} holds {} bytes, not a 16-byte key: remove it and natbinder makes a new one (PCP mappings \
                 of earlier runs then end with their lifetimes)",
                path.display(),
                bytes.len()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
        let mut key = [0u8; 16];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .context("reading /dev/urandom for the PCP nonce key")?;
        fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(&key).and_then(|_| file.sync_all()).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self(key))
    }

    /// A key that lives only as long as the process (tests).
    pub fn ephemeral() -> Self {
        let mut key = [0u8; 16];
        let _ = fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut key));
        Self(key)
    }

    /// The nonce of the mapping (or, for an IPv6 `client`, the pinhole) of `protocol`/`port` for
    /// `client`: a keyed hash (SipHash-1-3, 128 bits).
    pub fn nonce(&self, protocol: Protocol, port: u16, client: IpAddr) -> [u8; 12] {
        use std::hash::Hasher;
        let mut hasher = siphasher::sip128::SipHasher13::new_with_key(&self.0);
        hasher.write(b"natbinder pcp map nonce");
        hasher.write_u8(protocol.ip_proto() as u8);
        hasher.write_u16(port);
        // 4 bytes for IPv4 (as before pinholes: earlier runs' nonces stay valid), 16 for IPv6.
        match client {
            IpAddr::V4(v4) => hasher.write(&v4.octets()),
            IpAddr::V6(v6) => hasher.write(&v6.octets()),
        }
        let hash = siphasher::sip128::Hasher128::finish128(&hasher).as_bytes();
        hash[..12].try_into().unwrap()
    }
}

/// How long to wait for a PCP server on the IPv6 router (three tries on the RFC schedule): asked at
/// each check, an IPv6 path that does not answer must not hold up the IPv4 mappings.
const IPV6_PROBE_TIME: Duration = Duration::from_millis(1_800);

/// At most this many IPv6 clients are kept (one per address pinholes were asked from): addresses
/// come and go with privacy extensions; beyond it the cache starts again.
const MAX_IPV6_CLIENTS: usize = 16;

pub struct PcpGateway {
    client: PmpClient,
    nonces: NonceKey,
    /// Pinhole requests' clients, by (this host's address, the router's PCP address).
    ipv6_clients: Mutex<HashMap<(Ipv6Addr, SocketAddrV6), Arc<PmpClient>>>,
}

fn pcp_error(result: PcpResult) -> AddError {
    let text = result.to_string();
    match result {
        // The gateway stopped speaking PCP: choose a backend again (NAT-PMP may answer).
        PcpResult::UnsuppVersion => AddError::Unreachable(text),
        PcpResult::NotAuthorized => AddError::NotAuthorized(text),
        PcpResult::NoResources | PcpResult::UserExQuota => AddError::NoResources(text),
        // The port cannot be had (taken, with the gateway unwilling to give another).
        PcpResult::CannotProvideExternal => AddError::Conflict,
        PcpResult::AddressMismatch => AddError::BehindAnotherNat(text),
        _ => AddError::Refused(text),
    }
}

/// Whether `reply` answers a MAP with `nonce` for `protocol`/`port`: the nonce, protocol and port must
/// match. An error reply too short to carry them is taken (it comes from the gateway, and only one
/// request is in flight); a NAT-PMP "unsupported version" means the gateway dropped PCP.
fn answers_map(reply: &Reply, nonce: &[u8; 12], protocol: Protocol, port: u16, deleting: bool) -> bool {
    match reply {
        Reply::Pcp(r) if r.opcode == PCP_OP_MAP => match r.body {
            PcpBody::Map { nonce: n, protocol: p, internal_port, .. } => {
                n == *nonce
                    && p == Some(protocol)
                    && internal_port == port
                    && (r.result != PcpResult::Success || (r.lifetime_secs == 0) == deleting)
            }
            _ => r.result != PcpResult::Success,
        },
        Reply::NatPmp(r) => r.result == pmp_wire::NatPmpResult::UnsupportedVersion,
        _ => false,
    }
}

/// One ANNOUNCE exchange: PCP's way to ask whether a server is there and read its epoch. The answer is
/// the server's PCP reply, or NAT-PMP's "unsupported version" from a gateway without PCP.
pub(super) async fn announce(client: &PmpClient, deadline: Option<Instant>) -> Result<Reply, ExchangeError> {
    let request = pmp_wire::encode_pcp_announce(client.local());
    let accepts = |r: &Reply| match r {
        Reply::Pcp(r) => r.opcode == PCP_OP_ANNOUNCE,
        Reply::NatPmp(r) => r.result == pmp_wire::NatPmpResult::UnsupportedVersion,
    };
    client.exchange(&request, accepts, deadline).await
}

/// Whether an ANNOUNCE answer says the gateway speaks this PCP version.
pub(super) fn speaks_pcp(reply: &Reply) -> bool {
    matches!(reply, Reply::Pcp(r) if r.result == PcpResult::Success && r.version == pmp_wire::PCP_VERSION)
}

impl PcpGateway {
    /// Sends an ANNOUNCE: a gateway that answers it speaks PCP. Err(true) when it answered that it
    /// does not (UNSUPP_VERSION, in NAT-PMP's or PCP's format): NAT-PMP is worth a try.
    pub async fn probe(client: PmpClient, nonces: NonceKey, deadline: Instant) -> Result<Self, (PmpClient, String)> {
        match announce(&client, Some(deadline)).await {
            Ok(reply) if speaks_pcp(&reply) => Ok(Self { client, nonces, ipv6_clients: Mutex::default() }),
            Ok(Reply::Pcp(r)) => {
                let why = format!("PCP: the gateway answered ANNOUNCE with {} (version {})", r.result, r.version);
                Err((client, why))
            }
            Ok(Reply::NatPmp(_)) => {
                Err((client, "PCP: the gateway answered in NAT-PMP: unsupported version".to_string()))
            }
            Err(e) => Err((client, format!("PCP: {e}"))),
        }
    }

    async fn map(&self, protocol: Protocol, port: u16, lifetime: u32) -> Result<PcpResponse, AddError> {
        map_through(&self.client, &self.nonces, protocol, port, lifetime).await
    }

    /// The client that asks `router` for pinholes to `address`, made on first use.
    fn ipv6_client(&self, router: Ipv6Router, address: Ipv6Addr) -> Result<Arc<PmpClient>, AddError> {
        let server = SocketAddrV6::new(router.address, pmp_wire::SERVER_PORT, 0, router.scope_id());
        let mut clients = self.ipv6_clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&(address, server)) {
            return Ok(client.clone());
        }
        let client = self.client.from_other_address(address.into(), SocketAddr::V6(server)).map_err(|e| {
            AddError::Unreachable(format!("opening a socket from [{address}] to PCP server {server}: {e}"))
        })?;
        if clients.len() >= MAX_IPV6_CLIENTS {
            clients.clear();
        }
        let client = Arc::new(client);
        clients.insert((address, server), client.clone());
        Ok(client)
    }

    /// One MAP for the pinhole `request` names; lifetime 0 closes it.
    async fn map_pinhole(&self, request: &PinholeRequest, lifetime: u32) -> Result<PcpResponse, AddError> {
        let key = request.key;
        let client = self.ipv6_client(request.router, key.address)?;
        map_through(&client, &self.nonces, key.protocol, key.port, lifetime).await
    }
}

/// One MAP exchange through `client` for `protocol`/`port` on its address; lifetime 0 deletes.
async fn map_through(
    client: &PmpClient,
    nonces: &NonceKey,
    protocol: Protocol,
    port: u16,
    lifetime: u32,
) -> Result<PcpResponse, AddError> {
    let nonce = nonces.nonce(protocol, port, client.local());
    let request = PcpMapRequest {
        nonce,
        protocol,
        internal_port: port,
        // A delete names the mapping by nonce, protocol and internal port only.
        suggested_external_port: if lifetime == 0 { 0 } else { port },
        suggested_external_ip: None,
        lifetime_secs: lifetime,
        client_ip: client.local(),
        prefer_failure: false,
    }
    .encode();
    let deleting = lifetime == 0;
    let reply = client
        .exchange(&request, |r| answers_map(r, &nonce, protocol, port, deleting), None)
        .await
        .map_err(exchange_error)?;
    match reply {
        Reply::Pcp(r) if r.result == PcpResult::Success => Ok(r),
        Reply::Pcp(r) => Err(pcp_error(r.result)),
        Reply::NatPmp(r) => Err(AddError::Unreachable(format!("the gateway no longer speaks PCP ({})", r.result))),
    }
}

impl Gateway for PcpGateway {
    fn describe(&self) -> String {
        format!("PCP server at {}", self.client.gateway())
    }

    fn backend(&self) -> Backend {
        Backend::Pcp
    }

    fn can_read_table(&self) -> bool {
        false
    }

    fn observe_announcement(&self, announcement: &Announcement) -> Option<String> {
        self.client.observe_announcement(announcement)
    }

    async fn add(&self, request: &MappingRequest) -> Result<Granted, AddError> {
        let port = request.port;
        // PCP has no permanent mappings; the caller never asks for one here.
        let lifetime = request.lease.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
        let mut offered = None;
        for attempt in 0..2 {
            let reply = self.map(request.protocol, port, lifetime).await?;
            let PcpBody::Map { assigned_external_port, assigned_external_ip, .. } = reply.body else {
                return Err(AddError::Refused("a MAP success without its mapping".into()));
            };
            if reply.lifetime_secs > 0 && (assigned_external_port == port || request.accept_other_port) {
                return Ok(Granted {
                    lease: Duration::from_secs(u64::from(reply.lifetime_secs)),
                    external_address: Some(assigned_external_ip),
                    external_port: (assigned_external_port != port).then_some(assigned_external_port),
                });
            }
            debug!(
                "PCP granted {}/{port} as external port {assigned_external_port} for {} s (attempt {}): removing it",
                request.protocol,
                reply.lifetime_secs,
                attempt + 1
            );
            self.map(request.protocol, port, 0).await?;
            if assigned_external_port != port {
                offered = Some(assigned_external_port);
            }
        }
        Err(offered.map_or(AddError::Conflict, |offered| AddError::OtherPortOffered { offered }))
    }

    async fn delete(&self, protocol: Protocol, port: u16) -> Result<(), AddError> {
        match self.map(protocol, port, 0).await {
            Ok(_) => Ok(()),
            // Deleting what is not there is success (RFC 6887 §15); miniupnpd 2.3 answers it with
            // NO_RESOURCES, which a delete cannot otherwise mean: it needs no resources.
            Err(AddError::NoResources(why)) => {
                debug!("{protocol}/{port} was not on the gateway ({why})");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn list(&self) -> Result<Vec<GatewayEntry>, AddError> {
        Err(AddError::Unsupported("PCP cannot list the gateway's mappings"))
    }

    async fn lookup(&self, _protocol: Protocol, _port: u16) -> Result<Option<GatewayEntry>, AddError> {
        Err(AddError::Unsupported("PCP cannot look up a mapping"))
    }

    /// PCP tells the external address only in MAP replies (see [`Granted::external_address`]). An
    /// ANNOUNCE checks that the gateway is there and still has its state (the epoch rule).
    async fn external_address(&self) -> Result<Option<IpAddr>, AddError> {
        match announce(&self.client, None).await.map_err(exchange_error)? {
            Reply::Pcp(r) if r.result == PcpResult::Success => {}
            Reply::Pcp(r) => return Err(pcp_error(r.result)),
            Reply::NatPmp(r) => {
                return Err(AddError::Unreachable(format!("the gateway no longer speaks PCP ({})", r.result)))
            }
        }
        Ok(None)
    }

    /// PCP cannot tell whether the router firewalls inbound IPv6 (a pinhole on an open firewall is
    /// harmless): a PCP server that answers an ANNOUNCE over IPv6 from `from` is asked for pinholes.
    async fn pinhole_service(&self, router: Ipv6Router, from: Ipv6Addr) -> PinholeService {
        let client = match self.ipv6_client(router, from) {
            Ok(client) => client,
            Err(e) => return PinholeService::Unavailable { why: e.to_string() },
        };
        let server = client.gateway();
        match announce(&client, Some(Instant::now() + IPV6_PROBE_TIME)).await {
            Ok(reply) if speaks_pcp(&reply) => PinholeService::Needed,
            Ok(Reply::Pcp(r)) => PinholeService::Unavailable {
                why: format!("the PCP server at {server} answered ANNOUNCE over IPv6 with {}", r.result),
            },
            Ok(Reply::NatPmp(r)) => PinholeService::Unavailable {
                why: format!("{server} answered over IPv6 in NAT-PMP ({}): no PCP there", r.result),
            },
            Err(e) => PinholeService::Unavailable { why: format!("no PCP server answers over IPv6: {e}") },
        }
    }

    async fn open_pinhole(&self, request: &PinholeRequest) -> Result<OpenedPinhole, AddError> {
        let lifetime = request.lease.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
        let reply = self.map_pinhole(request, lifetime).await?;
        if reply.lifetime_secs == 0 {
            return Err(AddError::Refused("the PCP server granted the pinhole a lifetime of 0".into()));
        }
        Ok(OpenedPinhole { lease: Duration::from_secs(u64::from(reply.lifetime_secs)), id: None })
    }

    /// A MAP with the same nonce renews, and opens again what the gateway lost: never Gone.
    async fn renew_pinhole(&self, request: &PinholeRequest, _id: Option<u16>) -> Result<OpenedPinhole, AddError> {
        self.open_pinhole(request).await
    }

    async fn close_pinhole(&self, request: &PinholeRequest, _id: Option<u16>) -> Result<(), AddError> {
        match self.map_pinhole(request, 0).await {
            Ok(_) => Ok(()),
            // Not there (see delete).
            Err(AddError::NoResources(why)) => {
                debug!("pinhole {:?} was not on the gateway ({why})", request.key);
                Ok(())
            }
            // miniupnpd (2.3.1, nftables) drops a pinhole's description, which holds its nonce, when
            // a MAP renews it, and then refuses the delete as another client's. A MAP still renews
            // it: asked for the shortest lifetime, it ends within the gateway's minimum (often 120 s).
            Err(AddError::NotAuthorized(why)) => {
                let reply = self.map_pinhole(request, 1).await?;
                info!(
                    "the gateway refused to close pinhole {}/{} to [{}] ({why}), as miniupnpd does once it renewed                      one: it now ends with its shortened lifetime of {} s",
                    request.key.protocol, request.key.port, request.key.address, reply.lifetime_secs
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn nonces_differ_per_mapping_and_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("natbinder-pcp-key-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let key = NonceKey::load_or_create(&dir).unwrap();
        let host = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10));
        let a = key.nonce(Protocol::Tcp, 8080, host);
        assert_ne!(a, key.nonce(Protocol::Udp, 8080, host));
        assert_ne!(a, key.nonce(Protocol::Tcp, 8081, host));
        assert_ne!(a, key.nonce(Protocol::Tcp, 8080, Ipv4Addr::new(192, 168, 1, 11).into()));
        // A pinhole's nonce is its address's own; an IPv4-mapped address is another name.
        let v6: Ipv6Addr = "2001:db8::10".parse().unwrap();
        assert_ne!(
            key.nonce(Protocol::Tcp, 8080, v6.into()),
            key.nonce(Protocol::Tcp, 8080, "2001:db8::11".parse().unwrap())
        );
        assert_ne!(a, key.nonce(Protocol::Tcp, 8080, IpAddr::V6(Ipv4Addr::new(192, 168, 1, 10).to_ipv6_mapped())));
        // A restarted daemon derives the same nonce from the same file.
        let again = NonceKey::load_or_create(&dir).unwrap();
        assert_eq!(a, again.nonce(Protocol::Tcp, 8080, host));
        assert_ne!(a, NonceKey::ephemeral().nonce(Protocol::Tcp, 8080, host));
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(dir.join(NONCE_KEY_FILE)).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        fs::write(dir.join(NONCE_KEY_FILE), b"short").unwrap();
        let err = format!("{:#}", NonceKey::load_or_create(&dir).err().unwrap());
        assert!(err.contains("pcp-nonce.key") && err.contains("5 bytes"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
