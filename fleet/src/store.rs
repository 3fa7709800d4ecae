//! The fleet's database: a pool of connections to PostgreSQL, the schema's migrations, the
//! wake-up channels of hosts, and retries of transactions PostgreSQL aborted.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
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
    listener: Arc<OnceLock<Listener>>,
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
        Ok(Self {
            pool,
            config,
            listener: Arc::new(OnceLock::new()),
        })
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

    /// Wake-ups on `channel` (`LISTEN`). Every channel of a store shares one connection of
    /// its own, opened again whenever it is lost; each subscriber is also woken each time
    /// it is (re)established, since notifications sent while it was down are lost.
    pub fn listen(&self, channel: String) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        let listener = self
            .listener
            .get_or_init(|| Listener::start(self.config.clone()));
        let _ = listener.subscribe.send((channel, tx));
        rx
    }
}

/// The connection that `LISTEN`s for every channel of a store.
struct Listener {
    subscribe: mpsc::UnboundedSender<(String, mpsc::Sender<()>)>,
}

impl Listener {
    fn start(config: tokio_postgres::Config) -> Self {
        let (subscribe, mut requests) = mpsc::unbounded_channel::<(String, mpsc::Sender<()>)>();
        tokio::spawn(async move {
            let mut subs: HashMap<String, Vec<mpsc::Sender<()>>> = HashMap::new();
            let mut backoff = Duration::from_millis(100);
            loop {
                let Ok((client, mut connection)) = config.connect(NoTls).await else {
                    // Subscriptions wait in the queue meanwhile.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                };
                let (note_tx, mut notes) = mpsc::unbounded_channel::<String>();
                let driver = tokio::spawn(async move {
                    use futures_util::StreamExt as _;
                    let mut messages =
                        futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(Ok(m)) = messages.next().await {
                        if let tokio_postgres::AsyncMessage::Notification(n) = m {
                            let _ = note_tx.send(n.channel().to_owned());
                        }
                    }
                });
                let mut ok = true;
                for channel in subs.keys() {
                    if client.batch_execute(&listen_sql(channel)).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    backoff = Duration::from_millis(100);
                    for tx in subs.values().flatten() {
                        let _ = tx.try_send(());
                    }
                }
                while ok {
                    tokio::select! {
                        note = notes.recv() => match note {
                            Some(channel) => {
                                if let Some(list) = subs.get_mut(&channel) {
                                    list.retain(|tx| !tx.is_closed());
                                    for tx in list.iter() {
                                        let _ = tx.try_send(());
                                    }
                                }
                            }
                            None => ok = false,
                        },
                        request = requests.recv() => match request {
                            Some((channel, tx)) => {
                                let new = !subs.contains_key(&channel);
                                let _ = tx.try_send(());
                                subs.entry(channel.clone()).or_default().push(tx);
                                if new && client.batch_execute(&listen_sql(&channel)).await.is_err() {
                                    ok = false;
                                }
                            }
                            None => {
                                driver.abort();
                                return;
                            }
                        },
                    }
                }
                driver.abort();
                subs.retain(|_, list| {
                    list.retain(|tx| !tx.is_closed());
                    !list.is_empty()
                });
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
        Self { subscribe }
    }
}

/// `LISTEN` for a channel name made by [`host_channel`] (or any name without a `"`).
fn listen_sql(channel: &str) -> String {
    format!("LISTEN \"{}\"", channel.replace('"', ""))
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
