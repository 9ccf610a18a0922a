//! Per-tenant quotas (`[tenant_defaults]`, `[tenants.NAME]`): what each tenant may hold, and what
//! it holds now, so one tenant filling a server-wide bound cannot refuse another.
//!
//! Invariants:
//! - A tenant's usage changes only through a [`Ticket`]: taken after the check against its quota
//!   (check and take under one lock, so concurrent requests cannot overshoot), given back when
//!   dropped — whatever path ends the connection or session that holds it.
//! - KV bytes count what a tenant's sessions hold (their tokens' blocks) plus what their running
//!   requests may still add, not what they could grow to: a session's ticket is resized when a
//!   request is accepted and when it ends.
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
        "tenant {tenant}'s sessions would hold {want} KV bytes, its kv_bytes_max is {max} \
         (ask for fewer tokens, or close a session)"
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

impl Ticket {
    /// KV bytes this ticket holds.
    pub fn kv_bytes(&self) -> u64 {
        self.took.kv_bytes
    }

    /// Makes this ticket hold `bytes` of KV (a session's blocks in use, plus what its running
    /// request may still add): less always succeeds; more is checked against the tenant's
    /// `kv_bytes_max` with what its other sessions hold, under the same lock as every take.
    pub fn set_kv_bytes(&mut self, bytes: u64) -> Result<(), QuotaError> {
        let q = self.quotas.of(&self.tenant);
        let mut usage = self.quotas.usage.lock().unwrap_or_else(|p| p.into_inner());
        let u = usage.get_mut(&self.tenant).expect("a ticket's tenant has a usage entry");
        let want = u.kv_bytes - self.took.kv_bytes + bytes;
        if bytes > self.took.kv_bytes && want > q.kv_bytes_max {
            return Err(QuotaError::KvBytes { tenant: self.tenant.to_string(), want, max: q.kv_bytes_max });
        }
        u.kv_bytes = want;
        self.took.kv_bytes = bytes;
        Ok(())
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

    /// One more session of `tenant` (at its open), holding no KV yet: its KV bytes are charged
    /// as it grows ([`Ticket::set_kv_bytes`]).
    pub fn open_session(self: &Arc<Self>, tenant: &TenantId) -> Result<Ticket, QuotaError> {
        self.take(tenant, Usage { sessions: 1, ..Default::default() }, |u, q| {
            if u.sessions >= q.sessions_max {
                return Err(QuotaError::Sessions { tenant: tenant.to_string(), held: u.sessions, max: q.sessions_max });
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
        let mut s1 = q.open_session(&a).unwrap();
        s1.set_kv_bytes(60).unwrap();
        let mut s2 = q.open_session(&a).unwrap();
        assert!(matches!(s2.set_kv_bytes(41).unwrap_err(), QuotaError::KvBytes { want: 101, max: 100, .. }));
        s2.set_kv_bytes(40).unwrap();
        assert!(matches!(q.open_session(&a).unwrap_err(), QuotaError::Sessions { held: 2, .. }));
        assert_eq!(q.sessions_of(&a), 2);
        // Shrinking always succeeds and makes room for another session's growth.
        s1.set_kv_bytes(10).unwrap();
        s2.set_kv_bytes(90).unwrap();
        drop((s1, c1));
        assert_eq!(q.sessions_of(&a), 1);
        q.connect(&a).unwrap();
        let mut s3 = q.open_session(&a).unwrap();
        assert!(s3.set_kv_bytes(11).is_err(), "s2's 90 bytes are still held");
        s3.set_kv_bytes(10).unwrap();
    }
}
