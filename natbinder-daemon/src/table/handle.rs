//! The table as the daemon's tasks share it. Every change goes through [`TableHandle::update`], which
//! does three things in one step, in this order, so that nobody can observe them apart:
//! 1. mirrors the held-elsewhere record into the kernel if the change touched it (the one component
//!    that writes the kernel's EADDRINUSE map), so that by the time anyone hears of a conflict, binds
//!    of that port already fail; and likewise the users at their mapping limit, whose binds the
//!    kernel must never refuse (they are not forwarded);
//! 2. publishes the change's outcomes;
//! 3. wakes the reconciler.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::Notify;

use super::{HeldElsewhere, PortKey, Table, TableConfig};
use crate::outcome::OutcomeBus;

/// Where the table's kernel-facing records are mirrored: the kernel's maps in the daemon.
pub trait KernelMirror: Send + Sync + 'static {
    /// Makes the mirror hold exactly `held` (the EADDRINUSE map).
    fn mirror(&self, held: &BTreeMap<PortKey, Option<Ipv4Addr>>);
    /// Makes the mirror hold exactly `uids` as the users at their mapping limit.
    fn mirror_uids_at_limit(&self, _uids: &BTreeSet<u32>) {}
}

/// A mirror that keeps nothing (unit tests that look at the table itself).
impl KernelMirror for () {
    fn mirror(&self, _held: &BTreeMap<PortKey, Option<Ipv4Addr>>) {}
}

struct Inner {
    table: Mutex<Table>,
    outcomes: OutcomeBus,
    mirror: Box<dyn KernelMirror>,
    changed: Notify,
}

/// The shared table. Cheap to clone.
#[derive(Clone)]
pub struct TableHandle {
    inner: Arc<Inner>,
}

impl TableHandle {
    pub fn new(config: TableConfig, outcomes: OutcomeBus, mirror: impl KernelMirror) -> Self {
        Self {
            inner: Arc::new(Inner {
                table: Mutex::new(Table::new(config)),
                outcomes,
                mirror: Box::new(mirror),
                changed: Notify::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic elsewhere while holding the lock leaves a table that is still consistent (every
        // method finishes its change before it returns): keep serving.
        self.inner.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `change`, then mirrors, publishes and wakes (see the module's comment).
    pub fn update<R>(&self, change: impl FnOnce(&mut Table) -> R) -> R {
        let mut table = self.lock();
        let result = change(&mut table);
        if let Some(held) = table.take_held_changes() {
            let view: BTreeMap<PortKey, Option<Ipv4Addr>> =
                held.into_iter().map(|(key, HeldElsewhere { holder, .. })| (key, holder)).collect();
            self.inner.mirror.mirror(&view);
        }
        if let Some(uids) = table.take_uids_at_limit_changes() {
            self.inner.mirror.mirror_uids_at_limit(&uids);
        }
        // Published under the lock, so that outcomes of two changes are never interleaved out of order.
        for outcome in table.take_outcomes() {
            self.inner.outcomes.publish(outcome);
        }
        drop(table);
        self.inner.changed.notify_one();
        result
    }

    /// Reads the table.
    pub fn read<R>(&self, look: impl FnOnce(&Table) -> R) -> R {
        look(&self.lock())
    }

    /// Resolves after the next change (or at once if one happened since the last wait).
    pub async fn changed(&self) {
        self.inner.changed.notified().await
    }

    pub fn outcomes(&self) -> &OutcomeBus {
        &self.inner.outcomes
    }
}
