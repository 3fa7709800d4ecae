//! The web console's sessions and login codes in the fleet's database (schema 4), so that
//! every control-plane server knows every session: [`DbSessions`], the console's
//! [`SessionStore`] on a control plane.
//!
//! The rules are [`portless_console::Sessions`]'s: a code works once until it expires, a
//! session ends when logged out, idle too long or too old, and secrets are kept only as
//! their SHA-256. One difference: a request marks its session as used only when the mark
//! is older than a sixteenth of the idle time (30 s at most), so that a busy console does
//! not write a row on every request. The budgets are kept when a code or session is added: what has lapsed is
//! deleted, and past `max_codes` (`max_sessions`) the oldest code (the least recently used
//! session) makes room, so the tables never hold more than the budget and the servers
//! adding at that moment.

use portless_console::sessions::{digest, random_secret, tag_of};
use portless_console::{Active, Opened, SessionStore, Settings, StoreFuture};

use crate::store::{Store, StoreError};

/// Sessions and codes in PostgreSQL.
pub struct DbSessions {
    store: Store,
    settings: Settings,
}

impl DbSessions {
    /// The sessions of the fleet's database `store`, by `settings`.
    pub fn new(store: Store, settings: Settings) -> Self {
        Self { store, settings }
    }

    fn idle_ms(&self) -> i64 {
        i64::try_from(self.settings.idle.as_millis()).unwrap_or(i64::MAX)
    }

    fn max_ms(&self) -> i64 {
        i64::try_from(self.settings.max.as_millis()).unwrap_or(i64::MAX)
    }

    /// How stale a session's `last_seen` may be before a request marks it again: a
    /// sixteenth of the idle time, at most 30 s (so a session in use ends at most that much
    /// before `idle` after its last request).
    fn touch_ms(&self) -> i64 {
        (self.idle_ms() / 16).min(30_000)
    }

    /// Keeps a session or code of `budget` (at least 1) rows' worth of room.
    fn room(budget: usize) -> i64 {
        i64::try_from(budget.max(1) - 1).unwrap_or(i64::MAX)
    }
}

fn failed(e: StoreError) -> String {
    format!("the fleet's database: {e}")
}

fn active_of(r: &tokio_postgres::Row) -> Active {
    Active {
        principal: r.get(0),
        csrf: r.get(1),
        tag: r.get(2),
    }
}

impl SessionStore for DbSessions {
    fn settings(&self) -> Settings {
        self.settings
    }

    fn issue_code<'a>(&'a self, principal: &'a str) -> StoreFuture<'a, String> {
        Box::pin(async move {
            let code = random_secret();
            let key = digest(&code).to_vec();
            let lifetime =
                i64::try_from(self.settings.code_lifetime.as_millis()).unwrap_or(i64::MAX);
            let room = Self::room(self.settings.max_codes);
            let run = async {
                let mut client = self.store.client().await?;
                let tx = client.transaction().await?;
                tx.execute("DELETE FROM console_codes WHERE expires_at <= now()", &[])
                    .await?;
                tx.execute(
                    "DELETE FROM console_codes WHERE code_sha256 IN (SELECT code_sha256 \
                       FROM console_codes ORDER BY expires_at DESC OFFSET $1)",
                    &[&room],
                )
                .await?;
                tx.execute(
                    "INSERT INTO console_codes (code_sha256, principal, expires_at) \
                     VALUES ($1, $2, now() + $3::bigint * interval '1 millisecond')",
                    &[&key, &principal, &lifetime],
                )
                .await?;
                tx.commit().await?;
                Ok::<_, StoreError>(())
            };
            run.await.map_err(failed)?;
            Ok(code)
        })
    }

    fn peek_code<'a>(&'a self, code: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let key = digest(code).to_vec();
            let run = async {
                let client = self.store.client().await?;
                let row = client
                    .query_opt(
                        "SELECT principal FROM console_codes \
                         WHERE code_sha256 = $1 AND expires_at > now()",
                        &[&key],
                    )
                    .await?;
                Ok::<_, StoreError>(row.map(|r| r.get(0)))
            };
            run.await.map_err(failed)
        })
    }

    fn redeem_code<'a>(&'a self, code: &'a str) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let key = digest(code).to_vec();
            let run = async {
                let client = self.store.client().await?;
                // One DELETE: of two servers redeeming the same code at once, one gets it.
                let row = client
                    .query_opt(
                        "DELETE FROM console_codes WHERE code_sha256 = $1 \
                         RETURNING principal, expires_at > now()",
                        &[&key],
                    )
                    .await?;
                Ok::<_, StoreError>(row.filter(|r| r.get::<_, bool>(1)).map(|r| r.get(0)))
            };
            run.await.map_err(failed)
        })
    }

    fn open<'a>(&'a self, principal: &'a str) -> StoreFuture<'a, Opened> {
        Box::pin(async move {
            let id = random_secret();
            let csrf = random_secret();
            let key = digest(&id);
            let tag = tag_of(&key);
            let key = key.to_vec();
            let (idle, max) = (self.idle_ms(), self.max_ms());
            let room = Self::room(self.settings.max_sessions);
            let run = async {
                let mut client = self.store.client().await?;
                let tx = client.transaction().await?;
                tx.execute(
                    "DELETE FROM console_sessions \
                     WHERE last_seen <= now() - $1::bigint * interval '1 millisecond' \
                        OR opened_at <= now() - $2::bigint * interval '1 millisecond'",
                    &[&idle, &max],
                )
                .await?;
                tx.execute(
                    "DELETE FROM console_sessions WHERE id_sha256 IN (SELECT id_sha256 \
                       FROM console_sessions ORDER BY last_seen DESC OFFSET $1)",
                    &[&room],
                )
                .await?;
                tx.execute(
                    "INSERT INTO console_sessions (id_sha256, principal, csrf, tag) \
                     VALUES ($1, $2, $3, $4)",
                    &[&key, &principal, &csrf, &tag],
                )
                .await?;
                tx.commit().await?;
                Ok::<_, StoreError>(())
            };
            run.await.map_err(failed)?;
            Ok(Opened { id, csrf, tag })
        })
    }

    fn active<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<Active>> {
        Box::pin(async move {
            let key = digest(id).to_vec();
            let (idle, max) = (self.idle_ms(), self.max_ms());
            let touch = self.touch_ms();
            let run = async {
                let client = self.store.client().await?;
                // Read first: most requests of a session find it marked as used a moment
                // ago, and a read costs the database no write.
                let row = client
                    .query_opt(
                        "SELECT principal, csrf, tag, \
                           last_seen < now() - $4::bigint * interval '1 millisecond' \
                         FROM console_sessions WHERE id_sha256 = $1 \
                           AND last_seen > now() - $2::bigint * interval '1 millisecond' \
                           AND opened_at > now() - $3::bigint * interval '1 millisecond'",
                        &[&key, &idle, &max, &touch],
                    )
                    .await?;
                match &row {
                    Some(r) if r.get::<_, bool>(3) => {
                        client
                            .execute(
                                "UPDATE console_sessions SET last_seen = now() \
                                 WHERE id_sha256 = $1",
                                &[&key],
                            )
                            .await?;
                    }
                    Some(_) => {}
                    None => {
                        // Lapsed (or never was): dropped, as the memory store does.
                        client
                            .execute("DELETE FROM console_sessions WHERE id_sha256 = $1", &[&key])
                            .await?;
                    }
                }
                Ok::<_, StoreError>(row.as_ref().map(active_of))
            };
            run.await.map_err(failed)
        })
    }

    fn close<'a>(&'a self, id: &'a str) -> StoreFuture<'a, Option<Active>> {
        Box::pin(async move {
            let key = digest(id).to_vec();
            let (idle, max) = (self.idle_ms(), self.max_ms());
            let run = async {
                let client = self.store.client().await?;
                let row = client
                    .query_opt(
                        "DELETE FROM console_sessions WHERE id_sha256 = $1 RETURNING \
                           principal, csrf, tag, \
                           last_seen > now() - $2::bigint * interval '1 millisecond' \
                           AND opened_at > now() - $3::bigint * interval '1 millisecond'",
                        &[&key, &idle, &max],
                    )
                    .await?;
                Ok::<_, StoreError>(row.filter(|r| r.get::<_, bool>(3)).as_ref().map(active_of))
            };
            run.await.map_err(failed)
        })
    }
}
