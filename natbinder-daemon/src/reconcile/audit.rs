//! The periodic check of the gateway against the table, in one of three kinds, by what the gateway
//! can tell:
//! * [`Reconciler::audit_listing`]: the whole table (UPnP IGD). Ports other hosts hold become the
//!   held-elsewhere record, mappings of ours the gateway lost are made again, leftovers of earlier
//!   runs are deleted;
//! * [`Reconciler::audit_entry_by_entry`]: gateways that cannot list (IGD 401 on the listing calls):
//!   GetSpecificPortMappingEntry for each mapping we hold;
//! * [`Reconciler::audit_without_table`]: NAT-PMP and PCP. An exchange checks the epoch; at start-up
//!   the journal's mappings no socket wants are deleted; every mapping is renewed, which is both the
//!   check and the repair; ports learned to be held elsewhere are believed for a while, then asked
//!   for again.
//!
//! The table decides what each finding means ([`crate::table::Table::audit_listing`] and friends);
//! the audits gather findings and make the calls those decisions need.
use std::collections::HashSet;

use tracing::{debug, info, warn};

use super::{ownership::EntryOwner, std_now, Reconciler};
use crate::{
    gateway::{session::GatewaySession, AddError, Gateway, GatewayEntry},
    outcome::Removal,
    table::{Listing, MappingKey, PortKey},
};

impl Reconciler {
    /// Checks the gateway against the table. `startup`: the first check of a session, which also
    /// adopts or deletes what an earlier run left.
    pub(super) async fn audit<G: Gateway>(
        &mut self,
        session: &mut GatewaySession<G>,
        startup: bool,
    ) -> Result<(), AddError> {
        if !session.gateway.can_read_table() {
            return self.audit_without_table(session, startup).await;
        }
        match session.gateway.list().await {
            Ok(entries) => self.audit_listing(session, &entries, startup).await,
            Err(AddError::Unreachable(e)) => Err(AddError::Unreachable(e)),
            Err(e) => {
                debug!("could not list the gateway's port mapping table ({e}); checking our mappings one by one");
                self.audit_entry_by_entry(session).await
            }
        }
    }

    pub(super) async fn audit_listing<G: Gateway>(
        &mut self,
        session: &mut GatewaySession<G>,
        entries: &[GatewayEntry],
        startup: bool,
    ) -> Result<(), AddError> {
        let mut listing = Listing::default();
        let mut listed = HashSet::new();
        for entry in entries {
            let key = PortKey::new(entry.protocol, entry.external_port);
            listed.insert(key);
            match self.ownership.classify(entry, &session.lan) {
                EntryOwner::Ours { points_here: true } => {
                    listing.ours_here.insert(key);
                }
                EntryOwner::Ours { points_here: false } => {
                    info!(
                        "{key} on the gateway points to {}:{}, not here: repairing",
                        entry.internal_client, entry.internal_port
                    );
                    listing.ours_drifted.insert(key);
                }
                EntryOwner::OtherHost(holder) if entry.enabled => listing.held.push((key, holder)),
                EntryOwner::OtherHost(_) | EntryOwner::ThisHost => {}
            }
        }
        self.ownership.forget_unlisted(session.address(), &listed).await;
        let gateway = session.address();
        let stale = self.table.update(|t| t.audit_listing(gateway, listing, startup, std_now()));
        self.delete_stale(session, stale).await
    }

    pub(super) async fn audit_entry_by_entry<G: Gateway>(
        &mut self,
        session: &mut GatewaySession<G>,
    ) -> Result<(), AddError> {
        let active = self.table.read(|t| t.active_wanted());
        let mut dropped = Vec::new();
        for key in active.iter().filter_map(MappingKey::as_ipv4) {
            let entry = match session.gateway.lookup(key.protocol, key.port).await {
                Ok(entry) => entry,
                Err(AddError::Unreachable(e)) => return Err(AddError::Unreachable(e)),
                Err(e) => {
                    warn!("could not check mapping {key} on the gateway: {e}");
                    continue;
                }
            };
            let here = entry.as_ref().is_some_and(|e| {
                e.internal_ipv4().is_none_or(|ip| ip == session.lan.local) && e.internal_port == key.port
            });
            if !here {
                dropped.push(key);
            }
        }
        self.table.update(|t| t.record_dropped(&dropped, std_now()));
        Ok(())
    }

    pub(super) async fn audit_without_table<G: Gateway>(
        &mut self,
        session: &mut GatewaySession<G>,
        startup: bool,
    ) -> Result<(), AddError> {
        session.refresh_external_address().await?;
        if startup {
            // The protocols name a mapping by this host, protocol and port (and PCP's nonce is derived
            // again), so what an earlier run made can be deleted without seeing it.
            let journalled = self.ownership.journalled_on(session.address(), session.lan.local);
            let mut stale = Vec::new();
            for key in journalled {
                if !self.table.update(|t| t.adopt_existing(MappingKey::Ipv4(key), std_now())) {
                    stale.push((key, Removal::Leftover));
                }
            }
            self.delete_stale(session, stale).await?;
        }
        self.table.update(|t| {
            let now = std_now();
            t.audit_unlisted(now);
            if !startup {
                t.renew_all_now(now);
            }
        });
        Ok(())
    }

    async fn delete_stale<G: Gateway>(
        &mut self,
        session: &mut GatewaySession<G>,
        stale: Vec<(PortKey, Removal)>,
    ) -> Result<(), AddError> {
        for (key, why) in stale {
            match session.delete(key).await {
                Ok(()) => {
                    self.ownership.forget(key).await;
                    self.table.update(|t| t.record_deleted(MappingKey::Ipv4(key), why, std_now()));
                }
                Err(AddError::Unreachable(e)) => return Err(AddError::Unreachable(e)),
                Err(e) => warn!("could not remove {key} ({why:?}): {e}; its lease will end it"),
            }
        }
        Ok(())
    }
}
