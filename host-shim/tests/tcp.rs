//! The daemon's optional TCP listener, driven with raw HTTP/1.1 over `127.0.0.1`: callers
//! there are identified by `Authorization: Bearer <token>` only (no header, a wrong token:
//! 403), a principal sees only its VMs, and the denied attempts are in the audit log.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use common::tls::{certificates, tls_get};
use serde_json::Value;

/// The token of the principal `remote`.
const TOKEN: &str = "s3cret";

/// A daemon (in a thread of this test) with two plain VMs, no agents, and a TCP listener.
struct Daemon {
    addr: SocketAddr,
    _daemon: common::InProcessDaemon,
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

impl Daemon {
    fn start(name: &str) -> Self {
        Self::start_with(name, "")
    }

    /// With `extra` (more tables) appended to `host.toml`.
    fn start_with(name: &str, extra: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let text = format!(
            r#"
[daemon]
socket = "{dir}/portless.sock"
state_dir = "{dir}/state"
tcp = "{addr}"

[[vm]]
name = "vm1"
channel = "plain"
path = "{dir}/vm1.region"

[[vm]]
name = "vm2"
channel = "plain"
path = "{dir}/vm2.region"

[[principal]]
name = "remote"
token_sha256 = "{hash}"
vms = ["vm1"]
audit = true
{extra}
"#,
            dir = dir.display(),
            hash = host_shim::http::policy::hash_token(TOKEN),
        );
        let config =
            host_shim::config::HostConfig::parse(&text, "host.toml").expect("valid host.toml");
        let daemon =
            common::InProcessDaemon::start(config, move || TcpStream::connect(addr).is_ok());
        Self {
            addr,
            _daemon: daemon,
        }
    }

    /// One request with the given extra header lines, through the API crate's client over
    /// TCP; the status and the body.
    fn raw(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, Vec<u8>) {
        let client =
            portless_api::blocking::Client::at(portless_api::Endpoint::Tcp(self.addr.to_string()))
                .expect("client");
        common::raw(&client, method, path, headers, Some(body)).expect("answer")
    }

    fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let auth = token.map(|t| format!("Authorization: Bearer {t}"));
        let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
        let (status, body) = self.raw("GET", path, &headers, b"");
        let v = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        (status, v)
    }
}

/// The audit entries of `action`, oldest first, as the token's principal reads them.
fn audit_of(d: &Daemon, action: &str) -> Vec<Value> {
    let (status, body) = d.get(
        &format!("/v1/audit?action={action}&order=oldest"),
        Some(TOKEN),
    );
    assert_eq!(status, 200, "{body}");
    body["entries"].as_array().expect("entries").clone()
}

#[test]
fn bearer_tokens_on_tcp() {
    let d = Daemon::start("tcp-bearer");

    // No token: the TCP listener has no peer credentials to fall back on.
    let (status, body) = d.get("/v1/vms", None);
    assert_eq!(status, 403, "{body}");
    let error = body["error"].as_str().expect("error message");
    assert!(error.contains("Bearer"), "{error}");

    // Another scheme, or `bearer` in lower case, is no token either.
    for header in [
        "Authorization: Basic czNjcmV0",
        "Authorization: bearer s3cret",
    ] {
        let (status, body) = d.raw("GET", "/v1/vms", &[header], b"");
        assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    }

    // A wrong token.
    let (status, body) = d.get("/v1/vms", Some("wrong"));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "no principal matches the bearer token");

    // The right token: only the principal's VMs.
    let (status, body) = d.get("/v1/vms", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let vms = body["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 1, "{body}");
    assert_eq!(vms[0]["name"], "vm1");
    assert_eq!(vms[0]["state"], "waiting_for_agent");
    assert_eq!(vms[0]["channel"], "plain");
    assert_eq!(vms[0]["running"], 0);

    // vm2 is not the principal's (denied before any agent is asked).
    let (status, body) = d.get("/v1/vms/vm2/commands", Some(TOKEN));
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["error"],
        "principal \"remote\" has no access to vm \"vm2\""
    );

    // The audit log holds every attempt, allowed or denied, without the token.
    let entries = audit_of(&d, "list_vms");
    assert_eq!(entries.len(), 5, "{entries:#?}");
    let denied: Vec<&Value> = entries.iter().filter(|e| e["allowed"] == false).collect();
    assert_eq!(denied.len(), 4, "{entries:#?}");
    for e in &denied {
        assert_eq!(e["principal"], Value::Null, "{e}");
        assert_eq!(e["target"], Value::Null, "{e}");
    }
    // Without a token the caller is named by its address; the reason mentions Bearer.
    for e in &denied[..3] {
        let caller = e["caller"].as_str().unwrap_or("");
        assert!(
            caller.starts_with("tcp 127.0.0.1:") && caller.ends_with("(no token)"),
            "{e}"
        );
        assert!(
            e["reason"].as_str().is_some_and(|r| r.contains("Bearer")),
            "{e}"
        );
    }
    // A wrong token is a token caller no principal matches.
    assert_eq!(denied[3]["caller"], "token");
    assert_eq!(denied[3]["reason"], "no principal matches the bearer token");
    let allowed = &entries[4];
    assert_eq!(allowed["allowed"], true);
    assert_eq!(allowed["caller"], "token");
    assert_eq!(allowed["principal"], "remote");
    assert_eq!(allowed["reason"], Value::Null);
    for e in &entries {
        assert!(
            !e.to_string().contains(TOKEN),
            "token in the audit log: {e}"
        );
    }
    let commands = audit_of(&d, "list_commands");
    assert_eq!(commands.len(), 1, "{commands:#?}");
    assert_eq!(commands[0]["allowed"], false);
    assert_eq!(commands[0]["caller"], "token");
    assert_eq!(commands[0]["principal"], "remote");
    assert_eq!(commands[0]["target"], "vm2");

    // The audit log itself needs a principal with `audit = true`.
    let (status, body) = d.get("/v1/audit", Some("wrong"));
    assert_eq!(status, 403, "{body}");
}

#[test]
fn a_flood_of_tokenless_requests_adds_a_bounded_number_of_audit_entries() {
    let d = Daemon::start_with(
        "tcp-flood",
        "[callers]\ndenied_per_peer = 5\ndenied_interval_s = 1\n",
    );
    for k in 0..500 {
        let path = if k % 2 == 0 {
            "/v1/vms"
        } else {
            "/v1/vms/vm1/ping"
        };
        let method = if k % 2 == 0 { "GET" } else { "POST" };
        let (status, _) = d.raw(method, path, &[], b"");
        assert_eq!(status, 403);
    }
    // The first five are entries of their own; the rest are counted, and their count is
    // written as one entry once the interval has ended.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let entries = loop {
        let entries: Vec<Value> = {
            let (status, body) = d.get("/v1/audit?allowed=false&order=oldest", Some(TOKEN));
            assert_eq!(status, 200, "{body}");
            body["entries"].as_array().expect("entries").clone()
        };
        if entries.len() > 5 || std::time::Instant::now() > deadline {
            break entries;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(entries.len(), 6, "{entries:#?}");
    assert!(entries[..5].iter().all(|e| e["count"] == 1), "{entries:#?}");
    let summary = &entries[5];
    assert_eq!(summary["count"], 495, "{summary}");
    assert_eq!(summary["action"], "(various)", "{summary}");
    assert!(
        summary["reason"]
            .as_str()
            .is_some_and(|r| r.contains("495 denied calls from tcp 127.0.0.1")),
        "{summary}"
    );
    let total: u64 = entries
        .iter()
        .map(|e| e["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(total, 500, "every call is accounted for");
}

#[test]
fn tls_clients_that_trust_the_ca_are_served_and_plaintext_clients_are_refused() {
    let dir = fresh_dir("tcp-tls");
    let ca = certificates(&dir);
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let text = format!(
        "[daemon]\nsocket = \"{d}/portless.sock\"\nstate_dir = \"{d}/state\"\ntcp = \"{addr}\"\n\
         tls_cert = \"{d}/cert.pem\"\ntls_key = \"{d}/key.pem\"\n\n\
         [[vm]]\nname = \"vm1\"\nchannel = \"plain\"\npath = \"{d}/vm1.region\"\n\n\
         [[principal]]\nname = \"remote\"\ntoken_sha256 = \"{hash}\"\nvms = [\"vm1\"]\n",
        d = dir.display(),
        hash = host_shim::http::policy::hash_token(TOKEN),
    );
    let config = host_shim::config::HostConfig::parse(&text, "host.toml").expect("host.toml");
    let _daemon = common::InProcessDaemon::start(config, move || TcpStream::connect(addr).is_ok());

    // A client that trusts the CA: served, identified by its token.
    let (status, body) = tls_get(addr, &ca, "/v1/vms", TOKEN).expect("TLS answer");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"vm1\""), "{body}");
    let (status, _) = tls_get(addr, &ca, "/v1/vms", "wrong").expect("TLS answer");
    assert_eq!(status, 403);

    // A client that trusts another CA does not get through the handshake.
    let other = certificates(&fresh_dir("tcp-tls-other"));
    let err = tls_get(addr, &other, "/v1/vms", TOKEN).expect_err("served an untrusted chain");
    assert!(
        err.contains("UnknownIssuer") || err.contains("certificate"),
        "{err}"
    );

    // Plain HTTP gets no HTTP answer: the listener speaks TLS only.
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // The listener may drop the connection before it has read all of the request (it is no
    // TLS handshake): a failed write is a refusal too.
    let request = format!(
        "GET /v1/vms HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
         Connection: close\r\n\r\n"
    );
    let _ = s.write_all(request.as_bytes());
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "answered in plain text: {:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        !String::from_utf8_lossy(&answer).contains("vm1"),
        "leaked data in plain text"
    );
}

/// A fresh directory for this test run.
fn fresh_dir(name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    dir
}
