//! The Portless web console: what a server mounts beside the API so that a person with a
//! browser can do what the CLI does.
//!
//! The console is a client of the public API like any other: its pages are drawn in the
//! browser by one hand-written ES module (`assets/app.js`) from the same `/v1` routes and
//! JSON the CLI uses, plus the event stream `GET /v1/events`. What this crate serves itself
//! is small: the login page, the shell of every page, the assets, and the sessions
//! ([`sessions`]) that turn a one-time code or a pasted token into a principal. It knows
//! nothing of VMs or of how the server answers the API, so that the same console can stand
//! in front of one daemon or a fleet.
//!
//! The server keeps its side of the bargain through [`Host`] (who holds a token, and the
//! audit log) and by calling [`Console::caller`] when it identifies a request: a request
//! with the session cookie acts for the session's principal, and one that changes anything
//! must carry the session's CSRF token and an `Origin` of the server itself
//! ([`Console::check_unsafe`]).
//!
//! Every response of the console carries [`CONTENT_SECURITY_POLICY`] and its companions:
//! no inline script or style, nothing loaded from elsewhere.

pub mod assets;
pub mod pages;
pub mod sessions;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;

pub use pages::LoginNotice;
pub use sessions::{Active, Opened, Sessions, Settings};
pub use store::{SessionStore, StoreFuture};

/// The name of the session cookie.
pub const COOKIE: &str = "portless_session";

/// The request header that carries the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The policy every console response carries: scripts and styles from the server's own
/// files only, requests to the server only, no frames, no plugins.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
     base-uri 'none'; frame-ancestors 'none'";

/// What the console needs of the server that mounts it.
pub trait Host: Send + Sync + 'static {
    /// How the server's listeners describe a connection (`ConnectInfo`).
    type Peer: Clone + Send + Sync + 'static;

    /// The principal a bearer token belongs to, if any.
    fn principal_for_token(&self, token: &str) -> Option<String>;

    /// Writes a console event of a browser at `peer` to the audit log (a login, a refused
    /// login, a logout). An error stops the event: nothing is done that is not on record.
    fn audit(
        &self,
        peer: &Self::Peer,
        event: AuditEvent,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// A console event for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// The principal, when known.
    pub principal: Option<String>,
    /// The session's public tag, once there is a session.
    pub session: Option<String>,
    /// `console_login` or `console_logout`.
    pub action: &'static str,
    /// Whether it was allowed.
    pub allowed: bool,
    /// Why it was refused, or how the login was made.
    pub reason: Option<String>,
}

/// The console of one server: its sessions.
pub struct Console {
    sessions: Arc<dyn SessionStore>,
    secure: bool,
}

/// Who a request with a session cookie is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCaller {
    /// No session cookie: identify the request some other way.
    None,
    /// A live session.
    Active(Active),
    /// A cookie of no live session (logged out, expired, or never was).
    Expired,
    /// The session store could not be asked: why.
    Unavailable(String),
}

impl Console {
    /// A console with `settings`; `secure` when it is served over TLS only (the cookie is
    /// then `Secure`).
    /// A console with `settings` whose sessions are kept in memory; `secure` when it is
    /// served over TLS only (the cookie is then `Secure`).
    pub fn new(settings: Settings, secure: bool) -> Self {
        Self::with_store(Arc::new(Sessions::new(settings)), secure)
    }

    /// A console whose sessions are kept in `store`.
    pub fn with_store(store: Arc<dyn SessionStore>, secure: bool) -> Self {
        Self {
            sessions: store,
            secure,
        }
    }

    /// Its sessions.
    pub fn sessions(&self) -> &dyn SessionStore {
        &*self.sessions
    }

    /// A one-time login code for `principal`, and how long it lasts in seconds.
    pub async fn issue_code(&self, principal: &str) -> Result<(String, u64), String> {
        let code = self.sessions.issue_code(principal).await?;
        Ok((code, self.sessions.settings().code_lifetime.as_secs()))
    }

    /// The session a request's cookie names.
    pub async fn caller(&self, headers: &HeaderMap) -> SessionCaller {
        match session_cookie(headers) {
            None => SessionCaller::None,
            Some(id) => match self.sessions.active(id).await {
                Ok(Some(a)) => SessionCaller::Active(a),
                Ok(None) => SessionCaller::Expired,
                Err(e) => SessionCaller::Unavailable(e),
            },
        }
    }

    /// Checks a request that may change something (any method but `GET`, `HEAD` and
    /// `OPTIONS`) made with `session`: it must carry the session's CSRF token in
    /// [`CSRF_HEADER`] and an `Origin` naming the server it was sent to (its `Host`).
    /// The error says which is wrong.
    pub fn check_unsafe(session: &Active, headers: &HeaderMap) -> Result<(), String> {
        check_origin(headers)?;
        let token = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        match token {
            Some(t) if sessions::same_secret(t, &session.csrf) => Ok(()),
            Some(_) => Err("the CSRF token does not match the session's".into()),
            None => Err(
                "a request of a console session that changes something needs the X-CSRF-Token header"
                    .into(),
            ),
        }
    }

    fn cookie(&self, value: &str, max_age: u64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        let cookie = format!(
            "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        );
        // The value is hex and the rest is fixed text: always a valid header value.
        HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Whether the request's `Origin` names the server it was sent to (its `Host`): a request
/// from a page of another site carries that site's origin, and browsers send `Origin` with
/// every request that is not a `GET` or `HEAD`.
pub fn check_origin(headers: &HeaderMap) -> Result<(), String> {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (origin, host) {
        (None, _) => Err("a request that changes something needs an Origin header".into()),
        (Some(o), Some(h))
            if o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                .is_some_and(|authority| authority.eq_ignore_ascii_case(h)) =>
        {
            Ok(())
        }
        (Some(o), _) => Err(format!(
            "Origin {o:?} is not this server's ({})",
            host.unwrap_or("no Host header")
        )),
    }
}

/// `url` as the base of the console's links (`https://ops.example:7433`, no trailing
/// slash), if it is an `http://` or `https://` URL.
pub fn base_url(url: &str) -> Option<String> {
    let u = url.trim_end_matches('/');
    let ok = (u.starts_with("http://") || u.starts_with("https://"))
        && !u.contains(char::is_whitespace)
        && u.split_once("://")
            .is_some_and(|(_, rest)| !rest.is_empty());
    ok.then(|| u.to_owned())
}

/// The session id of the request's cookie, if it has one.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// The security headers of every console response.
pub fn security_headers(headers: &mut HeaderMap) {
    for (name, value) in [
        ("content-security-policy", CONTENT_SECURITY_POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "same-origin"),
        ("x-frame-options", "DENY"),
        ("cross-origin-opener-policy", "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
}

struct Mounted<H> {
    console: Arc<Console>,
    host: Arc<H>,
}

impl<H> Clone for Mounted<H> {
    fn clone(&self) -> Self {
        Self {
            console: self.console.clone(),
            host: self.host.clone(),
        }
    }
}

/// The console's routes: `/console/...` (and `/`, which leads there). A server merges
/// them with its API's router.
pub fn router<H: Host>(console: Arc<Console>, host: Arc<H>) -> axum::Router {
    axum::Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/login", get(login_page::<H>).post(login::<H>))
        .route("/console/logout", axum::routing::post(logout::<H>))
        .route("/console/assets/{name}", get(asset))
        // Browsers ask for an icon before any page says where it is: none, and no error.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/console/", get(shell::<H>))
        .route("/console/{*page}", get(shell::<H>))
        .layer(axum::middleware::map_response(
            |mut response: Response| async move {
                security_headers(response.headers_mut());
                response
            },
        ))
        .with_state(Mounted { console, host })
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Where a page goes after a login: back to `/console/`.
fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response()
}

async fn shell<H: Host>(State(m): State<Mounted<H>>, headers: HeaderMap) -> Response {
    match m.console.caller(&headers).await {
        SessionCaller::Active(a) => html(StatusCode::OK, pages::shell(&a.principal, &a.csrf)),
        SessionCaller::Unavailable(e) => html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::login(&LoginNotice::Problem(format!(
                "The sessions cannot be read just now ({e}): try again shortly."
            ))),
        ),
        _ => see_other("/console/login"),
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    code: Option<String>,
    ended: Option<String>,
}

async fn login_page<H: Host>(State(m): State<Mounted<H>>, Query(q): Query<LoginQuery>) -> Response {
    let notice = match (q.code, q.ended.as_deref()) {
        (Some(code), _) => match m.console.sessions.peek_code(&code).await {
            Ok(Some(principal)) => LoginNotice::Confirm { code, principal },
            Ok(None) => LoginNotice::Problem(
                "This login code is unknown, used or expired: run `portless console` again.".into(),
            ),
            Err(e) => LoginNotice::Problem(format!(
                "The login codes cannot be read just now ({e}): try again shortly."
            )),
        },
        (None, Some("logout")) => LoginNotice::LoggedOut,
        (None, _) => LoginNotice::None,
    };
    html(StatusCode::OK, pages::login(&notice))
}

#[derive(Deserialize)]
struct LoginForm {
    code: Option<String>,
    token: Option<String>,
}

async fn login<H: Host>(
    State(m): State<Mounted<H>>,
    ConnectInfo(peer): ConnectInfo<H::Peer>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let refuse =
        |status, problem: String| html(status, pages::login(&LoginNotice::Problem(problem)));
    if let Err(e) = check_origin(&headers) {
        let event = AuditEvent {
            principal: None,
            session: None,
            action: "console_login",
            allowed: false,
            reason: Some(e.clone()),
        };
        let _ = m.host.audit(&peer, event).await;
        return refuse(StatusCode::FORBIDDEN, e);
    }
    let code = form.code.filter(|c| !c.trim().is_empty());
    let token = form.token.filter(|t| !t.is_empty());
    let (principal, how) = match (code, token) {
        (Some(code), _) => match m.console.sessions.redeem_code(code.trim()).await {
            Ok(p) => (p, "a one-time code"),
            Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        (None, Some(token)) => (m.host.principal_for_token(&token), "a bearer token"),
        (None, None) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Give a login code or a token.".into(),
            );
        }
    };
    let Some(principal) = principal else {
        let reason = match how {
            "a bearer token" => "no principal matches the token",
            _ => "the login code is unknown, used or expired",
        };
        let event = AuditEvent {
            principal: None,
            session: None,
            action: "console_login",
            allowed: false,
            reason: Some(reason.into()),
        };
        if let Err(e) = m.host.audit(&peer, event).await {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, e);
        }
        let problem = match how {
            "a bearer token" => "No principal has this token.".to_owned(),
            _ => "This login code is unknown, used or expired: run `portless console` again."
                .to_owned(),
        };
        return refuse(StatusCode::FORBIDDEN, problem);
    };
    let opened = match m.console.sessions.open(&principal).await {
        Ok(o) => o,
        Err(e) => return refuse(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let event = AuditEvent {
        principal: Some(principal),
        session: Some(opened.tag.clone()),
        action: "console_login",
        allowed: true,
        reason: Some(format!("with {how}")),
    };
    if let Err(e) = m.host.audit(&peer, event).await {
        // Not on record, so not open; should the store be away too, the session is
        // unknown to the browser (no cookie is sent) and lapses by itself.
        let _ = m.console.sessions.close(&opened.id).await;
        return refuse(StatusCode::SERVICE_UNAVAILABLE, e);
    }
    let max_age = m.console.sessions.settings().max.as_secs();
    let mut response = see_other("/console/");
    response
        .headers_mut()
        .insert(header::SET_COOKIE, m.console.cookie(&opened.id, max_age));
    response
}

#[derive(Deserialize)]
struct LogoutForm {
    csrf: Option<String>,
}

async fn logout<H: Host>(
    State(m): State<Mounted<H>>,
    ConnectInfo(peer): ConnectInfo<H::Peer>,
    mut headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    let active = match m.console.caller(&headers).await {
        SessionCaller::Active(a) => a,
        SessionCaller::Unavailable(e) => {
            return html(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::login(&LoginNotice::Problem(e)),
            );
        }
        _ => {
            let mut response = see_other("/console/login");
            response
                .headers_mut()
                .insert(header::SET_COOKIE, m.console.cookie("", 0));
            return response;
        }
    };
    // The form carries the token in a field: check it as if it were the header.
    if let Some(csrf) = form.csrf.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(CSRF_HEADER, csrf);
    }
    if let Err(e) = Console::check_unsafe(&active, &headers) {
        let event = AuditEvent {
            principal: Some(active.principal),
            session: Some(active.tag.clone()),
            action: "console_logout",
            allowed: false,
            reason: Some(e.clone()),
        };
        let _ = m.host.audit(&peer, event).await;
        return html(
            StatusCode::FORBIDDEN,
            pages::login(&LoginNotice::Problem(e)),
        );
    }
    if let Some(id) = session_cookie(&headers)
        && let Err(e) = m.console.sessions.close(id).await
    {
        return html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::login(&LoginNotice::Problem(format!(
                "The session could not be ended just now ({e}): try again."
            ))),
        );
    }
    let event = AuditEvent {
        principal: Some(active.principal),
        session: Some(active.tag.clone()),
        action: "console_logout",
        allowed: true,
        reason: None,
    };
    // The session is gone either way; a failed write is the server's to report.
    let _ = m.host.audit(&peer, event).await;
    let mut response = see_other("/console/login?ended=logout");
    response
        .headers_mut()
        .insert(header::SET_COOKIE, m.console.cookie("", 0));
    response
}

async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(asset) = assets::find(&name) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(assets::accepts_gzip);
    let etag = if gzip {
        asset.gzip_etag()
    } else {
        asset.etag().to_owned()
    };
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let common = [
        (header::ETAG, etag),
        (header::CACHE_CONTROL, "no-cache".to_owned()),
        (header::VARY, "Accept-Encoding".to_owned()),
    ];
    if cached {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    if gzip {
        return (
            StatusCode::OK,
            common,
            [
                (header::CONTENT_TYPE, asset.content_type),
                (header::CONTENT_ENCODING, "gzip"),
            ],
            asset.gzip(),
        )
            .into_response();
    }
    (
        StatusCode::OK,
        common,
        [(header::CONTENT_TYPE, asset.content_type)],
        asset.body,
    )
        .into_response()
}

#[cfg(test)]
mod tests;
