//! The fleet's database: a pool of connections to PostgreSQL, the schema's migrations, the
//! wake-up channels of hosts, and retries of transactions PostgreSQL aborted.

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// What can go wrong with the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The connection string does not parse.
    #[error("database URL: {0}")]
    Url(String),
    /// No connection could be had from the pool.
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("database: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// The schema is older (or newer) than this build's.
    #[error("{0}")]
    Schema(String),
    /// A migration failed.
    #[error("migration: {0}")]
    Migration(String),
}

impl StoreError {
    /// Whether the failure may pass by retrying: a lost connection, a server restarting, a
    /// deadlock or serialization failure.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Pool(_) => true,
            Self::Sql(e) => {
                e.is_closed()
                    || e.as_db_error().is_none()
                    || e.code().is_some_and(|c| {
                        *c == SqlState::T_R_DEADLOCK_DETECTED
                            || *c == SqlState::T_R_SERIALIZATION_FAILURE
                            || *c == SqlState::ADMIN_SHUTDOWN
                            || *c == SqlState::CRASH_SHUTDOWN
                            || *c == SqlState::CANNOT_CONNECT_NOW
                    })
            }
            _ => false,
        }
    }
}

/// The fleet's database: a pool of connections, opened lazily.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    config: tokio_postgres::Config,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// The version of the newest migration this build carries.
pub fn schema_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(refinery::Migration::version)
        .max()
        .unwrap_or(0)
}

impl Store {
    /// A pool of at most `max_size` connections to the database at `url` (a libpq
    /// connection string, `host=/run/postgresql dbname=portless`, or a `postgresql://` URL).
    /// Nothing is connected yet.
    pub fn new(url: &str, max_size: usize) -> Result<Self, StoreError> {
        let mut config =
            tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Url(e.to_string()))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("portless");
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_size.max(1))
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Url(e.to_string()))?;
        Ok(Self { pool, config })
    }

    /// A connection from the pool.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    async fn connect_raw(&self) -> Result<tokio_postgres::Client, StoreError> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Applies the migrations the database lacks; the versions applied, oldest first.
    pub async fn migrate(&self) -> Result<Vec<i32>, StoreError> {
        let mut client = self.connect_raw().await?;
        let report = embedded::migrations::runner()
            .run_async(&mut client)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(report
            .applied_migrations()
            .iter()
            .map(refinery::Migration::version)
            .collect())
    }

    /// Checks that the database's schema is this build's: an error that says what to do
    /// when it is not.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let mut client = self.connect_raw().await?;
        let history: Option<String> = client
            .query_one("SELECT to_regclass('refinery_schema_history')::text", &[])
            .await?
            .get(0);
        if history.is_none() {
            return Err(StoreError::Schema(format!(
                "the database has no Portless schema: run `portless control migrate --config \
                 ...` first (this build needs version {})",
                schema_version()
            )));
        }
        let last = embedded::migrations::runner()
            .get_last_applied_migration_async(&mut client)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        let want = schema_version();
        match last.map(|m| m.version()) {
            Some(v) if v == want => Ok(()),
            Some(v) if v > want => Err(StoreError::Schema(format!(
                "the database's schema is version {v}, newer than this build's {want}: \
                 run a newer portless"
            ))),
            found => Err(StoreError::Schema(format!(
                "the database's schema is {}, this build needs version {want}: run \
                 `portless control migrate --config ...` first",
                found.map_or("absent".to_owned(), |v| format!("version {v}"))
            ))),
        }
    }

    /// Wake-ups on `channel` (`LISTEN`), over a connection of their own that is opened
    /// again whenever it is lost. A wake-up is also sent each time the connection is
    /// (re)established, since notifications sent while it was down are lost.
    pub fn listen(&self, channel: String) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        let config = self.config.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                if tx.is_closed() {
                    return;
                }
                if let Ok((client, mut connection)) = config.connect(NoTls).await {
                    let (note_tx, mut note_rx) = mpsc::unbounded_channel();
                    let driver = tokio::spawn(async move {
                        let mut messages =
                            futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                        use futures_util::StreamExt as _;
                        while let Some(Ok(m)) = messages.next().await {
                            if let tokio_postgres::AsyncMessage::Notification(_) = m {
                                let _ = note_tx.send(());
                            }
                        }
                    });
                    if client
                        .batch_execute(&format!("LISTEN \"{channel}\""))
                        .await
                        .is_ok()
                    {
                        backoff = Duration::from_millis(100);
                        let _ = tx.try_send(());
                        while note_rx.recv().await.is_some() {
                            let _ = tx.try_send(());
                        }
                    }
                    driver.abort();
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        rx
    }
}

/// The `LISTEN` channel of host `host`: a hash of its name, so that any name fits
/// PostgreSQL's 63-byte identifiers.
pub fn host_channel(host: &str) -> String {
    let digest = Sha256::digest(host.as_bytes());
    format!("portless_host_{}", hex::encode(&digest[..12]))
}

/// Runs `f` again (up to 5 times, 50 ms apart and growing) while it fails transiently.
pub async fn retry<T, F, Fut>(mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(50);
    let mut tries = 0;
    loop {
        match f().await {
            Err(e) if e.is_transient() && tries < 5 => {
                tries += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            r => return r,
        }
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
