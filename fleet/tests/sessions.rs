//! The console's sessions in the fleet's database (`DbSessions`) against a real
//! PostgreSQL started here: codes once and until they expire, sessions until logged out,
//! idle or too old, the budgets, and two stores on one database (two servers) seeing the
//! same sessions.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use portless_console::{SessionStore, Settings};
use portless_fleet::control::sessions::DbSessions;
use portless_fleet::store::Store;

fn settings() -> Settings {
    Settings {
        idle: Duration::from_millis(1500),
        max: Duration::from_secs(4),
        code_lifetime: Duration::from_millis(1500),
        max_sessions: 3,
        max_codes: 2,
    }
}

#[test]
fn sessions_and_codes_in_the_database_keep_the_console_rules() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("fleet-sessions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let pg = pg_harness::Server::start(&dir.join("pg")).expect("postgresql");
    pg.psql("postgres", "CREATE DATABASE fleet").expect("db");
    let url = pg.url("fleet");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = Store::new(&url, 4).expect("store");
        store.migrate().await.expect("migrate");
        // Two servers: two stores on one database.
        let a: Arc<dyn SessionStore> = Arc::new(DbSessions::new(store.clone(), settings()));
        let b: Arc<dyn SessionStore> = Arc::new(DbSessions::new(
            Store::new(&url, 4).expect("store"),
            settings(),
        ));

        // A code issued by one is seen and used by the other, once.
        let code = a.issue_code("ops").await.expect("code");
        assert_eq!(code.len(), 64);
        assert_eq!(
            b.peek_code(&code).await.expect("peek").as_deref(),
            Some("ops")
        );
        assert_eq!(
            b.peek_code(&code).await.expect("peek").as_deref(),
            Some("ops")
        );
        assert_eq!(
            b.redeem_code(&code).await.expect("redeem").as_deref(),
            Some("ops")
        );
        assert_eq!(a.redeem_code(&code).await.expect("again"), None);
        assert_eq!(a.redeem_code("not-a-code").await.expect("unknown"), None);

        // An unused code expires; past max_codes the oldest makes room.
        let old = a.issue_code("ops").await.expect("code");
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert_eq!(a.peek_code(&old).await.expect("peek"), None);
        assert_eq!(a.redeem_code(&old).await.expect("expired"), None);
        let c1 = a.issue_code("ops").await.expect("c1");
        let c2 = a.issue_code("viewer").await.expect("c2");
        let c3 = b.issue_code("ops").await.expect("c3");
        assert_eq!(a.peek_code(&c1).await.expect("peek"), None, "made room");
        assert_eq!(
            a.peek_code(&c2).await.expect("peek").as_deref(),
            Some("viewer")
        );
        assert!(a.peek_code(&c3).await.expect("peek").is_some());
        let codes = pg
            .psql("fleet", "SELECT count(*) FROM console_codes")
            .expect("count");
        assert_eq!(codes.trim(), "2");
        // Only hashes are kept.
        let hashed = pg
            .psql(
                "fleet",
                &format!(
                    "SELECT count(*) FROM console_codes \
                     WHERE code_sha256 = sha256(convert_to('{c2}', 'UTF8'))"
                ),
            )
            .expect("hashed");
        assert_eq!(hashed.trim(), "1");
        let plain = pg
            .psql(
                "fleet",
                &format!(
                    "SELECT count(*) FROM console_codes WHERE principal = '{c2}' \
                     OR encode(code_sha256, 'escape') LIKE '%{c2}%'"
                ),
            )
            .expect("plain");
        assert_eq!(plain.trim(), "0");

        // A session opened by one is live on the other, with its CSRF token and tag.
        let s = a.open("ops").await.expect("open");
        let seen = b.active(&s.id).await.expect("active").expect("live");
        assert_eq!(
            (
                seen.principal.as_str(),
                seen.csrf.as_str(),
                seen.tag.as_str()
            ),
            ("ops", s.csrf.as_str(), s.tag.as_str())
        );
        assert_eq!(b.active("nobody").await.expect("active"), None);

        // Used, it stays; idle, it ends (and is dropped).
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert!(
                a.active(&s.id).await.expect("active").is_some(),
                "kept alive"
            );
        }
        tokio::time::sleep(Duration::from_millis(1700)).await;
        assert_eq!(b.active(&s.id).await.expect("idle"), None);
        let left = pg
            .psql("fleet", "SELECT count(*) FROM console_sessions")
            .expect("count");
        assert_eq!(left.trim(), "0", "an idle session is dropped");

        // However busy, a session ends max after it opened.
        let busy = a.open("ops").await.expect("open");
        let mut lived = Duration::ZERO;
        while b.active(&busy.id).await.expect("active").is_some() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            lived += Duration::from_millis(500);
            assert!(lived < Duration::from_secs(8), "never ended");
        }
        assert!(lived >= Duration::from_secs(3), "ended after {lived:?}");

        // Logged out on one, gone on both; closing twice finds nothing.
        let s = a.open("viewer").await.expect("open");
        assert_eq!(
            b.close(&s.id)
                .await
                .expect("close")
                .map(|x| x.principal)
                .as_deref(),
            Some("viewer")
        );
        assert_eq!(a.active(&s.id).await.expect("active"), None);
        assert_eq!(a.close(&s.id).await.expect("close"), None);

        // Past max_sessions, the least recently used makes room.
        let s1 = a.open("ops").await.expect("s1");
        let s2 = a.open("ops").await.expect("s2");
        let s3 = b.open("ops").await.expect("s3");
        // A request marks its session only when the mark is a sixteenth of the idle time
        // old (here 94 ms).
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(a.active(&s1.id).await.expect("s1").is_some());
        let s4 = b.open("ops").await.expect("s4");
        assert_eq!(
            a.active(&s2.id).await.expect("s2"),
            None,
            "least recently used"
        );
        for s in [&s1, &s3, &s4] {
            assert!(a.active(&s.id).await.expect("live").is_some());
        }

        // The database away: an error, not a session.
        drop(pg);
        assert!(a.active(&s1.id).await.is_err());
        assert!(a.open("ops").await.is_err());
    });
}
