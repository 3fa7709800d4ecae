//! The audit log: one entry per authorization decision.

use serde::{Deserialize, Serialize};

/// One audited call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When (ms since the epoch).
    pub at_ms: u64,
    /// The principal the caller was identified as; `None` for an unidentified caller.
    #[serde(default)]
    pub principal: Option<String>,
    /// How the caller presented itself (`"uid=1000 gid=1000"`, `"token"`).
    #[serde(default)]
    pub caller: String,
    /// What it asked for (`"exec"`, `"list_commands"`, ...).
    pub action: String,
    /// What it asked about (a VM, an execution id), if anything.
    #[serde(default)]
    pub target: Option<String>,
    /// Whether it was allowed.
    pub allowed: bool,
    /// Why it was denied (or a note on why it was allowed).
    #[serde(default)]
    pub reason: Option<String>,
    /// How many calls the entry stands for: 1, or more for the denied calls of one peer
    /// counted together once its budget of single entries was spent (the entry then
    /// describes the last of them, and its time is the end of the interval).
    #[serde(default = "one")]
    pub count: u64,
}

fn one() -> u64 {
    1
}

/// A stored audit entry: its sequence number, then the entry's fields (flattened in JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Its sequence number, increasing in insertion order.
    pub id: u64,
    /// What was audited.
    #[serde(flatten)]
    pub entry: AuditEntry,
}

/// `GET /v1/audit`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    /// The entries, in the order asked for.
    pub entries: Vec<AuditRecord>,
}

/// The order of an audit query's answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuditOrder {
    /// Oldest first; with a limit, the oldest entries that match.
    #[default]
    Oldest,
    /// Newest first; with a limit, the newest entries that match.
    Newest,
}

/// Which audit entries to fetch (`GET /v1/audit`); unset fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only of this principal.
    pub principal: Option<String>,
    /// Only of this action.
    pub action: Option<String>,
    /// Only allowed (`true`) or only denied (`false`) calls.
    pub allowed: Option<bool>,
    /// Only at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// At most this many.
    pub limit: Option<usize>,
    /// Oldest or newest first.
    pub order: AuditOrder,
}

impl AuditQuery {
    /// The query string, without the `?`.
    pub(crate) fn query_string(&self) -> String {
        let mut q = crate::client::Query::default();
        if let Some(p) = &self.principal {
            q.push("principal", p);
        }
        if let Some(a) = &self.action {
            q.push("action", a);
        }
        if let Some(allowed) = self.allowed {
            q.push("allowed", if allowed { "true" } else { "false" });
        }
        if let Some(since) = self.since_ms {
            q.push("since_ms", &since.to_string());
        }
        if let Some(limit) = self.limit {
            q.push("limit", &limit.to_string());
        }
        q.push(
            "order",
            match self.order {
                AuditOrder::Oldest => "oldest",
                AuditOrder::Newest => "newest",
            },
        );
        q.0
    }
}
