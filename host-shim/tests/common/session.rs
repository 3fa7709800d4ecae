//! A browser's side of a console without a browser: the session cookie, and the server it
//! talks to (for the tests of the console's sessions on a daemon and on a control plane).

use portless_api::blocking::Client;
use serde_json::Value;

/// A logged-in console session.
pub struct Session {
    /// A client of the server the session talks to.
    pub client: Client,
    /// That server's origin, `http://host:port`.
    pub origin: String,
    /// The cookie, `portless_session=...`.
    pub cookie: String,
}

impl Session {
    /// One request with the cookie and `extra` headers: the status and the JSON answer
    /// (`Null` when it is not JSON).
    pub fn send(
        &self,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        body: &str,
    ) -> (u16, Value) {
        let mut headers = vec![("cookie", self.cookie.as_str())];
        headers.extend_from_slice(extra);
        let r = self
            .client
            .raw(method, path, &headers, body.as_bytes().to_vec())
            .expect("request");
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    /// The CSRF token the shell page carries.
    pub fn csrf(&self) -> String {
        let r = self
            .client
            .raw("GET", "/console/", &[("cookie", &self.cookie)], Vec::new())
            .expect("shell");
        assert_eq!(r.status, 200);
        let page = String::from_utf8_lossy(&r.body).into_owned();
        let at = page
            .find("name=\"portless-csrf\" content=\"")
            .expect("csrf meta")
            + 30;
        page[at..at + 64].to_owned()
    }
}
