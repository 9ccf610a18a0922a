//! Per-tenant quotas (`[tenant_defaults]`, `[tenants.NAME]`): what each tenant may hold, and what
//! it holds now, so one tenant filling a server-wide bound cannot refuse another.
//!
//! Invariants:
//! - A tenant's usage changes only through a [`Ticket`]: taken after the check against its quota
//!   (check and take under one lock, so concurrent requests cannot overshoot), given back when
//!   dropped — whatever path ends the connection or session that holds it.
//! - Anonymous tenants (no token file) are connections: each gets the defaults for itself.
//! - The usage table holds one entry per tenant holding anything, removed when its last ticket
//!   goes; it is bounded by the connections and sessions that exist.
//!
//! Tensor handles and bytes are counted by the handle tables ([`crate::tensors`]), which read
//! their bounds from [`Quotas::of`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use djinn_proto::Status;

use crate::auth::TenantId;
use crate::config::{ServerConfig, TenantQuota};

/// A tenant's quota does not allow the request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("tenant {tenant} has {held} connections open, its connections_max is {max}")]
    Connections { tenant: String, held: usize, max: usize },
    #[error("tenant {tenant} has {held} sessions open, its sessions_max is {max}")]
    Sessions { tenant: String, held: usize, max: usize },
    #[error(
        "tenant {tenant}'s sessions would reach {want} KV bytes, its kv_bytes_max is {max} \
         (open with a smaller max_tokens, or close a session)"
    )]
    KvBytes { tenant: String, want: u64, max: u64 },
}

impl QuotaError {
    pub fn status(&self) -> Status {
        match self {
            QuotaError::Connections { .. } => Status::Busy,
            QuotaError::Sessions { .. } | QuotaError::KvBytes { .. } => Status::LimitExceeded,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Usage {
    connections: usize,
    sessions: usize,
    kv_bytes: u64,
}

/// Every tenant's quota and usage.
#[derive(Debug)]
pub struct Quotas {
    defaults: TenantQuota,
    named: BTreeMap<String, TenantQuota>,
    usage: Mutex<HashMap<TenantId, Usage>>,
}

/// Usage held for a connection or a session; dropping it gives the usage back.
#[derive(Debug)]
pub struct Ticket {
    quotas: Arc<Quotas>,
    tenant: TenantId,
    took: Usage,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut usage = self.quotas.usage.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = usage.get_mut(&self.tenant) {
            u.connections -= self.took.connections;
            u.sessions -= self.took.sessions;
            u.kv_bytes -= self.took.kv_bytes;
            if *u == Usage::default() {
                usage.remove(&self.tenant);
            }
        }
    }
}

impl Quotas {
    pub fn new(cfg: &ServerConfig) -> Arc<Self> {
        let named = cfg.tenants.keys().map(|n| (n.clone(), cfg.quota_of(Some(n)))).collect();
        Arc::new(Quotas { defaults: cfg.tenant_defaults.clone(), named, usage: Mutex::new(HashMap::new()) })
    }

    /// The quota of `tenant`.
    pub fn of(&self, tenant: &TenantId) -> &TenantQuota {
        match tenant {
            TenantId::Named(n) => self.named.get(n).unwrap_or(&self.defaults),
            TenantId::Connection(_) => &self.defaults,
        }
    }

    fn take(
        self: &Arc<Self>,
        tenant: &TenantId,
        took: Usage,
        check: impl FnOnce(&Usage, &TenantQuota) -> Result<(), QuotaError>,
    ) -> Result<Ticket, QuotaError> {
        let q = self.of(tenant);
        let mut usage = self.usage.lock().unwrap_or_else(|p| p.into_inner());
        let u = usage.entry(tenant.clone()).or_default();
        if let Err(e) = check(u, q) {
            if *u == Usage::default() {
                usage.remove(tenant);
            }
            return Err(e);
        }
        u.connections += took.connections;
        u.sessions += took.sessions;
        u.kv_bytes += took.kv_bytes;
        Ok(Ticket { quotas: self.clone(), tenant: tenant.clone(), took })
    }

    /// One more connection of `tenant` (at its Hello).
    pub fn connect(self: &Arc<Self>, tenant: &TenantId) -> Result<Ticket, QuotaError> {
        self.take(tenant, Usage { connections: 1, ..Default::default() }, |u, q| {
            if u.connections >= q.connections_max {
                return Err(QuotaError::Connections {
                    tenant: tenant.to_string(),
                    held: u.connections,
                    max: q.connections_max,
                });
            }
            Ok(())
        })
    }

    /// One more session of `tenant` whose KV may grow to `kv_bytes` (at its open).
    pub fn open_session(self: &Arc<Self>, tenant: &TenantId, kv_bytes: u64) -> Result<Ticket, QuotaError> {
        self.take(tenant, Usage { sessions: 1, kv_bytes, ..Default::default() }, |u, q| {
            if u.sessions >= q.sessions_max {
                return Err(QuotaError::Sessions { tenant: tenant.to_string(), held: u.sessions, max: q.sessions_max });
            }
            let want = u.kv_bytes.saturating_add(kv_bytes);
            if want > q.kv_bytes_max {
                return Err(QuotaError::KvBytes { tenant: tenant.to_string(), want, max: q.kv_bytes_max });
            }
            Ok(())
        })
    }

    /// Connections of `tenant` that said Hello and are open now.
    pub fn connections_of(&self, tenant: &TenantId) -> usize {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).get(tenant).map_or(0, |u| u.connections)
    }

    /// Sessions `tenant` holds open now.
    pub fn sessions_of(&self, tenant: &TenantId) -> usize {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).get(tenant).map_or(0, |u| u.sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_count_per_tenant_and_give_back_on_drop() {
        let cfg = ServerConfig::from_toml(
            "[tenant_defaults]\nconnections_max = 1\nsessions_max = 2\nkv_bytes_max = 100\n\
             [tenants.big]\nconnections_max = 3\n",
        )
        .unwrap();
        let q = Quotas::new(&cfg);
        let (a, big) = (TenantId::Named("a".into()), TenantId::Named("big".into()));
        let c1 = q.connect(&a).unwrap();
        assert_eq!(q.connect(&a).unwrap_err().status(), Status::Busy);
        let _b: Vec<Ticket> = (0..3).map(|_| q.connect(&big).unwrap()).collect();
        assert!(q.connect(&TenantId::Connection(7)).is_ok(), "anonymous connections are tenants of their own");
        let s1 = q.open_session(&a, 60).unwrap();
        assert!(matches!(q.open_session(&a, 41).unwrap_err(), QuotaError::KvBytes { want: 101, max: 100, .. }));
        let _s2 = q.open_session(&a, 40).unwrap();
        assert!(matches!(q.open_session(&a, 0).unwrap_err(), QuotaError::Sessions { held: 2, .. }));
        assert_eq!(q.sessions_of(&a), 2);
        drop((s1, c1));
        assert_eq!(q.sessions_of(&a), 1);
        q.connect(&a).unwrap();
        q.open_session(&a, 60).unwrap();
    }
}
