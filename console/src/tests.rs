//! The console's routes without a browser: login by code and by token, cookie flags, the
//! security headers, CSRF and `Origin` on logout, expiry.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::Request;
use tower::ServiceExt as _;

use super::*;

#[derive(Default)]
struct FakeHost {
    events: Mutex<Vec<AuditEvent>>,
    refuse_audit: bool,
}

impl Host for FakeHost {
    type Peer = &'static str;

    fn principal_for_token(&self, token: &str) -> Option<String> {
        (token == "secret-token").then(|| "ops".to_owned())
    }

    async fn audit(&self, peer: &&'static str, event: AuditEvent) -> Result<(), String> {
        assert_eq!(*peer, "peer");
        if self.refuse_audit {
            return Err("the audit log cannot be written".into());
        }
        self.events.lock().expect("lock").push(event);
        Ok(())
    }
}

struct Fixture {
    console: Arc<Console>,
    sessions: Arc<Sessions>,
    host: Arc<FakeHost>,
    router: axum::Router,
}

fn fixture(settings: Settings, secure: bool, refuse_audit: bool) -> Fixture {
    let sessions = Arc::new(Sessions::new(settings));
    let console = Arc::new(Console::with_store(sessions.clone(), secure));
    let host = Arc::new(FakeHost {
        refuse_audit,
        ..FakeHost::default()
    });
    let router = router(console.clone(), host.clone()).layer(MockConnectInfo("peer"));
    Fixture {
        console,
        sessions,
        host,
        router,
    }
}

async fn send(router: &axum::Router, request: Request<Body>) -> Response {
    router.clone().oneshot(request).await.expect("infallible")
}

/// `POST /console/login` with form `body` from `origin`.
async fn login(router: &axum::Router, body: &str, origin: Option<&str>) -> Response {
    send(router, post_form("/console/login", body, origin, None)).await
}

fn post_form(path: &str, body: &str, origin: Option<&str>, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::post(path)
        .header(header::HOST, "127.0.0.1:7433")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(o) = origin {
        b = b.header(header::ORIGIN, o);
    }
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, format!("other=1; {COOKIE}={c}"));
    }
    b.body(Body::from(body.to_owned())).expect("request")
}

fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path).header(header::HOST, "127.0.0.1:7433");
    if let Some(c) = cookie {
        b = b.header(header::COOKIE, format!("{COOKIE}={c}"));
    }
    b.body(Body::empty()).expect("request")
}

const ORIGIN: &str = "http://127.0.0.1:7433";

fn set_cookie(r: &Response) -> String {
    r.headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .and_then(|p| p.split_once('='))
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default()
}

async fn text(r: Response) -> String {
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20)
        .await
        .expect("body");
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn a_code_logs_in_once_with_a_strict_http_only_cookie() {
    let f = fixture(Settings::default(), false, false);
    let (code, lifetime) = f.console.issue_code("ops").await.expect("code");
    assert_eq!(lifetime, 120);

    // The link shows whom it logs in as, and does not use the code up.
    let page = send(&f.router, get(&format!("/console/login?code={code}"), None)).await;
    assert_eq!(page.status(), StatusCode::OK);
    let body = text(page).await;
    assert!(
        body.contains("data-test=\"login-principal\">ops<"),
        "{body}"
    );

    let r = login(&f.router, &format!("code={code}"), Some(ORIGIN)).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()[header::LOCATION], "/console/");
    let cookie = set_cookie(&r);
    assert!(cookie.starts_with(&format!("{COOKIE}=")), "{cookie}");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(
            cookie.split("; ").any(|p| p == flag),
            "{flag} missing: {cookie}"
        );
    }
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP: no Secure flag ({cookie})"
    );
    let id = cookie_value(&cookie);
    assert_eq!(id.len(), 64);

    // Used twice: refused, and audited.
    let again = login(&f.router, &format!("code={code}"), Some(ORIGIN)).await;
    assert_eq!(again.status(), StatusCode::FORBIDDEN);
    assert!(set_cookie(&again).is_empty());
    assert!(text(again).await.contains("unknown, used or expired"));
    let page = send(&f.router, get(&format!("/console/login?code={code}"), None)).await;
    assert!(text(page).await.contains("unknown, used or expired"));

    let events = f.host.events.lock().expect("lock").clone();
    assert_eq!(events.len(), 2);
    assert!(events[0].allowed && events[0].principal.as_deref() == Some("ops"));
    assert_eq!(events[0].reason.as_deref(), Some("with a one-time code"));
    assert!(!events[1].allowed && events[1].principal.is_none());

    // The cookie opens the shell, which carries the session's CSRF token.
    let shell = send(&f.router, get("/console/vms/vm1", Some(&id))).await;
    assert_eq!(shell.status(), StatusCode::OK);
    let csrf = match f
        .console
        .caller(&{
            let mut h = HeaderMap::new();
            h.insert(
                header::COOKIE,
                HeaderValue::from_str(&format!("{COOKIE}={id}")).expect("v"),
            );
            h
        })
        .await
    {
        SessionCaller::Active(a) => a.csrf,
        other => panic!("{other:?}"),
    };
    assert!(text(shell).await.contains(&format!("content=\"{csrf}\"")));
}

#[tokio::test]
async fn the_secure_flag_follows_tls() {
    let f = fixture(Settings::default(), true, false);
    let r = login(
        &f.router,
        "token=secret-token",
        Some("https://127.0.0.1:7433"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(set_cookie(&r).ends_with("; Secure"));
}

#[tokio::test]
async fn a_token_logs_in_and_a_wrong_one_does_not() {
    let f = fixture(Settings::default(), false, false);
    let wrong = login(&f.router, "token=guess", Some(ORIGIN)).await;
    assert_eq!(wrong.status(), StatusCode::FORBIDDEN);
    assert!(set_cookie(&wrong).is_empty());
    let r = login(&f.router, "token=secret-token", Some(ORIGIN)).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let events = f.host.events.lock().expect("lock").clone();
    assert_eq!(
        events[0].reason.as_deref(),
        Some("no principal matches the token")
    );
    assert_eq!(events[1].reason.as_deref(), Some("with a bearer token"));
}

#[tokio::test]
async fn a_login_from_another_origin_or_none_is_refused() {
    let f = fixture(Settings::default(), false, false);
    for origin in [
        None,
        Some("http://evil.example"),
        Some("null"),
        Some("http://127.0.0.1:7434"),
    ] {
        let (code, _) = f.console.issue_code("ops").await.expect("code");
        let r = login(&f.router, &format!("code={code}"), origin).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{origin:?}");
        assert!(set_cookie(&r).is_empty());
        // The code was not used up by the refused attempt.
        assert!(f.sessions.peek_code(&code, Instant::now()).is_some());
    }
    assert_eq!(f.host.events.lock().expect("lock").len(), 4);
}

#[tokio::test]
async fn no_session_is_opened_when_the_audit_log_cannot_be_written() {
    let f = fixture(Settings::default(), false, true);
    let r = login(&f.router, "token=secret-token", Some(ORIGIN)).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(set_cookie(&r).is_empty());
    assert!(f.sessions.is_empty());
}

async fn logged_in(f: &Fixture) -> (String, String) {
    let r = login(&f.router, "token=secret-token", Some(ORIGIN)).await;
    let id = cookie_value(&set_cookie(&r));
    let mut h = HeaderMap::new();
    h.insert(
        header::COOKIE,
        HeaderValue::from_str(&format!("{COOKIE}={id}")).expect("v"),
    );
    match f.console.caller(&h).await {
        SessionCaller::Active(a) => (id, a.csrf),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn logout_needs_the_csrf_token_and_the_origin() {
    let f = fixture(Settings::default(), false, false);
    let (id, csrf) = logged_in(&f).await;
    for (body, origin) in [
        ("csrf=wrong".to_owned(), Some(ORIGIN)),
        (String::new(), Some(ORIGIN)),
        (format!("csrf={csrf}"), Some("http://evil.example")),
        (format!("csrf={csrf}"), None),
    ] {
        let r = send(
            &f.router,
            post_form("/console/logout", &body, origin, Some(&id)),
        )
        .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{body} {origin:?}");
        assert_eq!(f.sessions.len(), 1, "the session is still there");
    }
    let r = send(
        &f.router,
        post_form(
            "/console/logout",
            &format!("csrf={csrf}"),
            Some(ORIGIN),
            Some(&id),
        ),
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert!(set_cookie(&r).contains("Max-Age=0"));
    let shell = send(&f.router, get("/console/", Some(&id))).await;
    assert_eq!(shell.status(), StatusCode::SEE_OTHER, "logged out");
    assert_eq!(shell.headers()[header::LOCATION], "/console/login");
}

#[tokio::test]
async fn a_session_expires_when_idle() {
    let settings = Settings {
        idle: Duration::from_millis(300),
        ..Settings::default()
    };
    let f = fixture(settings, false, false);
    let (id, _) = logged_in(&f).await;
    assert_eq!(
        send(&f.router, get("/console/", Some(&id))).await.status(),
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        send(&f.router, get("/console/", Some(&id))).await.status(),
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let f = fixture(Settings::default(), false, false);
    for path in [
        "/console/login",
        "/console/",
        "/console/assets/app.js",
        "/console/assets/nope",
        "/",
    ] {
        let r = send(&f.router, get(path, None)).await;
        let h = r.headers();
        assert_eq!(
            h["content-security-policy"], CONTENT_SECURITY_POLICY,
            "{path}"
        );
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["referrer-policy"], "same-origin", "{path}");
    }
    let csp = CONTENT_SECURITY_POLICY;
    assert!(!csp.contains("unsafe") && !csp.contains("http"), "{csp}");
}

#[tokio::test]
async fn assets_are_revalidated_by_their_etag() {
    let f = fixture(Settings::default(), false, false);
    let r = send(&f.router, get("/console/assets/app.js", None)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()[header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );
    let etag = r.headers()[header::ETAG].to_str().expect("etag").to_owned();
    let again = Request::get("/console/assets/app.js")
        .header(header::IF_NONE_MATCH, &etag)
        .body(Body::empty())
        .expect("request");
    assert_eq!(
        send(&f.router, again).await.status(),
        StatusCode::NOT_MODIFIED
    );
}

#[tokio::test]
async fn assets_are_gzipped_for_browsers_that_take_it() {
    use std::io::Read as _;
    let f = fixture(Settings::default(), false, false);
    let with = |encoding: &str, etag: Option<&str>| {
        let mut r =
            Request::get("/console/assets/app.js").header(header::ACCEPT_ENCODING, encoding);
        if let Some(e) = etag {
            r = r.header(header::IF_NONE_MATCH, e);
        }
        r.body(Body::empty()).expect("request")
    };
    let r = send(&f.router, with("gzip, deflate, br", None)).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_ENCODING], "gzip");
    assert_eq!(r.headers()[header::VARY], "Accept-Encoding");
    let etag = r.headers()[header::ETAG].to_str().expect("etag").to_owned();
    assert_ne!(
        etag,
        assets::APP.etag(),
        "the gzip form is a representation of its own"
    );
    let body = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .expect("body");
    assert!(
        body.len() * 3 < assets::APP.body.len(),
        "{} bytes",
        body.len()
    );
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_string(&mut plain)
        .expect("gzip");
    assert_eq!(plain, assets::APP.body);
    let again = send(&f.router, with("gzip", Some(&etag))).await;
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    // The plain form's tag does not revalidate the gzip form, nor the other way round.
    let plain_tag = assets::APP.etag();
    assert_eq!(
        send(&f.router, with("gzip", Some(plain_tag)))
            .await
            .status(),
        StatusCode::OK
    );
    let refused = send(&f.router, with("gzip;q=0, identity", Some(&etag))).await;
    assert_eq!(refused.status(), StatusCode::OK);
    assert!(refused.headers().get(header::CONTENT_ENCODING).is_none());
}

#[test]
fn accept_encoding_is_read_as_http_says() {
    for yes in [
        "gzip",
        "GZIP",
        "deflate, gzip;q=0.5",
        "x-gzip",
        "*",
        "br;q=1, *;q=0.1",
    ] {
        assert!(assets::accepts_gzip(yes), "{yes}");
    }
    for no in [
        "",
        "identity",
        "br",
        "gzip;q=0",
        "gzip; q=0.0",
        "*;q=0",
        "gzipx",
        "gzip;q=0, *",
    ] {
        assert!(!assets::accepts_gzip(no), "{no}");
    }
}

#[test]
fn unsafe_requests_need_the_token_and_the_origin() {
    let active = Active {
        principal: "ops".into(),
        csrf: "c".repeat(64),
        tag: "t".into(),
    };
    let headers = |origin: Option<&str>, token: Option<&str>| {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example.test:8443"));
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).expect("v"));
        }
        if let Some(t) = token {
            h.insert(CSRF_HEADER, HeaderValue::from_str(t).expect("v"));
        }
        h
    };
    let good = "c".repeat(64);
    assert_eq!(
        Console::check_unsafe(
            &active,
            &headers(Some("https://example.test:8443"), Some(&good))
        ),
        Ok(())
    );
    assert_eq!(
        Console::check_unsafe(
            &active,
            &headers(Some("https://EXAMPLE.test:8443"), Some(&good))
        ),
        Ok(())
    );
    for (origin, token) in [
        (None, Some(good.as_str())),
        (Some("https://example.test"), Some(good.as_str())),
        (Some("https://example.test:8443.evil"), Some(good.as_str())),
        (Some("https://example.test:8443"), None),
        (Some("https://example.test:8443"), Some("c")),
    ] {
        assert!(
            Console::check_unsafe(&active, &headers(origin, token)).is_err(),
            "{origin:?} {token:?}"
        );
    }
}
