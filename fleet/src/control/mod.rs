//! The control plane (`portless control --config control.toml`): the host API, fleet-wide,
//! over the fleet's database. Stateless: any number of servers can run against one
//! database, a client may alternate between them, and every durable fact lives in
//! PostgreSQL.
//!
//! - [`config`](mod@config): `control.toml`.
//! - [`target`]: fleet-wide targets and the selectors of principals.
//! - `routes.rs`: the handlers, by route.
//! - `sweep.rs`: the sweeper, run by every server (its updates are conditional, so that
//!   several at once do each change once): new invocations of offline hosts become
//!   `delayed`, those never claimed by their deadline `delivery_timed_out`, and those whose
//!   host stopped reporting them for `host_lost_after` past their lease `host_lost`.

pub mod config;
mod console;
mod events;
mod routes;
pub mod sessions;
mod sweep;
pub mod target;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use portless_api::ErrorBody;

pub use config::{ControlConfig, ControlPrincipal};

use crate::store::Store;

/// The default configuration file of `portless control`.
pub const DEFAULT_CONFIG: &str = "/etc/portless/control.toml";

/// What the handlers share.
pub struct Control {
    /// The configuration in force.
    pub config: ControlConfig,
    /// The database.
    pub store: Store,
    /// The web console, its sessions in the database.
    pub console: Arc<portless_console::Console>,
    /// The long-lived streams (follow, events) each principal holds open on this server.
    streams: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// The program bodies being taken in (`routes::MAX_UPLOADS_IN_FLIGHT` at most).
    uploads: tokio::sync::Semaphore,
}

/// Long-lived streams (`follow`, `events`) one principal may hold open on one server: each
/// costs the database a query per poll.
pub const MAX_STREAMS_PER_PRINCIPAL: usize = 32;

/// One of a principal's stream slots, given back when dropped.
struct StreamSlot {
    control: Arc<Control>,
    principal: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self
            .control
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = streams.get_mut(&self.principal) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.principal);
            }
        }
    }
}

impl Control {
    /// A stream slot of `principal`, or 429 when it holds [`MAX_STREAMS_PER_PRINCIPAL`].
    fn stream_slot(self: &Arc<Self>, principal: &str) -> Result<StreamSlot, ApiError> {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = streams.entry(principal.to_owned()).or_insert(0);
        if *n >= MAX_STREAMS_PER_PRINCIPAL {
            return Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "principal {principal:?} has {MAX_STREAMS_PER_PRINCIPAL} streams open on \
                     this server (follow, events): close one first"
                ),
            ));
        }
        *n += 1;
        Ok(StreamSlot {
            control: self.clone(),
            principal: principal.to_owned(),
        })
    }
}

/// An API error: a status and a message for the `error` field.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
    fn not_found(msg: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, msg.into())
    }
    fn forbidden(msg: impl Into<String>) -> Self {
        Self(StatusCode::FORBIDDEN, msg.into())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        let status = if e.is_transient() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        Self(status, e.to_string())
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        crate::store::StoreError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

/// The router of the control plane: the API, and the web console beside it.
pub fn router(control: Arc<Control>) -> axum::Router {
    let console = portless_console::router(
        control.console.clone(),
        Arc::new(console::ConsoleHost(control.clone())),
    );
    routes::router(control)
        .merge(console)
        .layer(axum::middleware::map_response(
            |mut response: Response| async move {
                portless_console::security_headers(response.headers_mut());
                response
            },
        ))
}

/// `portless control [migrate] [--config PATH]`.
pub fn run_from_args(args: impl Iterator<Item = OsString>) -> ExitCode {
    let mut config = PathBuf::from(DEFAULT_CONFIG);
    let mut migrate = false;
    let mut args = args;
    while let Some(a) = args.next() {
        match a.to_str() {
            Some("migrate") if !migrate => migrate = true,
            Some("--config") => match args.next() {
                Some(p) => config = p.into(),
                None => return usage("--config needs a path"),
            },
            Some("--help" | "-h") => {
                println!(
                    "usage: portless control [--config PATH]           serve the control plane\n       \
                     portless control migrate [--config PATH]   bring the database's schema up to date\n\
                     (default config {DEFAULT_CONFIG})"
                );
                return ExitCode::SUCCESS;
            }
            _ => return usage(&format!("unexpected argument {a:?}")),
        }
    }
    let config = match ControlConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portless control: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portless control: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if migrate {
        runtime.block_on(run_migrations(config))
    } else {
        runtime.block_on(serve(config))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("portless control: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("portless control: {msg}\nusage: portless control [migrate] [--config PATH]");
    ExitCode::from(2)
}

async fn run_migrations(config: ControlConfig) -> Result<()> {
    let store = Store::new(&config.database, 1)?;
    let applied = store.migrate().await?;
    if applied.is_empty() {
        println!(
            "portless control: the schema is up to date (version {})",
            crate::store::schema_version()
        );
    } else {
        let list: Vec<String> = applied.iter().map(i32::to_string).collect();
        println!("portless control: applied migration {}", list.join(", "));
    }
    Ok(())
}

/// Serves the control plane until SIGTERM or SIGINT.
pub async fn serve(config: ControlConfig) -> Result<()> {
    // The certificate is read before the port is taken: a bad file stops the start.
    let tls = config
        .tls
        .as_ref()
        .map(|(cert, key)| portless_tls::server_config(cert, key))
        .transpose()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let control = Arc::new(Control::open(config).await?);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let signals = tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let t = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, () = t => {} }
        let _ = stop_tx.send(true);
    });
    match tls {
        Some(tls) => {
            eprintln!("portless control: serving on {addr} (TLS, bearer tokens)");
            let sweeper = tokio::spawn(sweep::run(control.clone()));
            portless_tls::serve(listener, tls, router(control), stop, std::convert::identity).await;
            sweeper.abort();
        }
        None => {
            if !addr.ip().is_loopback() {
                eprintln!(
                    "portless control: WARNING: serving {addr} in plain HTTP \
                     (insecure_plaintext): bearer tokens cross the network in clear text"
                );
            }
            eprintln!("portless control: serving on {addr} (plain HTTP, bearer tokens)");
            let mut stop = stop;
            serve_on(control, listener, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await?;
        }
    }
    signals.abort();
    eprintln!("portless control: stopped");
    Ok(())
}

impl Control {
    /// The control plane of `config`: its pool, once the database's schema is checked.
    pub async fn open(config: ControlConfig) -> Result<Self> {
        let store = Store::new(&config.database, config.pool_size)?;
        store.check_schema().await?;
        let sessions = sessions::DbSessions::new(store.clone(), config.console);
        let console =
            portless_console::Console::with_store(Arc::new(sessions), config.tls.is_some());
        Ok(Self {
            config,
            store,
            console: Arc::new(console),
            streams: std::sync::Mutex::default(),
            uploads: tokio::sync::Semaphore::new(routes::MAX_UPLOADS_IN_FLIGHT),
        })
    }
}

/// Serves `control` on `listener`, with its sweeper, until `shutdown` completes.
pub async fn serve_on(
    control: Arc<Control>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let sweeper = tokio::spawn(sweep::run(control.clone()));
    let app = router(control).into_make_service_with_connect_info::<SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    sweeper.abort();
    Ok(served?)
}
