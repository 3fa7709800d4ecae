//! Who may see and stop whose executions: a principal allowed on a VM reads and cancels its
//! own executions there; another principal's need `read_all` / `cancel_all`. Without the
//! right the execution does not exist for the caller (404, and it is not listed), and the
//! audit log records the denial with its reason; with it, the allowed call is audited as
//! such.

mod common;

use std::time::Duration;

use common::stack::Stack;
use serde_json::{Value, json};

const PEER: &str = "peer-token";
const LEAD: &str = "lead-token";

fn principals() -> String {
    format!(
        "\n[[principal]]\nname = \"peer\"\ntoken_sha256 = \"{}\"\nvms = [\"*\"]\ncommands = [\"*\"]\n\
         \n[[principal]]\nname = \"lead\"\ntoken_sha256 = \"{}\"\nvms = [\"*\"]\ncommands = [\"*\"]\n\
         read_all = true\ncancel_all = true\n",
        host_shim::http::policy::hash_token(PEER),
        host_shim::http::policy::hash_token(LEAD),
    )
}

/// A call as the principal of `token`.
fn call_as(s: &Stack, token: &str, method: &str, path: &str) -> (u16, Value) {
    call_with(s, token, method, path, None)
}

/// A call with a JSON body as the principal of `token`.
fn call_with(
    s: &Stack,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let auth = format!("Authorization: Bearer {token}");
    let body = body.map(|b| b.to_string().into_bytes());
    let (status, body) =
        common::try_http_with(&s.socket, method, path, &[&auth], body.as_deref()).expect("answer");
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, v)
}

#[test]
fn another_principals_executions_need_read_all_and_cancel_all() {
    let mut s = Stack::new("rights", &["vm1"], &principals());
    s.start_daemon();
    s.start_agent("vm1");
    s.wait_ready("vm1", Duration::from_secs(15));
    // `ops` (by its uid) starts two executions.
    let (status, body) = s.call(
        "POST",
        "/v1/exec",
        Some(json!({"target": "vm1", "command": "sleep", "args": ["30"]})),
    );
    assert_eq!(status, 200, "{body}");
    let sleeping = body["executions"][0]["id"].as_u64().expect("id");
    let (_, body) = s.exec("vm1", "echo", &["mine"]);
    let done = body["executions"][0]["id"].as_u64().expect("id");
    s.wait(done, 10_000);

    // `peer` sees neither: reading, its output, waiting, following and cancelling are all
    // "no such execution"; its listing is empty.
    for path in [
        format!("/v1/executions/{done}"),
        format!("/v1/executions/{done}/output"),
        format!("/v1/executions/{done}/wait?timeout_ms=10"),
        format!("/v1/executions/{done}/follow"),
    ] {
        let (status, body) = call_as(&s, PEER, "GET", &path);
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["error"], format!("no execution {done}"), "{path}");
    }
    let (status, body) = call_as(
        &s,
        PEER,
        "POST",
        &format!("/v1/executions/{sleeping}/cancel"),
    );
    assert_eq!(status, 404, "{body}");
    let (status, list) = call_as(&s, PEER, "GET", "/v1/executions");
    assert_eq!(status, 200);
    assert_eq!(list["executions"], json!([]), "{list}");
    let (_, rec) = s.call("GET", &format!("/v1/executions/{sleeping}"), None);
    assert_eq!(rec["state"], "running", "the denied cancel changed nothing");

    // Its own executions it reads, and lists, as ever.
    let (status, body) = call_with(
        &s,
        PEER,
        "POST",
        "/v1/exec",
        Some(json!({"target": "vm1", "command": "echo", "args": ["theirs"]})),
    );
    assert_eq!(status, 200, "{body}");
    let own = body["executions"][0]["id"].as_u64().expect("id");
    let (status, rec) = call_as(&s, PEER, "GET", &format!("/v1/executions/{own}/wait"));
    assert_eq!(
        (status, rec["principal"].as_str()),
        (200, Some("peer")),
        "{rec}"
    );
    let (_, list) = call_as(&s, PEER, "GET", "/v1/executions");
    assert_eq!(
        list["executions"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );

    // `lead` has both rights: it reads ops's executions and cancels them.
    let (status, rec) = call_as(&s, LEAD, "GET", &format!("/v1/executions/{done}"));
    assert_eq!(status, 200, "{rec}");
    assert_eq!(rec["principal"], "ops");
    let (status, list) = call_as(&s, LEAD, "GET", "/v1/executions");
    assert_eq!(status, 200);
    assert_eq!(
        list["executions"].as_array().map(Vec::len),
        Some(3),
        "{list}"
    );
    let (status, body) = call_as(
        &s,
        LEAD,
        "POST",
        &format!("/v1/executions/{sleeping}/cancel"),
    );
    assert_eq!(status, 202, "{body}");
    assert_eq!(s.wait(sleeping, 10_000)["state"], "cancelled");

    // The audit log has each denial, with why, and the allowed reads noted as such.
    let (_, audit) = s.call("GET", "/v1/audit?order=oldest&limit=1000", None);
    let entries = audit["entries"].as_array().expect("entries");
    let of = |principal: &str, action: &str| -> Vec<&Value> {
        entries
            .iter()
            .filter(|e| e["principal"] == principal && e["action"] == action)
            .collect()
    };
    let denied_reads: Vec<&Value> = of("peer", "read_execution")
        .into_iter()
        .filter(|e| e["allowed"] == false)
        .collect();
    assert_eq!(denied_reads.len(), 4, "{denied_reads:?}");
    for e in &denied_reads {
        assert_eq!(e["allowed"], false);
        assert!(
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("needs read_all")),
            "{e}"
        );
    }
    let denied_cancel = of("peer", "cancel");
    assert_eq!(denied_cancel.len(), 1);
    assert!(
        denied_cancel[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("needs cancel_all")),
        "{}",
        denied_cancel[0]
    );
    let lead_read = of("lead", "read_execution");
    assert!(
        lead_read[0]["allowed"] == true
            && lead_read[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("read_all")),
        "{:?}",
        lead_read
    );
    let lead_cancel = of("lead", "cancel");
    assert!(
        lead_cancel[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cancel_all")),
        "{:?}",
        lead_cancel
    );
}

#[test]
fn exec_identifies_the_caller_before_it_resolves_the_target() {
    let mut s = Stack::new("rights-identify", &["vm1"], &principals());
    s.start_daemon();
    // A caller no principal matches learns nothing of the VMs: the same refusal whether the
    // target exists or not, and each attempt is in the audit log.
    for target in ["nosuch", "role=secret", "vm1", "bad target!"] {
        let (status, body) = call_with(
            &s,
            "wrong-token",
            "POST",
            "/v1/exec",
            Some(json!({"target": target, "command": "echo", "args": ["x"]})),
        );
        assert_eq!(status, 403, "{target}: {body}");
        let error = body["error"].as_str().unwrap_or("");
        assert!(
            !error.contains("vm") && !error.contains("label") && !error.contains("target"),
            "{target}: {error}"
        );
    }
    // An identified caller is told what is wrong with its target, and that is audited too.
    let (status, body) = call_with(
        &s,
        PEER,
        "POST",
        "/v1/exec",
        Some(json!({"target": "nosuch", "command": "echo", "args": ["x"]})),
    );
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown vm")),
        "{body}"
    );
    let (_, audit) = s.call("GET", "/v1/audit?action=exec&order=oldest", None);
    let entries = audit["entries"].as_array().expect("entries");
    let targets: Vec<(&str, bool, bool)> = entries
        .iter()
        .map(|e| {
            (
                e["target"].as_str().unwrap_or(""),
                e["principal"].is_null(),
                e["allowed"] == true,
            )
        })
        .collect();
    assert_eq!(
        targets,
        [
            ("nosuch", true, false),
            ("role=secret", true, false),
            ("vm1", true, false),
            ("bad target!", true, false),
            ("nosuch", false, false),
        ],
        "{entries:?}"
    );
}
