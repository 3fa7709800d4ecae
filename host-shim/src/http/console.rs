//! The web console as the daemon mounts it: `portless-console`'s routes beside the API,
//! its sessions as a way of identifying callers, the guard that refuses a session's
//! request that changes something without its CSRF token and this server's `Origin`,
//! `GET /v1/whoami`, and `POST /v1/console/codes` with the loopback listener it opens
//! when the daemon has no TCP listener.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use portless_api::{ConsoleCode, Rights, Whoami};
use portless_console::{AuditEvent, Console, SessionCaller};

use super::identify::caller;
use super::policy::{Action, Caller};
use super::{ApiError, ApiResult, App, now_ms};

/// The console's view of the daemon: who holds a token, and the audit log.
pub(super) struct ConsoleHost(pub(super) Arc<App>);

impl portless_console::Host for ConsoleHost {
    type Peer = super::Peer;

    fn principal_for_token(&self, token: &str) -> Option<String> {
        self.0
            .policy
            .identify(&Caller::Token(token.to_owned()))
            .map(|p| p.name().to_owned())
    }

    async fn audit(&self, peer: &super::Peer, event: AuditEvent) -> Result<(), String> {
        let app = &self.0;
        let who = match &event.session {
            Some(tag) => format!("{} console session {tag}", super::identify::peer_key(peer)),
            None => format!("{} console login page", super::identify::peer_key(peer)),
        };
        let principal = event
            .principal
            .as_deref()
            .and_then(|name| app.policy.principal(name));
        let result = if event.allowed {
            Ok(event.reason)
        } else {
            Err(event.reason.unwrap_or_else(|| "refused".into()))
        };
        let action = match event.action {
            "console_logout" => Action::ConsoleLogout,
            _ => Action::ConsoleLogin,
        };
        app.record_as(peer, who, principal, &action, None, &result)
            .await
            .map_err(|e| e.1)
    }
}

/// Refuses a request of a console session that may change something (not `GET`, `HEAD`
/// or `OPTIONS`) unless it carries the session's CSRF token and this server's `Origin`.
/// The refusal is audited and nothing else is looked at. Requests with a bearer token or
/// without the cookie pass: they are identified as before.
pub(super) async fn guard(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<super::Peer>,
    request: Request,
    next: Next,
) -> Response {
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    let bearer = request.headers().contains_key(header::AUTHORIZATION);
    if safe || bearer {
        return next.run(request).await;
    }
    let SessionCaller::Active(session) = app.console.caller(request.headers()).await else {
        return next.run(request).await;
    };
    let Err(reason) = Console::check_unsafe(&session, request.headers()) else {
        return next.run(request).await;
    };
    let target = format!("{} {}", request.method(), request.uri().path());
    let who = Ok(Caller::Session {
        principal: session.principal.clone(),
        tag: session.tag.clone(),
    });
    let principal = app.policy.principal(&session.principal);
    let result = Err(reason.clone());
    if let Err(e) = app
        .record(
            &peer,
            &who,
            principal,
            &Action::ConsoleRequest,
            Some(target),
            &result,
        )
        .await
    {
        return e.into_response();
    }
    ApiError(StatusCode::FORBIDDEN, format!("denied: {reason}")).into_response()
}

/// `GET /v1/whoami`.
pub(super) async fn whoami(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<super::Peer>,
    headers: HeaderMap,
) -> ApiResult<Json<Whoami>> {
    let principal = app
        .authorize(&peer, &headers, &Action::Whoami, None, None)
        .await?;
    let c = principal.config();
    let how = caller(&app.console, &peer, &headers)
        .await
        .map(|c| c.to_string())
        .unwrap_or_default();
    Ok(Json(Whoami {
        principal: principal.name().to_owned(),
        caller: how,
        rights: Rights {
            push: c.push,
            audit: c.audit,
            read_all: c.read_all,
            cancel_all: c.cancel_all,
        },
        fleet: false,
    }))
}

/// `POST /v1/console/codes`: a one-time login code for the caller's principal, and the URL
/// of the console with it. Without a TCP listener, the first call opens the loopback
/// listener of `[console] listen`.
pub(super) async fn console_code(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<super::Peer>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let principal = app
        .authorize(&peer, &headers, &Action::ConsoleCode, None, None)
        .await?;
    let base = console_base(&app).await?;
    let (code, lifetime_s) = app
        .console
        .issue_code(principal.name())
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let answer = ConsoleCode {
        url: format!("{base}/console/login?code={code}"),
        code,
        expires_at_ms: now_ms() + lifetime_s * 1000,
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// The base URL of the console: `[console] url`, else the TCP listener's, else the
/// loopback listener's (opened now if it is not yet).
async fn console_base(app: &Arc<App>) -> ApiResult<String> {
    if let Some(url) = &app.config.console.url {
        return Ok(url.clone());
    }
    let d = &app.config.daemon;
    if let Some(addr) = d.tcp {
        let scheme = if d.tls.is_some() { "https" } else { "http" };
        let shown = if addr.ip().is_unspecified() {
            SocketAddr::new([127, 0, 0, 1].into(), addr.port())
        } else {
            addr
        };
        return Ok(format!("{scheme}://{shown}"));
    }
    let addr = app
        .console_listener
        .get_or_try_init(|| open_loopback(app.clone()))
        .await?;
    Ok(format!("http://{addr}"))
}

/// Binds `[console] listen` and serves the API and the console on it (plain HTTP on a
/// loopback address) until the daemon stops.
async fn open_loopback(app: Arc<App>) -> ApiResult<SocketAddr> {
    let want = app.config.console.listen;
    let listener = tokio::net::TcpListener::bind(want).await.map_err(|e| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot open the console's listener on {want} ([console] listen): {e}"),
        )
    })?;
    let addr = listener.local_addr().map_err(ApiError::internal)?;
    eprintln!("portless: console listener on http://{addr} (plain HTTP, loopback)");
    let mut stopping = app.stopping.clone();
    let svc = super::router(app.clone()).into_make_service_with_connect_info::<super::Peer>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(super::identify::NoDelay(listener), svc)
            .with_graceful_shutdown(async move {
                let _ = stopping.wait_for(|s| *s).await;
            })
            .await;
    });
    app.background
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(task);
    Ok(addr)
}
