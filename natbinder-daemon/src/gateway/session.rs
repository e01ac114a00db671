//! One session per discovered gateway, in the shape of Tailscale's portmapper client: it owns the
//! protocol handle and everything natbinder learned about that gateway, and it ends, facts and all,
//! when the gateway is found again (a restart, a network change, another protocol).
//!
//! What it learns:
//! * the external address, and whether it betrays another NAT upstream (reported once per change);
//! * whether the gateway takes only permanent mappings (IGD 725, or 402 on a leased add), accepted only
//!   once its external address checked out, so that rules that never expire cannot pile up on a
//!   gateway that is not even the way out;
//! * whether another NAT sits between this host and the gateway (PCP ADDRESS_MISMATCH), reported once.
//!
//! Ports the gateway says other hosts hold are not kept here: they go to the table's one record of
//! them ([`crate::table::Table::record_conflict`]), tagged with this gateway's address.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use tracing::{debug, warn};

use super::{signals::Announcement, AddError, Backend, Gateway, Granted, MappingRequest};
use crate::{
    host::lan::LanInfo,
    outcome::{DoubleNat, Outcome, OutcomeBus},
    table::PortKey,
};

pub struct GatewaySession<G> {
    /// Numbers sessions, so that a sign from an earlier session's gateway is not taken for this one's.
    pub id: u64,
    pub gateway: G,
    /// Where this host sat on its LAN when the gateway was found.
    pub lan: LanInfo,
    outcomes: OutcomeBus,
    external_address: Option<IpAddr>,
    permanent_only: bool,
    nat_in_between_reported: bool,
    /// See [`GatewaySession::accept_other_ports`].
    accept_other_port: bool,
}

/// Whether `ip`, as a gateway's external address, means another NAT sits upstream (or none is known):
/// unspecified, loopback, RFC 1918 private, RFC 6598 shared (100.64/10, carrier-grade NAT), link-local.
pub fn is_behind_another_nat(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_loopback(),
    }
}

impl<G: Gateway> GatewaySession<G> {
    pub fn new(id: u64, gateway: G, lan: LanInfo, outcomes: OutcomeBus) -> Self {
        Self {
            id,
            gateway,
            lan,
            outcomes,
            external_address: None,
            permanent_only: false,
            nat_in_between_reported: false,
            accept_other_port: false,
        }
    }

    /// Keep mappings the gateway grants on another external port (`keep-gateway-chosen-ports`).
    pub fn accept_other_ports(mut self, accept: bool) -> Self {
        self.accept_other_port = accept;
        self
    }

    /// As [`GatewaySession::accept_other_ports`], for a reload.
    pub fn set_accept_other_ports(&mut self, accept: bool) {
        self.accept_other_port = accept;
    }

    pub fn describe(&self) -> String {
        self.gateway.describe()
    }

    pub fn backend(&self) -> Backend {
        self.gateway.backend()
    }

    /// The gateway's address on the LAN.
    pub fn address(&self) -> Ipv4Addr {
        self.lan.gateway
    }

    /// The external address as last learned.
    pub fn external_address(&self) -> Option<IpAddr> {
        self.external_address
    }

    /// Whether natbinder maps without a lease on this gateway.
    pub fn permanent_only(&self) -> bool {
        self.permanent_only
    }

    /// Asks the gateway for its external address (for NAT-PMP and PCP also an exchange whose epoch is
    /// checked). Unreachable is an error; other failures are logged and give None.
    pub async fn refresh_external_address(&mut self) -> Result<Option<IpAddr>, AddError> {
        match self.gateway.external_address().await {
            Ok(Some(ip)) => {
                self.learn_external_address(ip);
                Ok(Some(ip))
            }
            Ok(None) => Ok(self.external_address),
            Err(AddError::Unreachable(e)) => {
                warn!("could not read the gateway's external address: {e}");
                Err(AddError::Unreachable(e))
            }
            Err(e) => {
                warn!("could not read the gateway's external address: {e}");
                Ok(None)
            }
        }
    }

    /// Records the external address; a change, and a double NAT, are published once each.
    pub fn learn_external_address(&mut self, ip: IpAddr) {
        let previous = self.external_address.replace(ip);
        if previous == Some(ip) {
            return;
        }
        self.outcomes.publish(Outcome::ExternalAddress { address: ip, previous });
        if is_behind_another_nat(ip) {
            self.outcomes.publish(Outcome::DoubleNat(DoubleNat::UpstreamAddress(ip)));
        }
    }

    /// What an announcement from the gateway says: Some(why) when it shows the gateway lost its state.
    /// A NAT-PMP announcement also carries the external address.
    pub fn observe_announcement(&mut self, announcement: &Announcement) -> Option<String> {
        if let Some(ip) = announcement.external_address {
            self.learn_external_address(IpAddr::V4(ip));
        }
        self.gateway.observe_announcement(announcement)
    }

    /// Asks for `key` for this host with `lease` (zero where the gateway takes only permanent
    /// mappings). A gateway that refuses leases gets a permanent mapping instead, with care.
    pub async fn add(&mut self, key: PortKey, description: &str, lease: Duration) -> Result<Granted, AddError> {
        let (internal_client, accept_other_port) = (self.lan.local, self.accept_other_port);
        let request = |lease| MappingRequest {
            protocol: key.protocol,
            port: key.port,
            internal_client,
            lease,
            description: description.to_string(),
            accept_other_port,
        };
        let lease = if self.permanent_only { Duration::ZERO } else { lease };
        let mut result = self.gateway.add(&request(lease)).await;
        if let Err(AddError::PermanentOnly(why)) = &result {
            let why = why.clone();
            if lease.is_zero() {
                result = Err(AddError::Refused(format!("{why}, even without a lease")));
            } else if self.accept_permanent_leases(&why).await? {
                result = self.gateway.add(&request(Duration::ZERO)).await;
            }
        }
        if let Ok(Granted { external_address: Some(ip), .. }) = &result {
            self.learn_external_address(*ip);
        }
        result
    }

    pub async fn delete(&self, key: PortKey) -> Result<(), AddError> {
        self.gateway.delete(key.protocol, key.port).await
    }

    /// The gateway refused a leased mapping. Returns whether natbinder may now map permanently.
    async fn accept_permanent_leases(&mut self, why: &str) -> Result<bool, AddError> {
        match self.gateway.external_address().await {
            Ok(Some(ip)) if !is_behind_another_nat(ip) => {
                self.learn_external_address(ip);
                if !std::mem::replace(&mut self.permanent_only, true) {
                    warn!(
                        "{} accepts only permanent mappings ({why}); natbinder will map without a lease, journal \
                         every mapping and delete each itself when its socket goes",
                        self.describe()
                    );
                }
                Ok(true)
            }
            Ok(Some(ip)) => {
                self.learn_external_address(ip);
                warn!(
                    "the gateway accepts only permanent mappings ({why}) and its external address {ip} is not \
                     public: not mapping permanently"
                );
                Ok(false)
            }
            Ok(None) => {
                warn!(
                    "the gateway accepts only permanent mappings ({why}) and does not tell its external address: \
                     not mapping permanently"
                );
                Ok(false)
            }
            Err(AddError::Unreachable(e)) => Err(AddError::Unreachable(e)),
            Err(e) => {
                warn!(
                    "the gateway accepts only permanent mappings ({why}) and its external address could not be read \
                     ({e}): not mapping permanently"
                );
                Ok(false)
            }
        }
    }

    /// The gateway saw this host's requests come from another address (PCP ADDRESS_MISMATCH):
    /// published once per session.
    pub fn note_nat_in_between(&mut self, detail: &str) {
        if !std::mem::replace(&mut self.nat_in_between_reported, true) {
            self.outcomes
                .publish(Outcome::DoubleNat(DoubleNat::InBetween { gateway: self.lan.gateway, detail: detail.into() }));
        } else {
            debug!("{detail} (reported before)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_that_betray_another_nat() {
        for private in
            ["10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "100.127.255.254", "0.0.0.0", "169.254.1.1"]
        {
            assert!(is_behind_another_nat(private.parse().unwrap()), "{private}");
        }
        for public in ["11.77.77.77", "100.128.0.1", "8.8.8.8", "2001:db8::1"] {
            assert!(!is_behind_another_nat(public.parse().unwrap()), "{public}");
        }
    }
}
