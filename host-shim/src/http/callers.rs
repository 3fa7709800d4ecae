//! What callers of the API may make the daemon spend (`[callers]` in `host.toml`):
//!
//! - **Denied calls** of one peer (a TCP address, a unix uid) are audited one by one up to
//!   `denied_per_peer` per interval; the rest are refused all the same and counted, and the
//!   interval's count goes into one audit entry (`count` > 1) when it ends. So a stranger
//!   who floods the daemon adds a bounded number of rows, and the daemon tracks at most
//!   [`MAX_PEERS`] peers (more are counted together).
//! - **Follow streams**: at most `follows_per_principal` open at once per principal.
//! - **Pushes**: at most `pushes_in_flight` taken in at once.
//!
//! It also keeps the counts the daemon reports (`GET /v1/daemon`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

use crate::config::CallersConfig;
use crate::records::AuditEntry;

/// Most peers whose denied calls are counted one by one; beyond, they share one count.
pub const MAX_PEERS: usize = 4096;
/// The peer that stands for all peers past [`MAX_PEERS`].
const OTHER_PEERS: &str = "(other peers)";

/// One peer's denied calls in the current interval.
struct Window {
    started_ms: u64,
    /// Entries written one by one.
    written: u32,
    /// Calls counted, not yet written.
    counted: u64,
    /// The last counted call, and whether all counted calls agree with it on these.
    last: Option<AuditEntry>,
    same_principal: bool,
    same_action: bool,
    same_target: bool,
}

impl Window {
    fn new(now_ms: u64) -> Self {
        Self {
            started_ms: now_ms,
            written: 0,
            counted: 0,
            last: None,
            same_principal: true,
            same_action: true,
            same_target: true,
        }
    }

    fn count(&mut self, entry: AuditEntry) {
        if let Some(last) = &self.last {
            self.same_principal &= last.principal == entry.principal;
            self.same_action &= last.action == entry.action;
            self.same_target &= last.target == entry.target;
        }
        self.counted += 1;
        self.last = Some(entry);
    }

    /// The entry that stands for the counted calls, if any.
    fn summary(&mut self, peer: &str, now_ms: u64) -> Option<AuditEntry> {
        let mut entry = self.last.take()?;
        let count = std::mem::take(&mut self.counted);
        entry.at_ms = now_ms;
        entry.count = count;
        if !self.same_principal {
            entry.principal = None;
        }
        if !self.same_action {
            "(various)".clone_into(&mut entry.action);
        }
        if !self.same_target {
            entry.target = None;
        }
        let last = entry.reason.take().unwrap_or_default();
        entry.reason = Some(format!(
            "{count} denied calls from {peer} past its {} audited one by one in this interval \
             (the last: {last})",
            self.written
        ));
        if peer == OTHER_PEERS {
            OTHER_PEERS.clone_into(&mut entry.caller);
        }
        Some(entry)
    }
}

/// The counts the daemon reports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CallerCounts {
    /// Follow streams open, by principal.
    pub follows: BTreeMap<String, u32>,
    /// Follow streams open, in all.
    pub follows_open: u32,
    /// Pushes being taken in.
    pub pushes_in_flight: u32,
    /// Peers whose denied calls are being counted.
    pub denied_peers: usize,
}

/// The daemon's accounting of its callers.
pub struct Callers {
    config: CallersConfig,
    windows: Mutex<HashMap<String, Window>>,
    follows: Arc<Mutex<BTreeMap<String, u32>>>,
    pushes: Arc<tokio::sync::Semaphore>,
}

/// An open follow stream, counted against its principal until dropped.
pub struct FollowSlot {
    follows: Arc<Mutex<BTreeMap<String, u32>>>,
    principal: String,
}

impl Drop for FollowSlot {
    fn drop(&mut self) {
        let mut follows = self.follows.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = follows.get_mut(&self.principal) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                follows.remove(&self.principal);
            }
        }
    }
}

/// A push being taken in, counted until dropped.
pub type PushSlot = tokio::sync::OwnedSemaphorePermit;

impl Callers {
    /// Accounting with `config`'s limits.
    pub fn new(config: CallersConfig) -> Self {
        Self {
            config,
            windows: Mutex::new(HashMap::new()),
            follows: Arc::new(Mutex::new(BTreeMap::new())),
            pushes: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(config.pushes_in_flight).unwrap_or(usize::MAX),
            )),
        }
    }

    fn interval_ms(&self) -> u64 {
        u64::try_from(self.config.denied_interval.as_millis()).unwrap_or(u64::MAX)
    }

    /// A denied call of `peer`: the audit entries to write now. Within the peer's budget,
    /// the call's own entry; past it nothing (the call is counted), except that the count of
    /// an interval that has ended comes first.
    pub fn denied(&self, peer: &str, entry: AuditEntry, now_ms: u64) -> Vec<AuditEntry> {
        let interval = self.interval_ms();
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let key = if windows.contains_key(peer) || windows.len() < MAX_PEERS {
            peer
        } else {
            OTHER_PEERS
        };
        let window = windows
            .entry(key.to_owned())
            .or_insert_with(|| Window::new(now_ms));
        let mut out = Vec::new();
        if now_ms.saturating_sub(window.started_ms) >= interval {
            out.extend(window.summary(key, now_ms));
            *window = Window::new(now_ms);
        }
        if window.written < self.config.denied_per_peer && key != OTHER_PEERS {
            window.written += 1;
            out.push(entry);
        } else {
            window.count(entry);
        }
        out
    }

    /// The counts of intervals that have ended (all of them with `all`, as the daemon
    /// stops), to be written; peers without calls for an interval are forgotten.
    pub fn flush(&self, now_ms: u64, all: bool) -> Vec<AuditEntry> {
        let interval = self.interval_ms();
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        windows.retain(|peer, w| {
            if all || now_ms.saturating_sub(w.started_ms) >= interval {
                out.extend(w.summary(peer, now_ms));
                false
            } else {
                true
            }
        });
        out
    }

    /// A follow stream for `principal`, if it has fewer than `follows_per_principal` open.
    pub fn open_follow(&self, principal: &str) -> Option<FollowSlot> {
        let mut follows = self.follows.lock().unwrap_or_else(PoisonError::into_inner);
        let n = follows.entry(principal.to_owned()).or_insert(0);
        if *n >= self.config.follows_per_principal {
            return None;
        }
        *n += 1;
        Some(FollowSlot {
            follows: self.follows.clone(),
            principal: principal.to_owned(),
        })
    }

    /// Room for one more push, if fewer than `pushes_in_flight` are being taken in.
    pub fn push_slot(&self) -> Option<PushSlot> {
        self.pushes.clone().try_acquire_owned().ok()
    }

    /// The most follow streams of one principal.
    pub fn follow_limit(&self) -> u32 {
        self.config.follows_per_principal
    }

    /// The most pushes at once.
    pub fn push_limit(&self) -> u32 {
        self.config.pushes_in_flight
    }

    /// The counts the daemon reports.
    pub fn counts(&self) -> CallerCounts {
        let follows = self
            .follows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let limit = usize::try_from(self.config.pushes_in_flight).unwrap_or(usize::MAX);
        CallerCounts {
            follows_open: follows.values().sum(),
            follows,
            pushes_in_flight: u32::try_from(limit.saturating_sub(self.pushes.available_permits()))
                .unwrap_or(u32::MAX),
            denied_peers: self
                .windows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(per_peer: u32) -> CallersConfig {
        CallersConfig {
            follows_per_principal: 2,
            pushes_in_flight: 1,
            denied_per_peer: per_peer,
            denied_interval: Duration::from_secs(60),
        }
    }

    fn denial(action: &str, target: &str) -> AuditEntry {
        AuditEntry {
            at_ms: 0,
            principal: None,
            caller: "tcp 10.0.0.1:5000 (no token)".into(),
            action: action.into(),
            target: Some(target.into()),
            allowed: false,
            reason: Some("no token".into()),
            count: 1,
        }
    }

    #[test]
    fn a_peers_denials_past_its_budget_become_one_counted_entry() {
        let c = Callers::new(config(3));
        let mut written = Vec::new();
        for k in 0..1000 {
            written.extend(c.denied("10.0.0.1", denial("exec", "vm1"), 1000 + k));
        }
        assert_eq!(written.len(), 3, "only the budget is written at once");
        // Another peer has its own budget.
        assert_eq!(c.denied("10.0.0.2", denial("ping", "vm2"), 2000).len(), 1);
        // Nothing before the interval ends; then one entry with the count.
        assert!(c.flush(30_000, false).is_empty());
        let flushed = c.flush(62_000, false);
        assert_eq!(flushed.len(), 1, "{flushed:?}");
        let summary = &flushed[0];
        assert_eq!(summary.count, 997);
        assert_eq!(summary.action, "exec");
        assert_eq!(summary.target.as_deref(), Some("vm1"));
        assert!(!summary.allowed);
        assert!(
            summary
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("997 denied calls from 10.0.0.1"),
            "{summary:?}"
        );
        // The peer starts afresh.
        assert_eq!(c.denied("10.0.0.1", denial("exec", "vm1"), 70_000).len(), 1);
        assert_eq!(c.counts().denied_peers, 1, "the quiet peer was forgotten");
    }

    #[test]
    fn an_interval_that_ended_is_written_before_the_next_call_and_mixed_calls_say_so() {
        let c = Callers::new(config(1));
        assert_eq!(c.denied("p", denial("exec", "vm1"), 0).len(), 1);
        assert!(c.denied("p", denial("exec", "vm1"), 1).is_empty());
        assert!(c.denied("p", denial("ping", "vm2"), 2).is_empty());
        let out = c.denied("p", denial("exec", "vm1"), 60_000);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].count, 2);
        assert_eq!(out[0].action, "(various)");
        assert_eq!(out[0].target, None);
        assert_eq!(out[1].count, 1);
        // Stopping writes what is still counted.
        assert!(c.denied("p", denial("exec", "vm1"), 60_001).is_empty());
        let last = c.flush(60_002, true);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].count, 1);
    }

    #[test]
    fn peers_past_the_tracked_limit_share_one_count() {
        let c = Callers::new(config(1));
        let mut written = 0;
        for k in 0..(MAX_PEERS + 500) {
            written += c
                .denied(&format!("peer{k}"), denial("exec", "vm1"), 5)
                .len();
        }
        assert_eq!(written, MAX_PEERS);
        assert_eq!(c.counts().denied_peers, MAX_PEERS + 1);
        let flushed = c.flush(120_000, false);
        let others: Vec<_> = flushed.iter().filter(|e| e.caller == OTHER_PEERS).collect();
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].count, 500);
    }

    #[test]
    fn follows_and_pushes_are_bounded_and_given_back() {
        let c = Callers::new(config(1));
        let a = c.open_follow("ops").expect("first");
        let _b = c.open_follow("ops").expect("second");
        assert!(c.open_follow("ops").is_none(), "over the limit");
        assert!(c.open_follow("dev").is_some(), "per principal");
        assert_eq!(c.counts().follows.get("ops"), Some(&2));
        drop(a);
        assert!(c.open_follow("ops").is_some());
        let push = c.push_slot().expect("one push");
        assert!(c.push_slot().is_none());
        assert_eq!(c.counts().pushes_in_flight, 1);
        drop(push);
        assert!(c.push_slot().is_some());
    }
}
