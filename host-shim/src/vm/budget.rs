//! The driver's side of a VM's budget: token buckets that pace what the guest sends,
//! the count of its protocol violations, and the budgets whose excess cuts it off.

use std::time::{Duration, Instant};

/// A budget whose excess cuts the guest off (its channel is reset and it is backed off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Limit {
    /// `queued_bytes`: messages waiting toward a guest that does not read its ring.
    QueuedBytes,
    /// `listing_entries`: commands in one listing.
    ListingEntries,
    /// `listing_bytes`: the size of one listing.
    ListingBytes,
    /// `violations_per_min`: protocol violations in a minute.
    Violations,
}

impl Limit {
    /// The budget's key in `[budget]`.
    pub(super) fn key(self) -> &'static str {
        match self {
            Self::QueuedBytes => "queued_bytes",
            Self::ListingEntries => "listing_entries",
            Self::ListingBytes => "listing_bytes",
            Self::Violations => "violations_per_min",
        }
    }
}

/// A token bucket: `rate` tokens a second, at most a second's worth saved. Spending may
/// take it below zero (a frame's size is known only once it is read); nothing more is
/// allowed until it has refilled above zero.
#[derive(Debug, Clone)]
pub(super) struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub(super) fn new(rate: u64, now: Instant) -> Self {
        let rate = rate.max(1) as f64;
        Self {
            rate,
            tokens: rate,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        self.at = now;
    }

    /// Whether anything may be spent now.
    pub(super) fn allows(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0.0
    }

    /// Spends `n` tokens.
    pub(super) fn spend(&mut self, n: u64) {
        self.tokens -= n as f64;
    }

    /// Whether `n` tokens are there now.
    pub(super) fn has(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= n as f64
    }

    /// How long until the bucket holds `n` tokens (at least one millisecond when it does
    /// not now).
    pub(super) fn wait_for(&self, n: f64) -> Duration {
        let missing = n - self.tokens;
        if missing <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(missing / self.rate).max(Duration::from_millis(1))
        }
    }
}

/// A guest's protocol violations: counted per minute (a cut-off past the budget), in all
/// (for the VM's status), and logged once per episode.
#[derive(Debug)]
pub(super) struct Violations {
    window: Instant,
    in_window: u32,
    pub(super) total: u64,
    /// Violations since the first logged one of this episode (not logged one by one).
    unlogged: u64,
    last: Option<Instant>,
}

/// An episode of violations ends after this long without one.
const EPISODE_QUIET: Duration = Duration::from_secs(60);

impl Violations {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            window: now,
            in_window: 0,
            total: 0,
            unlogged: 0,
            last: None,
        }
    }

    /// Counts a violation; whether it is the first of an episode (to be logged), and
    /// whether the minute's budget `limit` is now exceeded.
    pub(super) fn note(&mut self, now: Instant, limit: u32) -> (bool, bool) {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(60) {
            self.window = now;
            self.in_window = 0;
        }
        let first = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= EPISODE_QUIET);
        if first {
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        self.last = Some(now);
        self.in_window += 1;
        self.total += 1;
        (first, self.in_window > limit)
    }

    /// Ends the episode (after a cut-off): the next violation is logged again. Returns how
    /// many went unlogged in it.
    pub(super) fn end_episode(&mut self) -> u64 {
        self.last = None;
        self.in_window = 0;
        std::mem::take(&mut self.unlogged)
    }
}

/// Cut-offs of one VM and the back-off before it is served again.
#[derive(Debug)]
pub(super) struct Backoff {
    /// Cut-offs so far.
    pub(super) count: u32,
    /// The current wait (doubles with each cut-off within `max` of the last).
    wait: Duration,
    min: Duration,
    max: Duration,
    /// Not served again before this.
    pub(super) until: Option<Instant>,
    last: Option<Instant>,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration) -> Self {
        Self {
            count: 0,
            wait: min,
            min,
            max,
            until: None,
            last: None,
        }
    }

    /// A cut-off now: how long the guest waits.
    pub(super) fn cut(&mut self, now: Instant) -> Duration {
        self.count += 1;
        self.wait = match self.last {
            Some(t) if now.saturating_duration_since(t) < self.max + self.wait => {
                (self.wait * 2).min(self.max)
            }
            _ => self.min,
        };
        self.last = Some(now);
        self.until = Some(now + self.wait);
        self.wait
    }

    /// Whether the guest is still waiting out a cut-off.
    pub(super) fn waiting(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_saves_a_second() {
        let t = Instant::now();
        let mut b = Bucket::new(100, t);
        assert!(b.has(100, t));
        b.spend(150);
        assert!(!b.allows(t), "in debt");
        assert!(b.wait_for(1.0) >= Duration::from_millis(500));
        assert!(!b.allows(t + Duration::from_millis(400)));
        assert!(b.allows(t + Duration::from_millis(600)));
        assert!(b.has(100, t + Duration::from_secs(10)));
        assert!(
            !b.has(101, t + Duration::from_secs(20)),
            "at most a second saved"
        );
    }

    #[test]
    fn violations_are_logged_once_per_episode_and_limited_per_minute() {
        let t = Instant::now();
        let mut v = Violations::new(t);
        assert_eq!(v.note(t, 2), (true, false));
        assert_eq!(v.note(t, 2), (false, false));
        assert_eq!(v.note(t, 2), (false, true));
        assert_eq!(v.end_episode(), 2);
        assert_eq!(v.note(t, 2), (true, false), "a new episode is logged again");
        let later = t + Duration::from_secs(30);
        assert_eq!(v.note(later, 2), (false, false));
        assert_eq!(v.note(later, 2), (false, true), "three in the first minute");
        let next_minute = t + Duration::from_secs(61);
        assert_eq!(
            v.note(next_minute, 2),
            (false, false),
            "a new minute starts the count again"
        );
        assert_eq!(v.total, 7);
        assert!(
            v.note(next_minute + EPISODE_QUIET, 2).0,
            "a quiet minute ends the episode"
        );
    }

    #[test]
    fn back_off_doubles_up_to_its_cap_and_starts_over_after_quiet() {
        let t = Instant::now();
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(4));
        assert_eq!(b.cut(t), Duration::from_secs(1));
        assert!(b.waiting(t + Duration::from_millis(500)));
        assert!(!b.waiting(t + Duration::from_secs(1)));
        assert_eq!(b.cut(t + Duration::from_secs(2)), Duration::from_secs(2));
        assert_eq!(b.cut(t + Duration::from_secs(5)), Duration::from_secs(4));
        assert_eq!(b.cut(t + Duration::from_secs(10)), Duration::from_secs(4));
        assert_eq!(b.cut(t + Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(b.count, 5);
    }
}
