//! The daemon's HTTP layer: the routes of the API (`portless-api`'s types and OpenAPI
//! document define them), and the state the handlers share. Handlers borrow the [`App`];
//! they talk to the VM drivers through their handles and read the records on the blocking
//! pool, never on an async worker. Bad requests get a 4xx with `{"error": "..."}` saying
//! what is wrong.
//!
//! - [`identify`]: who is calling, what the policy says, and the audit entry of the call;
//! - [`policy`]: principals and their rights;
//! - [`callers`]: what callers may make the daemon spend (follows, pushes, denied calls);
//! - `vms.rs`, `executions.rs`, `push.rs`, `audit.rs`, `events.rs`: the handlers, by route;
//! - `console.rs`: the web console mounted beside the API, its sessions as callers, and
//!   `GET /v1/whoami` and `POST /v1/console/codes`.

mod audit;
pub mod callers;
mod console;
mod events;
mod executions;
pub mod identify;
pub mod policy;
mod push;
mod vms;

pub(crate) use executions::dispatch;
pub(crate) use identify::NoDelay;
pub use identify::Peer;
pub use push::SPOOL_DIR;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use portless_api::ErrorBody;
use tokio::sync::{broadcast, oneshot};

use crate::config::HostConfig;
use crate::records::{Done, Op, Records, RecordsError, Writer};
use crate::vm::{VmError, VmEvent, VmHandle};
use callers::Callers;
use policy::Policy;

/// Everything the handlers share.
pub struct App {
    /// The configuration in force.
    pub config: HostConfig,
    /// Who may do what.
    pub policy: Policy,
    /// Executions, output and audit; read on the blocking pool, never on an async worker.
    pub records: Arc<Records>,
    /// Every write to the records goes through it.
    pub writer: Writer,
    /// The VM drivers, by name.
    pub vms: BTreeMap<String, VmHandle>,
    /// Output and completion events from the drivers.
    pub events: broadcast::Sender<VmEvent>,
    /// Names pushes, so that one the API gave up on can be withdrawn.
    pub tickets: std::sync::atomic::AtomicU64,
    /// What callers may make the daemon spend: denied calls, follows, pushes.
    pub callers: Callers,
    /// Turns true when the daemon stops: open streams end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// When the daemon started (ms since the epoch).
    pub started_ms: u64,
    /// The web console's sessions.
    pub console: Arc<portless_console::Console>,
    /// The console's loopback listener, once `portless console` opened it.
    pub console_listener: tokio::sync::OnceCell<std::net::SocketAddr>,
    /// Servers started while running (the console's listener): the daemon waits for them
    /// when it stops.
    pub background: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl App {
    /// Room for one more follow or event stream of `principal`; 429 past
    /// `callers.follows_per_principal`.
    fn follow_slot(&self, principal: &policy::Principal) -> ApiResult<callers::FollowSlot> {
        self.callers.open_follow(principal.name()).ok_or_else(|| {
            ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "principal {:?} has {} follow streams open already (callers.follows_per_principal)",
                    principal.name(),
                    self.callers.follow_limit()
                ),
            )
        })
    }
}

/// Runs a read of the records on the blocking pool: SQLite never runs on an async worker.
async fn read<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&Records) -> Result<T, RecordsError> + Send + 'static,
) -> ApiResult<T> {
    let records = app.records.clone();
    tokio::task::spawn_blocking(move || f(&records))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

/// Refuses new work (503) while the disk of the records is full, naming the cause; reads,
/// listings and the audit log keep working.
async fn refuse_if_disk_full(app: &App) -> ApiResult<()> {
    let records = app.records.clone();
    let problem = tokio::task::spawn_blocking(move || records.disk_problem())
        .await
        .map_err(ApiError::internal)?;
    match problem {
        Some(cause) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("new executions are refused: {cause}"),
        )),
        None => Ok(()),
    }
}

/// Applies writes through the records writer; the first op's result.
async fn write(app: &App, ops: Vec<Op>) -> Result<Done, RecordsError> {
    let results = app.writer.run(ops).await?;
    results.into_iter().next().unwrap_or(Ok(Done::Ok))
}

/// An API error: a status and a message for the `error` field.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
    fn not_found(msg: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, msg.into())
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        Self(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<VmError> for ApiError {
    fn from(e: VmError) -> Self {
        let status = match e {
            VmError::Rejected(_) | VmError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            VmError::Undeliverable
            | VmError::AgentLost
            | VmError::ShuttingDown
            | VmError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            VmError::NoAnswer(_) => StatusCode::GATEWAY_TIMEOUT,
        };
        Self(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Errors that axum produces before a handler runs (a malformed id, query or JSON body, a
/// wrong method, a body too large) come as plain text: give them the API's JSON shape too.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).into_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let mut fixed = ApiError(status, text).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fixed
}

/// Largest program the API accepts for a push (the guest's own limit may be lower).
pub const MAX_PUSH_BYTES: usize = 64 << 20;

/// The router of the daemon: the API, and the web console beside it.
pub fn router(app: Arc<App>) -> axum::Router {
    let console = portless_console::router(
        app.console.clone(),
        Arc::new(console::ConsoleHost(app.clone())),
    );
    api_router(app)
        .merge(console)
        .layer(axum::middleware::map_response(
            |mut response: Response| async move {
                portless_console::security_headers(response.headers_mut());
                response
            },
        ))
}

/// The routes of the API.
fn api_router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .route("/v1/vms", get(vms::list_vms))
        .route("/v1/vms/{vm}/commands", get(vms::commands))
        .route("/v1/vms/{vm}/ping", post(vms::ping))
        .route("/v1/vms/{vm}/metrics", get(vms::metrics))
        .route("/v1/vms/{vm}/push", post(push::push))
        .route("/v1/exec", post(executions::exec))
        .route("/v1/executions", get(executions::list_executions))
        .route("/v1/executions/{id}", get(executions::execution))
        .route("/v1/executions/{id}/wait", get(executions::wait))
        .route("/v1/executions/{id}/output", get(executions::output))
        .route("/v1/executions/{id}/follow", get(executions::follow))
        .route("/v1/executions/{id}/cancel", post(executions::cancel))
        .route("/v1/audit", get(audit::audit))
        .route("/v1/daemon", get(audit::daemon_state))
        .route("/v1/events", get(events::events))
        .route("/v1/whoami", get(console::whoami))
        .route("/v1/console/codes", post(console::console_code))
        .fallback(|| async { ApiError::not_found("no such endpoint (see openapi.json)") })
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            console::guard,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(app)
}

/// Waits for a driver's answer, up to the delivery timeout and a little more.
async fn answer<T>(app: &App, rx: oneshot::Receiver<Result<T, VmError>>) -> ApiResult<T> {
    match answer_within(app, rx).await {
        Some(r) => r,
        None => Err(ApiError(
            StatusCode::GATEWAY_TIMEOUT,
            "the agent has not answered yet (the request is in its queue)".into(),
        )),
    }
}

/// The driver's answer, or `None` if the agent has not answered within the delivery timeout
/// (and a little more): the request may still be carried out.
async fn answer_within<T>(
    app: &App,
    rx: oneshot::Receiver<Result<T, VmError>>,
) -> Option<ApiResult<T>> {
    let limit = app.config.daemon.delivery_timeout + Duration::from_secs(5);
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(r)) => Some(r.map_err(ApiError::from)),
        Ok(Err(_)) => Some(Err(VmError::ShuttingDown.into())),
        Err(_) => None,
    }
}
