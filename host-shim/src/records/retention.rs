//! Retention: what the records keep, and pruning to it. Finished executions go oldest first
//! (with their output) when they are older than `keep_days`, when their VM's output is over
//! its quota, or when the database is larger than `max_bytes`; audit entries go when they
//! are older than `audit_keep_days` and older than every execution still kept, so the audit
//! of an execution lives at least as long as the execution. Running executions are never
//! pruned.
//!
//! Pruning runs in small steps ([`Records::prune_step`]), each one short transaction, so
//! that the records writer can interleave it with its group commits.

use std::time::Duration;

use rusqlite::{OptionalExtension, params};

use super::{CHUNK_OVERHEAD, Records, RecordsError};

/// What the records keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Finished executions are kept this long after they ended (`None`: for ever).
    pub keep: Option<Duration>,
    /// The database's size in bytes; past it the oldest finished executions go, then audit
    /// entries older than every execution kept (`None`: no limit).
    pub max_bytes: Option<u64>,
    /// Audit entries are kept this long (and at least as long as the executions they
    /// cover; `None`: for ever).
    pub audit_keep: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            keep: Some(Duration::from_secs(30 * 86_400)),
            max_bytes: None,
            audit_keep: Some(Duration::from_secs(90 * 86_400)),
        }
    }
}

/// What one [`Records::prune_step`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Executions deleted (with their output).
    pub executions: u64,
    /// Audit entries deleted.
    pub audit: u64,
    /// Pages given back to the file system.
    pub pages_freed: u64,
    /// Whether more is due: call again.
    pub more: bool,
}

/// A VM's output at this share of its quota is pruned (output past the quota is not kept,
/// so usage never goes over it) ...
const QUOTA_HIGH_WATER_PERCENT: u64 = 95;
/// ... down to this share, so that pruning does not run again after every chunk.
const QUOTA_LOW_WATER_PERCENT: u64 = 90;

impl Records {
    /// The database's size in bytes: pages in use (the file, less its free pages).
    pub fn database_bytes(&self) -> Result<u64, RecordsError> {
        let conn = self.reader()?;
        let pages: u64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
        let free: u64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        let size: u64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
        Ok(pages.saturating_sub(free).saturating_mul(size))
    }

    /// One bounded step of pruning at time `now_ms`: at most `max_rows` executions and
    /// `max_rows` audit entries, in one transaction, then free pages back to the file
    /// system.
    pub fn prune_step(
        &self,
        now_ms: u64,
        retention: &Retention,
        max_rows: usize,
    ) -> Result<Pruned, RecordsError> {
        let limit = i64::try_from(max_rows).unwrap_or(i64::MAX);
        let mut done = Pruned::default();
        // Which executions go: too old, over their VM's quota, or over the database size.
        let mut victims: Vec<u64> = Vec::new();
        if let Some(keep) = retention.keep {
            let cut = now_ms.saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
            let conn = self.reader()?;
            let mut stmt = conn.prepare_cached(
                "SELECT id FROM executions WHERE finished_at_ms IS NOT NULL \
                 AND finished_at_ms < ?1 ORDER BY finished_at_ms, id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cut, limit], |r| r.get(0))?;
            victims.extend(rows.collect::<Result<Vec<u64>, _>>()?);
        }
        if victims.len() < max_rows {
            victims.extend(self.over_quota(max_rows - victims.len())?);
        }
        if victims.len() < max_rows
            && let Some(max) = retention.max_bytes
            && self.database_bytes()? > max
        {
            let conn = self.reader()?;
            let mut stmt = conn.prepare_cached(
                "SELECT id FROM executions WHERE finished_at_ms IS NOT NULL \
                 ORDER BY id LIMIT ?1",
            )?;
            let want = i64::try_from(max_rows - victims.len()).unwrap_or(i64::MAX);
            let rows = stmt.query_map([want], |r| r.get(0))?;
            for id in rows {
                let id = id?;
                if !victims.contains(&id) {
                    victims.push(id);
                }
            }
            if victims.is_empty() {
                // Nothing finished is left to go: the oldest audit entries not covering a
                // kept execution go instead.
                done.audit += self.prune_audit(u64::MAX, limit)?;
            }
        }
        victims.sort_unstable();
        victims.dedup();
        done.executions = self.delete_executions(&victims)?;
        if let Some(keep) = retention.audit_keep {
            let cut = now_ms.saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
            done.audit += self.prune_audit(cut, limit)?;
        }
        if done.executions > 0 || done.audit > 0 {
            done.pages_freed = self.give_back_pages()?;
        }
        done.more = victims.len() >= max_rows
            || usize::try_from(done.audit).is_ok_and(|a| a >= max_rows)
            || (retention
                .max_bytes
                .is_some_and(|max| self.database_bytes().unwrap_or(0) > max)
                && (done.executions > 0 || done.audit > 0));
        Ok(done)
    }

    /// Finished executions of VMs over their quota, oldest first, enough to bring each
    /// down to the low-water mark (at most `max` of them).
    fn over_quota(&self, max: usize) -> Result<Vec<u64>, RecordsError> {
        let quota = self.limits.vm_quota;
        if quota == u64::MAX || max == 0 {
            return Ok(Vec::new());
        }
        let low = quota / 100 * QUOTA_LOW_WATER_PERCENT;
        let high = quota / 100 * QUOTA_HIGH_WATER_PERCENT;
        let conn = self.reader()?;
        let over: Vec<(String, u64)> = {
            let mut stmt = conn.prepare_cached(
                "SELECT vm, stored_bytes + chunks * ?1 FROM vm_usage \
                 WHERE stored_bytes + chunks * ?1 >= ?2",
            )?;
            let rows = stmt.query_map(params![CHUNK_OVERHEAD, high], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        let mut victims = Vec::new();
        for (vm, mut used) in over {
            let mut stmt = conn.prepare_cached(
                "SELECT id, stdout_stored + stderr_stored + (stdout_chunks + stderr_chunks) * ?2 \
                 FROM executions WHERE vm = ?1 AND finished_at_ms IS NOT NULL ORDER BY id",
            )?;
            let mut rows = stmt.query(params![vm, CHUNK_OVERHEAD])?;
            while used > low && victims.len() < max {
                let Some(row) = rows.next()? else { break };
                let (id, cost): (u64, u64) = (row.get(0)?, row.get(1)?);
                victims.push(id);
                used = used.saturating_sub(cost);
            }
        }
        Ok(victims)
    }

    /// Deletes these executions and their output, and takes their output off their VMs'
    /// usage; how many went.
    fn delete_executions(&self, ids: &[u64]) -> Result<u64, RecordsError> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.write(|tx| {
            let mut deleted = 0;
            for &id in ids {
                deleted += u64::from(delete_finished(tx, id)?);
            }
            Ok(deleted)
        })
    }

    /// Deletes up to `limit` audit entries older than `cut` and than the oldest execution
    /// kept; how many went.
    fn prune_audit(&self, cut: u64, limit: i64) -> Result<u64, RecordsError> {
        self.write(|tx| {
            let oldest: Option<u64> = tx
                .prepare_cached("SELECT MIN(requested_at_ms) FROM executions")?
                .query_row([], |r| r.get(0))?;
            let cut = cut.min(oldest.unwrap_or(u64::MAX));
            let n = tx
                .prepare_cached(
                    "DELETE FROM audit WHERE id IN \
                     (SELECT id FROM audit WHERE at_ms < ?1 ORDER BY id LIMIT ?2)",
                )?
                .execute(params![i64::try_from(cut).unwrap_or(i64::MAX), limit])?;
            Ok(n as u64)
        })
    }

    /// Gives free pages back to the file system; how many.
    fn give_back_pages(&self) -> Result<u64, RecordsError> {
        let conn = self.conn();
        let free: u64 = conn.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        if free > 0 {
            // Each step of the statement frees one page: step it to its end.
            let mut stmt = conn.prepare("PRAGMA incremental_vacuum")?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
            // Copy the WAL into the file and truncate both, so that the space is the file
            // system's again now rather than at the next automatic checkpoint. Readers in
            // the middle of a query may keep part of it for the next time.
            let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        }
        Ok(free)
    }
}

/// Deletes finished execution `id` with its output, and takes the output off its VM's usage;
/// whether it was there (and finished) to delete.
pub(super) fn delete_finished(conn: &rusqlite::Connection, id: u64) -> Result<bool, RecordsError> {
    let row: Option<(String, u64, u64)> = conn
        .prepare_cached(
            "SELECT vm, stdout_stored + stderr_stored, stdout_chunks + stderr_chunks \
             FROM executions WHERE id = ?1 AND finished_at_ms IS NOT NULL",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((vm, stored, chunks)) = row else {
        return Ok(false);
    };
    conn.prepare_cached("DELETE FROM output WHERE execution = ?1")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM executions WHERE id = ?1")?
        .execute([id])?;
    conn.prepare_cached(
        "UPDATE vm_usage SET stored_bytes = MAX(stored_bytes - ?2, 0), \
         chunks = MAX(chunks - ?3, 0) WHERE vm = ?1",
    )?
    .execute(params![vm, stored, chunks])?;
    Ok(true)
}

/// Makes room for `needed` more bytes of `vm`'s output within `quota` by deleting its oldest
/// finished executions (at most [`QUOTA_PRUNE_AT_ONCE`]), down to the low-water mark: the
/// newest output is kept, the oldest goes. The bytes of output the VM then uses.
pub(super) fn make_room(
    conn: &rusqlite::Connection,
    vm: &str,
    used: u64,
    needed: u64,
    quota: u64,
) -> Result<u64, RecordsError> {
    let low = (quota / 100 * QUOTA_LOW_WATER_PERCENT).min(quota.saturating_sub(needed));
    let victims: Vec<(u64, u64)> = {
        let mut stmt = conn.prepare_cached(
            "SELECT id, stdout_stored + stderr_stored + (stdout_chunks + stderr_chunks) * ?2 \
             FROM executions WHERE vm = ?1 AND finished_at_ms IS NOT NULL ORDER BY id LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![vm, CHUNK_OVERHEAD, QUOTA_PRUNE_AT_ONCE], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let mut used = used;
    for (id, cost) in victims {
        if used <= low {
            break;
        }
        if delete_finished(conn, id)? {
            used = used.saturating_sub(cost);
        }
    }
    Ok(used)
}

/// Executions [`make_room`] deletes for one chunk, at most.
const QUOTA_PRUNE_AT_ONCE: i64 = 16;
