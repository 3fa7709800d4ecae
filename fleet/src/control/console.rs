//! The web console on a control plane: `portless-console`'s routes beside the API, its
//! sessions in the database ([`DbSessions`](super::sessions::DbSessions)) so that any
//! server answers any browser, a session as a way of identifying a caller, the guard that
//! refuses a session's request that changes something without its CSRF token and this
//! server's `Origin`, and `POST /v1/console/codes`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use portless_api::ConsoleCode;
use portless_console::{AuditEvent, Console, SessionCaller};

use super::{ApiError, Control};

/// The console's view of the control plane: who holds a token, and the audit log.
pub(super) struct ConsoleHost(pub(super) Arc<Control>);

impl portless_console::Host for ConsoleHost {
    type Peer = SocketAddr;

    fn principal_for_token(&self, token: &str) -> Option<String> {
        self.0.principal_for_token(token).map(|p| p.name.clone())
    }

    async fn audit(&self, peer: &SocketAddr, event: AuditEvent) -> Result<(), String> {
        let who = match &event.session {
            Some(tag) => format!("{peer} console session {tag}"),
            None => format!("{peer} console login page"),
        };
        let detail = match (&event.reason, event.allowed) {
            (Some(r), _) => Some(r.as_str()),
            (None, false) => Some("refused"),
            (None, true) => None,
        };
        self.0
            .try_audit(
                event.principal.as_deref(),
                &who,
                event.action,
                None,
                event.allowed,
                detail,
            )
            .await
            .map_err(|e| format!("the audit log cannot be written: {e}"))
    }
}

/// Refuses a request of a console session that may change something (not `GET`, `HEAD`
/// or `OPTIONS`) unless it carries the session's CSRF token and this server's `Origin`.
/// The refusal is audited and nothing else is looked at. Requests with a bearer token or
/// without a live session pass: they are identified as any other.
pub(super) async fn guard(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if safe || request.headers().contains_key(header::AUTHORIZATION) {
        return next.run(request).await;
    }
    let SessionCaller::Active(session) = c.console.caller(request.headers()).await else {
        return next.run(request).await;
    };
    let Err(reason) = Console::check_unsafe(&session, request.headers()) else {
        return next.run(request).await;
    };
    let target = format!("{} {}", request.method(), request.uri().path());
    let who = format!("{peer} console session {}", session.tag);
    if let Err(e) = c
        .try_audit(
            Some(&session.principal),
            &who,
            "console_request",
            Some(&target),
            false,
            Some(&reason),
        )
        .await
    {
        return ApiError::from(e).into_response();
    }
    ApiError(StatusCode::FORBIDDEN, format!("denied: {reason}")).into_response()
}

/// `POST /v1/console/codes`: a one-time login code for the caller's principal, and the URL
/// of the console with it: `[console] url`, else the scheme of this server and the
/// request's `Host`.
pub(super) async fn console_code(
    State(c): State<Arc<Control>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let caller = c.identify(peer, &headers, "console_code").await?;
    let base = match &c.config.console_url {
        Some(url) => url.clone(),
        None => {
            let scheme = if c.config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .filter(|h| !h.is_empty() && !h.contains(char::is_whitespace))
                .map_or_else(|| c.config.listen.to_string(), str::to_owned);
            format!("{scheme}://{host}")
        }
    };
    let (code, lifetime_s) = match c.console.issue_code(&caller.principal.name).await {
        Ok(issued) => issued,
        Err(e) => {
            let error = ApiError(StatusCode::SERVICE_UNAVAILABLE, e);
            return Err(c.deny(&caller, "console_code", None, error).await);
        }
    };
    c.allowed(&caller, "console_code", None).await;
    let now = crate::store::now_ms();
    let answer = ConsoleCode {
        url: format!("{base}/console/login?code={code}"),
        code,
        expires_at_ms: now + lifetime_s * 1000,
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}
