//! The `[fleet]` table of `host.toml`: the daemon joins a fleet (a control plane's
//! database) as a host. Without the table the daemon serves its local callers only.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::Failure;
use super::limits::{at_least, table_error};

/// The `[fleet]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// The fleet's database (a libpq connection string, or a `postgresql://` URL).
    pub database: String,
    /// The host's name in the fleet (its VMs are `host/vm` there).
    pub host: String,
    /// The host's labels (a VM's own labels win over its host's in selectors).
    pub labels: BTreeMap<String, String>,
    /// The principal of this host's `[[principal]]`s as which the fleet's invocations run:
    /// its rights here decide what the fleet may run on this host's VMs.
    pub principal: String,
    /// How long a claim holds an invocation without the heartbeat renewing it.
    pub lease: Duration,
    /// Period of the heartbeat.
    pub heartbeat: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    database: Spanned<String>,
    host: Spanned<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    principal: Spanned<String>,
    lease_ms: Option<Spanned<u64>>,
    heartbeat_ms: Option<Spanned<u64>>,
}

fn is_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

impl RawFleet {
    /// Where `principal` is written.
    pub(super) fn principal_span(&self) -> std::ops::Range<usize> {
        self.principal.span()
    }

    pub(super) fn check(self) -> Result<FleetConfig, Failure> {
        const T: &str = "fleet";
        if self.database.get_ref().trim().is_empty() {
            return Err(table_error(T, self.database.span(), "database", "is empty"));
        }
        if !is_name(self.host.get_ref()) {
            return Err(table_error(
                T,
                self.host.span(),
                "host",
                "must be 1 to 63 of A-Z a-z 0-9 _ . -",
            ));
        }
        for (k, v) in &self.labels {
            if !is_name(k) || !is_name(v) {
                return Err(table_error(
                    T,
                    self.host.span(),
                    "labels",
                    &format!("{k:?} = {v:?}: keys and values are 1 to 63 of A-Z a-z 0-9 _ . -"),
                ));
            }
        }
        let heartbeat = at_least(T, "heartbeat_ms", self.heartbeat_ms, 100, 2000)?;
        let lease = at_least(T, "lease_ms", self.lease_ms, 1000, 30_000)?;
        if lease < heartbeat * 3 {
            return Err(table_error(
                T,
                self.principal.span(),
                "lease_ms",
                "must be at least 3 heartbeats (heartbeat_ms), so that a lease outlives a late beat",
            ));
        }
        Ok(FleetConfig {
            database: self.database.into_inner(),
            host: self.host.into_inner(),
            labels: self.labels,
            principal: self.principal.into_inner(),
            lease: Duration::from_millis(lease),
            heartbeat: Duration::from_millis(heartbeat),
        })
    }
}
