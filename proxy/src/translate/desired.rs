//! The desired state of all Services: their frontends indexed by key,
//! clashes between Services settled (the first to claim keeps a frontend
//! or NodePort), and who still uses each backend address.

#![forbid(unsafe_code)] // pure: values in, values out (ARCHITECTURE.md)

use crate::model::{
    BackendInfo, DesiredFrontend, FastMap, FrontendKey, HealthCheck, L4Addr, Protocol, Scope,
    ServiceDesired, ServiceName,
};
use crate::parse::InvalidObject;

/// The desired state of every Service, indexed by frontend, with what
/// settles clashes and counts who still uses each backend address.
#[derive(Debug, Default)]
pub struct DesiredState {
    frontends: FastMap<FrontendKey, DesiredFrontend>,
    services: FastMap<ServiceName, ServiceEntry>,
    node_ports: FastMap<(u16, Protocol), ServiceName>,
    /// Who names each backend address (as a backend or draining).
    backend_refs: FastMap<L4Addr, BackendUse>,
}

/// How the desired frontends see one backend address. Two Services may see
/// one address differently for a moment (their slices update separately);
/// the backend entry's flags are merged from all of them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendUse {
    pub users: u32,
    pub local: u32,
    pub terminating: u32,
}

impl BackendUse {
    /// The address is on this node for some user.
    pub fn local(&self) -> bool {
        self.local > 0
    }

    /// Every user sees it terminating (not ready).
    pub fn terminating(&self) -> bool {
        self.terminating == self.users
    }

    fn add(&mut self, b: &BackendInfo, sign: i32) {
        let step = |v: &mut u32, on: bool| {
            if on {
                *v = v.saturating_add_signed(sign);
            }
        };
        step(&mut self.users, true);
        step(&mut self.local, b.local);
        step(&mut self.terminating, b.terminating);
    }
}

/// What the desired state keeps per Service besides its frontends.
#[derive(Debug, Default, Clone)]
pub struct ServiceEntry {
    pub frontends: Vec<FrontendKey>,
    pub health_check: Option<HealthCheck>,
    /// Backends beyond the capacity per frontend, not served.
    pub left_out: usize,
}

impl DesiredState {
    pub fn frontend(&self, key: &FrontendKey) -> Option<&DesiredFrontend> {
        self.frontends.get(key)
    }

    pub fn frontends(&self) -> &FastMap<FrontendKey, DesiredFrontend> {
        &self.frontends
    }

    pub fn services(&self) -> &FastMap<ServiceName, ServiceEntry> {
        &self.services
    }

    /// True while some desired frontend names `addr`.
    pub fn uses_backend(&self, addr: &L4Addr) -> bool {
        self.backend_refs.contains_key(addr)
    }

    /// Number of distinct backend addresses named by desired frontends.
    pub fn backend_count(&self) -> usize {
        self.backend_refs.len()
    }

    /// Room for `services` more Services (a full translation).
    pub fn reserve(&mut self, services: usize) {
        self.services.reserve(services);
        self.frontends.reserve(services);
    }

    /// How the desired frontends see `addr`, if any names it.
    pub fn backend_use(&self, addr: &L4Addr) -> Option<BackendUse> {
        self.backend_refs.get(addr).copied()
    }

    /// Sets (or with None removes) one Service and adds to `touched` the
    /// frontend keys and backend addresses that may have changed (old and
    /// new), for an incremental plan. A Service that would take a frontend
    /// address or NodePort another Service holds is refused whole (and
    /// removed if it was there).
    pub fn set(
        &mut self,
        name: &ServiceName,
        desired: Option<ServiceDesired>,
        mut touched: Option<&mut Touched>,
    ) -> Result<(), InvalidObject> {
        self.release(name, touched.as_deref_mut());
        let Some(desired) = desired else {
            return Ok(());
        };
        self.check_clashes(name, &desired)?;
        let mut entry = ServiceEntry {
            frontends: Vec::with_capacity(desired.frontends.len()),
            health_check: desired.health_check,
            left_out: desired.left_out,
        };
        for f in desired.frontends {
            if f.policy.scope == Scope::NodePort {
                self.node_ports
                    .insert((f.key.port, f.key.protocol), name.clone());
            }
            for b in f.backends.iter().chain(f.draining.iter()) {
                self.backend_refs.entry(b.addr).or_default().add(b, 1);
            }
            if let Some(t) = touched.as_deref_mut() {
                t.backends
                    .extend(f.backends.iter().chain(f.draining.iter()).map(|b| b.addr));
                t.frontends.push(f.key);
            }
            entry.frontends.push(f.key);
            self.frontends.insert(f.key, f);
        }
        self.services.insert(name.clone(), entry);
        Ok(())
    }

    fn check_clashes(
        &self,
        name: &ServiceName,
        desired: &ServiceDesired,
    ) -> Result<(), InvalidObject> {
        for f in &desired.frontends {
            let node_port_owner = (f.policy.scope == Scope::NodePort)
                .then(|| self.node_ports.get(&(f.key.port, f.key.protocol)))
                .flatten();
            let reason = if let Some(owner) = node_port_owner {
                format!(
                    "NodePort {}/{} is already used by {owner}",
                    f.key.port, f.key.protocol
                )
            } else if let Some(other) = self.frontends.get(&f.key) {
                format!("frontend {} is already used by {}", f.key, other.service)
            } else {
                continue;
            };
            return Err(InvalidObject {
                kind: "Service",
                object: name.clone(),
                field: format!("port {:?}", &*f.port_name),
                reason,
            });
        }
        Ok(())
    }

    fn release(&mut self, name: &ServiceName, mut touched: Option<&mut Touched>) {
        let Some(old) = self.services.remove(name) else {
            return;
        };
        for key in &old.frontends {
            let Some(f) = self.frontends.remove(key) else {
                continue;
            };
            if f.policy.scope == Scope::NodePort {
                self.node_ports.remove(&(key.port, key.protocol));
            }
            for b in f.backends.iter().chain(f.draining.iter()) {
                if let Some(t) = touched.as_deref_mut() {
                    t.backends.push(b.addr);
                }
                if let Some(u) = self.backend_refs.get_mut(&b.addr) {
                    u.add(b, -1);
                    if u.users == 0 {
                        self.backend_refs.remove(&b.addr);
                    }
                }
            }
        }
        if let Some(t) = touched {
            t.frontends.extend(old.frontends);
        }
    }
}

/// Frontend keys and backend addresses a change may have affected: the
/// scope of an incremental plan.
#[derive(Debug, Default, Clone)]
pub struct Touched {
    pub frontends: Vec<FrontendKey>,
    pub backends: Vec<L4Addr>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.frontends.is_empty() && self.backends.is_empty()
    }

    /// Sorts and removes duplicates.
    pub fn normalize(&mut self) {
        self.frontends.sort();
        self.frontends.dedup();
        self.backends.sort();
        self.backends.dedup();
    }
}
