//! The `[budget]`, `[records]` and `[callers]` tables of `host.toml`: what one guest may make
//! the host spend, what the records keep, and what one caller of the API may make the daemon
//! spend. Every limit has its default here, once, as a constant;
//! `examples/host.toml` shows them all.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use toml::Spanned;

use super::{ConfigErrorKind, Failure};

/// Default `[budget] queued_bytes`: 256 KiB of encoded messages waiting toward one guest.
pub const DEFAULT_QUEUED_BYTES: u64 = 256 << 10;
/// Default `[budget] listing_entries`: commands in one listing (the agent has at most 64).
pub const DEFAULT_LISTING_ENTRIES: u32 = 256;
/// Default `[budget] listing_bytes`: the size of one listing (names, descriptions,
/// parameters).
pub const DEFAULT_LISTING_BYTES: u64 = 256 << 10;
/// Default `[budget] requests_in_flight`: requests sent to one guest and not answered.
pub const DEFAULT_REQUESTS_IN_FLIGHT: u32 = 256;
/// Default `[budget] answer_timeout_ms`: a request unanswered this long ends.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default `[budget] frames_per_pass`: frames handled before the driver looks at the API.
pub const DEFAULT_FRAMES_PER_PASS: u32 = 256;
/// Default `[budget] frames_per_s`: frames read from one guest per second.
pub const DEFAULT_FRAMES_PER_S: u32 = 50_000;
/// Default `[budget] output_bytes_per_s`: output bytes read from one guest per second.
pub const DEFAULT_OUTPUT_BYTES_PER_S: u64 = 64 << 20;
/// Default `[budget] output_rows_per_s`: output chunks one guest's output makes the
/// records write per second.
pub const DEFAULT_OUTPUT_ROWS_PER_S: u32 = 500;
/// Default `[budget] violations_per_min`: protocol violations of one guest per minute.
pub const DEFAULT_VIOLATIONS_PER_MIN: u32 = 64;
/// Default `[budget] backoff_ms`: the first wait after a cut-off (it doubles).
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
/// Default `[budget] backoff_max_ms`: the longest wait after a cut-off.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Default `[records] output_merge_bytes`: output of one stream merged into one chunk.
pub const DEFAULT_MERGE_BYTES: u64 = 64 << 10;
/// Default `[records] output_merge_ms`: how long output waits to be merged, at most.
pub const DEFAULT_MERGE_WAIT: Duration = Duration::from_millis(5);
/// Default `[records] vm_quota`: output kept per VM, chunk overhead included.
pub const DEFAULT_VM_QUOTA: u64 = 1 << 30;
/// Default `[records] max_bytes`: the whole database.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 30;
/// Default `[records] keep_days`.
pub const DEFAULT_KEEP_DAYS: u32 = 30;
/// Default `[records] audit_keep_days`.
pub const DEFAULT_AUDIT_KEEP_DAYS: u32 = 90;
/// Default `[records] min_free`: free space the state directory's disk keeps in reserve.
pub const DEFAULT_MIN_FREE: u64 = 256 << 20;
/// Default `[records] prune_interval_s`.
pub const DEFAULT_PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Default `[callers] follows_per_principal`: follow streams one principal has open at once.
pub const DEFAULT_FOLLOWS_PER_PRINCIPAL: u32 = 16;
/// Default `[callers] pushes_in_flight`: pushes the daemon takes in at once (each is spooled
/// to the state directory while it streams into its guest).
pub const DEFAULT_PUSHES_IN_FLIGHT: u32 = 4;
/// Default `[callers] denied_per_peer`: denied calls of one peer audited one by one per
/// interval; the rest are counted in one entry.
pub const DEFAULT_DENIED_PER_PEER: u32 = 20;
/// Default `[callers] denied_interval_s`.
pub const DEFAULT_DENIED_INTERVAL: Duration = Duration::from_secs(60);

/// The `[callers]` table: what callers of the API may make the daemon spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallersConfig {
    /// Follow streams one principal may have open at once; one more is refused (429).
    pub follows_per_principal: u32,
    /// Pushes taken in at once, all callers together; one more is refused (503).
    pub pushes_in_flight: u32,
    /// Denied calls of one peer (a TCP address, a unix uid) audited one by one per interval;
    /// past it they are refused all the same, and audited as one entry with their count when
    /// the interval ends.
    pub denied_per_peer: u32,
    /// That interval.
    pub denied_interval: Duration,
}

impl Default for CallersConfig {
    fn default() -> Self {
        Self {
            follows_per_principal: DEFAULT_FOLLOWS_PER_PRINCIPAL,
            pushes_in_flight: DEFAULT_PUSHES_IN_FLIGHT,
            denied_per_peer: DEFAULT_DENIED_PER_PEER,
            denied_interval: DEFAULT_DENIED_INTERVAL,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCallers {
    follows_per_principal: Option<Spanned<u32>>,
    pushes_in_flight: Option<Spanned<u32>>,
    denied_per_peer: Option<Spanned<u32>>,
    denied_interval_s: Option<Spanned<u64>>,
}

impl RawCallers {
    pub(super) fn check(self) -> Result<CallersConfig, Failure> {
        const T: &str = "callers";
        let d = CallersConfig::default();
        Ok(CallersConfig {
            follows_per_principal: at_least(
                T,
                "follows_per_principal",
                self.follows_per_principal,
                1,
                d.follows_per_principal,
            )?,
            pushes_in_flight: at_least(
                T,
                "pushes_in_flight",
                self.pushes_in_flight,
                1,
                d.pushes_in_flight,
            )?,
            denied_per_peer: at_least(
                T,
                "denied_per_peer",
                self.denied_per_peer,
                1,
                d.denied_per_peer,
            )?,
            denied_interval: Duration::from_secs(at_least(
                T,
                "denied_interval_s",
                self.denied_interval_s,
                1,
                d.denied_interval.as_secs(),
            )?),
        })
    }
}

/// The `[budget]` table: what one guest may make the host spend. Exceeding a *cut-off*
/// budget resets the guest's channel (its executions end `agent_lost` naming the budget)
/// and backs it off; a *paced* budget makes the daemon read the guest's ring more slowly,
/// so that the guest waits (nothing is lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetConfig {
    /// Cut-off: bytes of encoded messages waiting toward a guest that does not read.
    pub queued_bytes: u64,
    /// Cut-off: commands in one listing.
    pub listing_entries: u32,
    /// Cut-off: bytes of one listing.
    pub listing_bytes: u64,
    /// Requests in flight to one guest; an API request beyond it is refused (503).
    pub requests_in_flight: u32,
    /// A request unanswered this long ends (`agent_lost` for an execution).
    pub answer_timeout: Duration,
    /// Paced: frames handled in one pass of the driver before it looks at the API again.
    pub frames_per_pass: u32,
    /// Paced: frames read per second.
    pub frames_per_s: u32,
    /// Paced: output bytes read per second.
    pub output_bytes_per_s: u64,
    /// Paced: output chunks written to the records per second.
    pub output_rows_per_s: u32,
    /// Cut-off: protocol violations (replies of the wrong kind or to nothing, reused
    /// execution ids, output gaps, undecodable frames, repeated hellos) per minute.
    pub violations_per_min: u32,
    /// The first wait after a cut-off before the guest is served again; it doubles with
    /// each cut-off in a row.
    pub backoff: Duration,
    /// The longest such wait; a guest served this long without a cut-off starts again
    /// from `backoff`.
    pub backoff_max: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            queued_bytes: DEFAULT_QUEUED_BYTES,
            listing_entries: DEFAULT_LISTING_ENTRIES,
            listing_bytes: DEFAULT_LISTING_BYTES,
            requests_in_flight: DEFAULT_REQUESTS_IN_FLIGHT,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
            frames_per_pass: DEFAULT_FRAMES_PER_PASS,
            frames_per_s: DEFAULT_FRAMES_PER_S,
            output_bytes_per_s: DEFAULT_OUTPUT_BYTES_PER_S,
            output_rows_per_s: DEFAULT_OUTPUT_ROWS_PER_S,
            violations_per_min: DEFAULT_VIOLATIONS_PER_MIN,
            backoff: DEFAULT_BACKOFF,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// The `[records]` table: how output is written and what the records keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordsConfig {
    /// Output of one stream is merged into one chunk up to this many bytes ...
    pub output_merge_bytes: u64,
    /// ... or for this long, whichever comes first.
    pub output_merge_wait: Duration,
    /// Output kept per VM (chunk overhead included): the VM's oldest finished executions are
    /// deleted to make room for new output; with none left to delete, output is counted
    /// but not kept.
    pub vm_quota: u64,
    /// The database's size; past it the oldest finished executions are pruned.
    pub max_bytes: u64,
    /// Finished executions are pruned this many days after they ended (0: never).
    pub keep_days: u32,
    /// Audit entries are pruned after this many days, and only once older than every
    /// execution kept (0: never).
    pub audit_keep_days: u32,
    /// Free space the state directory's disk keeps; below it exec is refused (503) and
    /// output is counted but not kept.
    pub min_free: u64,
    /// How often pruning runs.
    pub prune_interval: Duration,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        Self {
            output_merge_bytes: DEFAULT_MERGE_BYTES,
            output_merge_wait: DEFAULT_MERGE_WAIT,
            vm_quota: DEFAULT_VM_QUOTA,
            max_bytes: DEFAULT_MAX_BYTES,
            keep_days: DEFAULT_KEEP_DAYS,
            audit_keep_days: DEFAULT_AUDIT_KEEP_DAYS,
            min_free: DEFAULT_MIN_FREE,
            prune_interval: DEFAULT_PRUNE_INTERVAL,
        }
    }
}

impl RecordsConfig {
    /// The retention these settings ask for.
    pub fn retention(&self) -> crate::records::Retention {
        let days = |d: u32| (d > 0).then(|| Duration::from_secs(u64::from(d) * 86_400));
        crate::records::Retention {
            keep: days(self.keep_days),
            max_bytes: Some(self.max_bytes),
            audit_keep: days(self.audit_keep_days),
        }
    }
}

/// A byte count as written: an integer, or a string with a `K`/`M`/`G` suffix.
pub(super) struct RawBytes(u64);

impl<'de> Deserialize<'de> for RawBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl Visitor<'_> for BytesVisitor {
            type Value = RawBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte count: an integer, or a string like \"256K\" or \"1G\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBytes, E> {
                parse_bytes(v).map(RawBytes).ok_or_else(|| {
                    E::custom(format!(
                        "{v:?} is not a byte count: expected digits with an optional K, M or G"
                    ))
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawBytes, E> {
                u64::try_from(v)
                    .map(RawBytes)
                    .map_err(|_| E::custom("a byte count cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawBytes, E> {
                Ok(RawBytes(v))
            }
        }
        deserializer.deserialize_any(BytesVisitor)
    }
}

/// `123`, `64K`, `1M`, `2G` (binary units, any case, `KiB` etc. too) as bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBudget {
    queued_bytes: Option<Spanned<RawBytes>>,
    listing_entries: Option<Spanned<u32>>,
    listing_bytes: Option<Spanned<RawBytes>>,
    requests_in_flight: Option<Spanned<u32>>,
    answer_timeout_ms: Option<Spanned<u64>>,
    frames_per_pass: Option<Spanned<u32>>,
    frames_per_s: Option<Spanned<u32>>,
    output_bytes_per_s: Option<Spanned<RawBytes>>,
    output_rows_per_s: Option<Spanned<u32>>,
    violations_per_min: Option<Spanned<u32>>,
    backoff_ms: Option<Spanned<u64>>,
    backoff_max_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecords {
    output_merge_bytes: Option<Spanned<RawBytes>>,
    output_merge_ms: Option<Spanned<u64>>,
    vm_quota: Option<Spanned<RawBytes>>,
    max_bytes: Option<Spanned<RawBytes>>,
    keep_days: Option<Spanned<u32>>,
    audit_keep_days: Option<Spanned<u32>>,
    min_free: Option<Spanned<RawBytes>>,
    prune_interval_s: Option<Spanned<u64>>,
}

pub(super) fn table_error(
    table: &'static str,
    span: Range<usize>,
    field: &'static str,
    reason: &str,
) -> Failure {
    (
        span,
        ConfigErrorKind::Limit {
            table,
            field,
            reason: reason.to_owned(),
        },
    )
}

/// A duration in whole milliseconds.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A setting that must be at least `min`, or its default.
pub(super) fn at_least<T: Copy + PartialOrd + fmt::Display>(
    table: &'static str,
    field: &'static str,
    value: Option<Spanned<T>>,
    min: T,
    default: T,
) -> Result<T, Failure> {
    match value {
        Some(v) if *v.get_ref() < min => Err(table_error(
            table,
            v.span(),
            field,
            &format!("must be at least {min}"),
        )),
        Some(v) => Ok(*v.get_ref()),
        None => Ok(default),
    }
}

fn bytes_at_least(
    table: &'static str,
    field: &'static str,
    value: Option<Spanned<RawBytes>>,
    min: u64,
    default: u64,
) -> Result<u64, Failure> {
    let value = value.map(|v| {
        let span = v.span();
        Spanned::new(span, v.into_inner().0)
    });
    at_least(table, field, value, min, default)
}

impl RawBudget {
    pub(super) fn check(self) -> Result<BudgetConfig, Failure> {
        const T: &str = "budget";
        let d = BudgetConfig::default();
        let ms = Duration::from_millis;
        let frame = ring_protocol::MAX_FRAME_LEN as u64;
        let backoff_max_span = self.backoff_max_ms.as_ref().map_or(0..0, Spanned::span);
        let budget = BudgetConfig {
            // Room for at least a few whole frames, or nothing could ever wait.
            queued_bytes: bytes_at_least(
                T,
                "queued_bytes",
                self.queued_bytes,
                4 * frame,
                d.queued_bytes,
            )?,
            listing_entries: at_least(
                T,
                "listing_entries",
                self.listing_entries,
                1,
                d.listing_entries,
            )?,
            listing_bytes: bytes_at_least(
                T,
                "listing_bytes",
                self.listing_bytes,
                frame,
                d.listing_bytes,
            )?,
            requests_in_flight: at_least(
                T,
                "requests_in_flight",
                self.requests_in_flight,
                1,
                d.requests_in_flight,
            )?,
            answer_timeout: ms(at_least(
                T,
                "answer_timeout_ms",
                self.answer_timeout_ms,
                100,
                millis(d.answer_timeout),
            )?),
            frames_per_pass: at_least(
                T,
                "frames_per_pass",
                self.frames_per_pass,
                1,
                d.frames_per_pass,
            )?,
            frames_per_s: at_least(T, "frames_per_s", self.frames_per_s, 100, d.frames_per_s)?,
            output_bytes_per_s: bytes_at_least(
                T,
                "output_bytes_per_s",
                self.output_bytes_per_s,
                frame,
                d.output_bytes_per_s,
            )?,
            output_rows_per_s: at_least(
                T,
                "output_rows_per_s",
                self.output_rows_per_s,
                10,
                d.output_rows_per_s,
            )?,
            violations_per_min: at_least(
                T,
                "violations_per_min",
                self.violations_per_min,
                1,
                d.violations_per_min,
            )?,
            backoff: ms(at_least(
                T,
                "backoff_ms",
                self.backoff_ms,
                1,
                millis(d.backoff),
            )?),
            backoff_max: ms(at_least(
                T,
                "backoff_max_ms",
                self.backoff_max_ms,
                1,
                millis(d.backoff_max),
            )?),
        };
        if budget.backoff_max < budget.backoff {
            let span = backoff_max_span;
            return Err(table_error(
                T,
                span,
                "backoff_max_ms",
                "must not be less than backoff_ms",
            ));
        }
        Ok(budget)
    }
}

impl RawRecords {
    pub(super) fn check(self) -> Result<RecordsConfig, Failure> {
        const T: &str = "records";
        let d = RecordsConfig::default();
        Ok(RecordsConfig {
            output_merge_bytes: bytes_at_least(
                T,
                "output_merge_bytes",
                self.output_merge_bytes,
                1,
                d.output_merge_bytes,
            )?,
            output_merge_wait: Duration::from_millis(at_least(
                T,
                "output_merge_ms",
                self.output_merge_ms,
                0,
                millis(d.output_merge_wait),
            )?),
            vm_quota: bytes_at_least(T, "vm_quota", self.vm_quota, 4096, d.vm_quota)?,
            max_bytes: bytes_at_least(T, "max_bytes", self.max_bytes, 1 << 20, d.max_bytes)?,
            keep_days: at_least(T, "keep_days", self.keep_days, 0, d.keep_days)?,
            audit_keep_days: at_least(
                T,
                "audit_keep_days",
                self.audit_keep_days,
                0,
                d.audit_keep_days,
            )?,
            min_free: bytes_at_least(T, "min_free", self.min_free, 0, d.min_free)?,
            prune_interval: Duration::from_secs(at_least(
                T,
                "prune_interval_s",
                self.prune_interval_s,
                1,
                d.prune_interval.as_secs(),
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_take_binary_units() {
        assert_eq!(parse_bytes("0"), Some(0));
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("64K"), Some(64 << 10));
        assert_eq!(parse_bytes("1MiB"), Some(1 << 20));
        assert_eq!(parse_bytes("8g"), Some(8 << 30));
        assert_eq!(parse_bytes("1T"), Some(1 << 40));
        assert_eq!(parse_bytes(""), None);
        assert_eq!(parse_bytes("M"), None);
        assert_eq!(parse_bytes("1.5M"), None);
        assert_eq!(parse_bytes("99999999999999999999G"), None);
    }

    #[test]
    fn defaults_are_the_constants() {
        let b = RawBudget::default().check().expect("defaults");
        assert_eq!(b, BudgetConfig::default());
        assert_eq!(b.answer_timeout, DEFAULT_ANSWER_TIMEOUT);
        assert_eq!(b.backoff, DEFAULT_BACKOFF);
        assert_eq!(b.backoff_max, DEFAULT_BACKOFF_MAX);
        let c = RawCallers::default().check().expect("defaults");
        assert_eq!(c, CallersConfig::default());
        assert_eq!(c.denied_interval, DEFAULT_DENIED_INTERVAL);
        let r = RawRecords::default().check().expect("defaults");
        assert_eq!(r, RecordsConfig::default());
        assert_eq!(r.output_merge_wait, DEFAULT_MERGE_WAIT);
        assert_eq!(r.prune_interval, DEFAULT_PRUNE_INTERVAL);
    }
}
