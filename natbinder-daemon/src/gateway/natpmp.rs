//! NAT-PMP (RFC 6886) as a [`Gateway`]: map, renew and delete through [`PmpClient`].
//!
//! A NAT-PMP mapping is named by this host's address, the protocol and the internal port; lifetime 0
//! deletes it. The gateway may grant another external port than asked (the asked one is taken) or a
//! shorter lifetime: natbinder keeps only external = internal port, and renews at half of what was
//! granted.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use tokio::time::Instant;
use tracing::debug;

use super::{
    pmp_client::{ExchangeError, PmpClient},
    pmp_wire::{NatPmpBody, NatPmpRequest, NatPmpResponse, NatPmpResult, Reply, NATPMP_OP_EXTERNAL_ADDRESS},
    signals::Announcement,
    AddError, Backend, Gateway, GatewayEntry, Granted, MappingRequest,
};
use crate::Protocol;

/// How long the periodic "does PCP answer now?" question may take.
const PCP_RECHECK_LIMIT: Duration = Duration::from_secs(1);

pub struct NatPmpGateway {
    client: PmpClient,
    /// PCP ranks above NAT-PMP in the configured order: ask for it again at each periodic check, so
    /// that "PCP unsupported" is not believed forever.
    pcp_preferred: bool,
}

/// What a reply means for a mapping call.
pub(super) fn natpmp_error(result: NatPmpResult) -> AddError {
    let text = result.to_string();
    match result {
        // The gateway stopped speaking NAT-PMP (new firmware, say): choose a backend again.
        NatPmpResult::UnsupportedVersion => AddError::Unreachable(text),
        NatPmpResult::NotAuthorized => AddError::NotAuthorized(text),
        NatPmpResult::OutOfResources => AddError::NoResources(text),
        NatPmpResult::NetworkFailure
        | NatPmpResult::UnsupportedOpcode
        | NatPmpResult::Success
        | NatPmpResult::Other(_) => AddError::Refused(text),
    }
}

pub(super) fn exchange_error(e: ExchangeError) -> AddError {
    AddError::Unreachable(e.to_string())
}

impl NatPmpGateway {
    /// Asks for the external address: a gateway that answers speaks NAT-PMP. On failure the client
    /// is handed back for another probe.
    pub async fn probe(client: PmpClient, deadline: Instant) -> Result<(Self, Ipv4Addr), (PmpClient, String)> {
        let gateway = Self { client, pcp_preferred: false };
        match gateway.read_external_address(Some(deadline)).await {
            Ok(ip) => Ok((gateway, ip)),
            Err(e) => Err((gateway.client, format!("NAT-PMP: {e}"))),
        }
    }

    pub fn into_serving(mut self, pcp_preferred: bool) -> Self {
        self.pcp_preferred = pcp_preferred;
        self
    }

    async fn read_external_address(&self, deadline: Option<Instant>) -> Result<Ipv4Addr, AddError> {
        let request = NatPmpRequest::ExternalAddress.encode();
        let reply = self
            .client
            .exchange(&request, |r| matches!(r, Reply::NatPmp(r) if r.opcode == NATPMP_OP_EXTERNAL_ADDRESS), deadline)
            .await
            .map_err(exchange_error)?;
        match reply {
            Reply::NatPmp(NatPmpResponse {
                result: NatPmpResult::Success,
                body: NatPmpBody::ExternalAddress(ip),
                ..
            }) => Ok(ip),
            Reply::NatPmp(r) => Err(natpmp_error(r.result)),
            Reply::Pcp(_) => unreachable!("only NAT-PMP replies are accepted"),
        }
    }

    /// One map request (lifetime 0: delete). Returns the external port and lifetime granted.
    async fn map(&self, protocol: Protocol, port: u16, external: u16, lifetime: u32) -> Result<(u16, u32), AddError> {
        let request = NatPmpRequest::Map {
            protocol,
            internal_port: port,
            suggested_external_port: external,
            lifetime_secs: lifetime,
        }
        .encode();
        let opcode =
            NatPmpRequest::Map { protocol, internal_port: port, suggested_external_port: 0, lifetime_secs: 0 }.opcode();
        let deleting = lifetime == 0;
        let accepts = |r: &Reply| match r {
            Reply::NatPmp(r) if r.opcode == opcode => match r.body {
                // A success to a delete has lifetime 0; a late answer to the add before it has not.
                NatPmpBody::Map { internal_port, lifetime_secs, .. } => {
                    internal_port == port && (r.result != NatPmpResult::Success || (lifetime_secs == 0) == deleting)
                }
                _ => r.result != NatPmpResult::Success,
            },
            _ => false,
        };
        let reply = self.client.exchange(&request, accepts, None).await.map_err(exchange_error)?;
        match reply {
            Reply::NatPmp(NatPmpResponse {
                result: NatPmpResult::Success,
                body: NatPmpBody::Map { external_port, lifetime_secs, .. },
                ..
            }) => Ok((external_port, lifetime_secs)),
            Reply::NatPmp(r) => Err(natpmp_error(r.result)),
            Reply::Pcp(_) => unreachable!("only NAT-PMP replies are accepted"),
        }
    }
}

impl Gateway for NatPmpGateway {
    fn describe(&self) -> String {
        format!("NAT-PMP gateway at {}", self.client.gateway())
    }

    fn backend(&self) -> Backend {
        Backend::NatPmp
    }

    fn can_read_table(&self) -> bool {
        false
    }

    fn observe_announcement(&self, announcement: &Announcement) -> Option<String> {
        self.client.observe_announcement(announcement)
    }

    async fn preferred_protocol_answers(&self) -> bool {
        if !self.pcp_preferred {
            return false;
        }
        let deadline = Instant::now() + PCP_RECHECK_LIMIT;
        super::pcp::announce(&self.client, Some(deadline)).await.is_ok_and(|reply| super::pcp::speaks_pcp(&reply))
    }

    async fn add(&self, request: &MappingRequest) -> Result<Granted, AddError> {
        let port = request.port;
        // NAT-PMP has no permanent mappings (lifetime 0 deletes); the caller never asks for one here.
        let lifetime = request.lease.as_secs().clamp(1, u64::from(u32::MAX)) as u32;
        // A mapping of this internal port that this host made earlier with another external port is
        // returned as is: delete it and ask once more before concluding the port is taken.
        let mut offered = None;
        for attempt in 0..2 {
            let (external, granted) = self.map(request.protocol, port, port, lifetime).await?;
            if external == port && granted > 0 {
                return Ok(Granted::lease(Duration::from_secs(u64::from(granted))));
            }
            if request.accept_other_port && granted > 0 {
                let lease = Duration::from_secs(u64::from(granted));
                return Ok(Granted { external_port: Some(external), ..Granted::lease(lease) });
            }
            debug!(
                "NAT-PMP granted {}/{port} as external port {external} for {granted} s (attempt {}): removing it",
                request.protocol,
                attempt + 1
            );
            self.map(request.protocol, port, 0, 0).await?;
            if external != port {
                offered = Some(external);
            }
        }
        Err(offered.map_or(AddError::Conflict, |offered| AddError::OtherPortOffered { offered }))
    }

    async fn delete(&self, protocol: Protocol, port: u16) -> Result<(), AddError> {
        self.map(protocol, port, 0, 0).await.map(|_| ())
    }

    async fn list(&self) -> Result<Vec<GatewayEntry>, AddError> {
        Err(AddError::Unsupported("NAT-PMP cannot list the gateway's mappings"))
    }

    async fn lookup(&self, _protocol: Protocol, _port: u16) -> Result<Option<GatewayEntry>, AddError> {
        Err(AddError::Unsupported("NAT-PMP cannot look up a mapping"))
    }

    async fn external_address(&self) -> Result<Option<IpAddr>, AddError> {
        let ip = self.read_external_address(None).await?;
        Ok(Some(IpAddr::V4(ip)))
    }
}
