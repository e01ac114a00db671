//! The policy applied to real programs: fills in what it needs to know about a socket's owner (from
//! [`crate::host::process`]) and decides. Shared by the event loop (binds) and resync (adopted
//! sockets); replaced whole on reload.
use std::sync::{Arc, RwLock};

use natbinder_common::PolicyRule;

use super::{kernel, Decision, Policy, Subject};
use crate::{
    host::process::{self, CgroupNames},
    table::Listener,
};

pub struct Exposure {
    policy: RwLock<Arc<Policy>>,
    cgroups: CgroupNames,
}

impl Exposure {
    pub fn new(policy: Policy, cgroups: CgroupNames) -> Self {
        Self { policy: RwLock::new(Arc::new(policy)), cgroups }
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// The policy as the kernel programs check it, for this machine's cgroups.
    pub fn kernel_rules(&self) -> Vec<PolicyRule> {
        kernel::compile(&self.policy(), |path| self.cgroups.resolve(path))
    }

    /// Reads what the policy needs about `listener`'s owner, then decides.
    pub fn admit(&self, listener: &mut Listener) -> Decision {
        let owner = &mut listener.owner;
        owner.cgroup = self.cgroups.path_of(owner.pid, owner.cgroup_id);
        owner.exe = process::exe(owner.pid);
        let policy = self.policy();
        if policy.uses_groups() {
            owner.groups = process::supplementary_groups(owner.pid);
        }
        decide(&policy, listener)
    }

    /// Decides again on what is known already (a reload).
    pub fn decide(&self, listener: &Listener) -> Decision {
        decide(&self.policy(), listener)
    }
}

fn decide(policy: &Policy, l: &Listener) -> Decision {
    policy.decide(&Subject {
        protocol: l.protocol,
        port: l.port,
        uid: l.owner.uid,
        gid: l.owner.gid,
        groups: &l.owner.groups,
        cgroup: l.owner.cgroup.as_deref(),
        exe: l.owner.exe.as_deref(),
    })
}
