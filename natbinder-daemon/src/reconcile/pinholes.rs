//! IPv6 pinholes: the reconciler's side. The table decides which pinholes are wanted (one per address
//! of this host for each forwarded [::] listener, when the gateway needs them); here they become
//! gateway calls, journalled as mappings are:
//! * [`Reconciler::check_pinhole_service`]: whether the gateway firewalls inbound IPv6 and can be
//!   asked to open it, at the start of each session and at each periodic check;
//! * [`Reconciler::perform_pinhole`]: open, renew (the gateway says when it no longer holds one:
//!   opened again), close, each sent from the address it opens;
//! * [`Reconciler::audit_pinholes`]: at a session's start, pinholes an earlier run left are adopted
//!   or closed by the id the journal kept; later, every pinhole is renewed, which is the check and the
//!   repair.
//!
//! A pinhole call that fails never ends the session: the IPv6 path to the router may be broken while
//! IPv4 mappings work. It is retried with backoff like any refused mapping.
use std::time::Duration;

use tracing::{debug, warn};

use super::{std_now, Reconciler};
use crate::{
    gateway::{session::GatewaySession, AddError, Gateway, PinholeRequest},
    outcome::{Lease, Outcome, Removal},
    table::{GatewayHandle, Grant, MappingKey, PinholeKey, PinholeService, Work},
};

/// The longest lease a pinhole is asked for: WANIPv6FirewallControl takes at most a day.
const MAX_PINHOLE_LEASE: Duration = Duration::from_secs(86_400);

impl Reconciler {
    fn pinhole_lease(&self) -> Duration {
        self.config.lease.clamp(Duration::from_secs(1), MAX_PINHOLE_LEASE)
    }

    /// Asks the gateway what IPv6 listeners need, and tells the table (which wants or drops pinholes
    /// accordingly). Published when it changes.
    pub(super) async fn check_pinhole_service<G: Gateway>(&mut self, session: &GatewaySession<G>) {
        let lan6 = self.lan6.current();
        // Asked from a deprecated address when no other is left: its pinholes still need renewing.
        let service = match (lan6.router, lan6.addresses.first().or(lan6.deprecated.first())) {
            (None, _) => PinholeService::Unavailable {
                why: "this host has no IPv6 default route: there is no router to ask".into(),
            },
            (Some(_), None) => {
                PinholeService::Unavailable { why: "this host has no global IPv6 address on its LAN interface".into() }
            }
            (Some(router), Some(from)) => session.gateway.pinhole_service(router, *from).await,
        };
        let changed = self.table.read(|t| *t.pinhole_service() != service);
        if changed {
            self.table
                .outcomes()
                .publish(Outcome::Ipv6Firewall { gateway: session.describe(), service: service.clone() });
            self.table.update(|t| t.set_pinhole_service(service, std_now()));
        }
    }

    /// One piece of the table's work on a pinhole.
    pub(super) async fn perform_pinhole<G: Gateway>(
        &mut self,
        session: &GatewaySession<G>,
        work: Work,
        key: PinholeKey,
    ) -> Result<(), AddError> {
        let mapping_key = MappingKey::Ipv6Pinhole(key);
        let Some(router) = self.lan6.current().router else {
            let error = "this host has no IPv6 default route any more".to_string();
            match work {
                Work::Delete { .. } => self.table.update(|t| t.record_delete_failed(mapping_key, error, std_now())),
                _ => self.table.update(|t| t.record_failed(mapping_key, error, std_now())),
            }
            return Ok(());
        };
        let request = PinholeRequest { key, lease: self.pinhole_lease(), router };
        let (id, held_before) = self.table.read(|t| {
            let m = t.mapping(&mapping_key);
            let id = m.and_then(|m| m.handle).map(|GatewayHandle::PinholeId(id)| id);
            (id, m.is_some_and(|m| m.on_gateway))
        });
        let gateway = session.address();
        let started = tokio::time::Instant::now();
        match work {
            Work::Add { .. } | Work::Renew { .. } => {
                let renewal = matches!(work, Work::Renew { .. });
                if !renewal {
                    // Written ahead, as mappings are.
                    self.ownership.record_pinhole(key, gateway, None, request.lease).await;
                }
                let result = if renewal {
                    session.gateway.renew_pinhole(&request, id).await
                } else {
                    session.gateway.open_pinhole(&request).await
                };
                match result {
                    Ok(opened) => {
                        self.ownership.record_pinhole(key, gateway, opened.id, opened.lease).await;
                        let grant = Grant {
                            external_port: key.port,
                            lease: Lease::from_granted(opened.lease),
                            internal: std::net::SocketAddrV4::new(session.lan.local, key.port),
                            backend: session.backend(),
                            renewal,
                            took: started.elapsed(),
                            handle: opened.id.map(GatewayHandle::PinholeId),
                        };
                        self.table.update(|t| t.record_mapped(mapping_key, grant, std_now()));
                    }
                    Err(AddError::Gone(why)) => {
                        debug!("{mapping_key}: {why}");
                        self.ownership.forget_pinhole(key).await;
                        self.table.update(|t| t.record_pinholes_dropped(&[key], std_now()));
                    }
                    Err(e) => {
                        if !held_before {
                            self.ownership.forget_pinhole(key).await;
                        }
                        self.table.update(|t| t.record_failed(mapping_key, e.to_string(), std_now()));
                    }
                }
            }
            Work::Delete { .. } => match session.gateway.close_pinhole(&request, id).await {
                Ok(()) => {
                    self.ownership.forget_pinhole(key).await;
                    self.table.update(|t| t.record_deleted(mapping_key, Removal::Released, std_now()));
                }
                Err(e) => self.table.update(|t| t.record_delete_failed(mapping_key, e.to_string(), std_now())),
            },
        }
        Ok(())
    }

    /// At a session's start: the journal's pinholes on this gateway are adopted where a socket wants
    /// them (and renewed now), closed where none does. Later: every pinhole is renewed now.
    pub(super) async fn audit_pinholes<G: Gateway>(&mut self, session: &GatewaySession<G>, startup: bool) {
        if !startup {
            self.table.update(|t| t.renew_pinholes_now(std_now()));
            return;
        }
        let Some(router) = self.lan6.current().router else { return };
        for (key, id) in self.ownership.pinholes_on(session.address()) {
            if self.table.update(|t| t.adopt_pinhole(key, id, std_now())) {
                continue;
            }
            let request = PinholeRequest { key, lease: self.pinhole_lease(), router };
            match session.gateway.close_pinhole(&request, id).await {
                Ok(()) => {
                    self.ownership.forget_pinhole(key).await;
                    self.table.outcomes().publish(Outcome::PinholeClosed { key, why: Removal::Leftover });
                }
                Err(e) => warn!(
                    "could not close pinhole {}/{} to [{}] left by an earlier run: {e}; its lease will end it",
                    key.protocol, key.port, key.address
                ),
            }
        }
    }

    /// Shutdown: closes one pinhole, as [`Reconciler::remove_all`] removes mappings.
    pub(super) async fn close_at_shutdown<G: Gateway>(&mut self, session: &GatewaySession<G>, key: PinholeKey) {
        let mapping_key = MappingKey::Ipv6Pinhole(key);
        let Some(router) = self.lan6.current().router else { return };
        let id =
            self.table.read(|t| t.mapping(&mapping_key).and_then(|m| m.handle)).map(|GatewayHandle::PinholeId(id)| id);
        let request = PinholeRequest { key, lease: self.pinhole_lease(), router };
        match session.gateway.close_pinhole(&request, id).await {
            Ok(()) => {
                self.ownership.forget_pinhole(key).await;
                self.table.update(|t| t.record_deleted(mapping_key, Removal::Shutdown, std_now()));
            }
            Err(e) => {
                self.table.update(|t| t.record_delete_failed(mapping_key, format!("{e} (at shutdown)"), std_now()))
            }
        }
    }
}
