//! `openapi.json` against the crate's types: a value of every request and answer type, with
//! every optional field set (and again with every one unset), serialized, must match the
//! schema the document gives it, field for field: each property the schema declares is
//! present, nothing it does not declare is, and every type, enum, constant, bound and array
//! length agrees. Every JSON answer and request body of every route, the daemon's and the
//! control plane's, must be covered by a type, and each enum of the document must list
//! exactly the type's variants. So a field added, removed or renamed on either side fails
//! here until the other follows. (That the document lists exactly the routes of each server
//! is `host-shim`'s `tests/openapi.rs`.)

use std::collections::{BTreeMap, BTreeSet};

use portless_api::{
    AgentCounters, AuditEntry, AuditLog, AuditRecord, CancelResponse, CommandInfo, CommandList,
    ConsoleCode, CutOff, DaemonState, Dispatched, ErrorBody, ExecRequest, ExecResponse, ExecState,
    ExecutionId, ExecutionList, ExecutionRecord, FleetCommand, FleetPush, FollowLine, HostInfo,
    HostList, Invocation, Limit, Metrics, MetricsResponse, OPENAPI, Param, PingResponse,
    ProgramInfo, PushOutcome, PushResponse, Rights, Stream, StreamEvent, StreamTotals, VmInfo,
    VmList, VmState, Whoami,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn document() -> Value {
    serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
}

/// The schema a `$ref` points to (`#/components/schemas/X`).
fn resolve<'d>(doc: &'d Value, reference: &str) -> &'d Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("a non-local $ref: {reference}"));
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("$ref {reference} resolves to nothing"))
}

/// The JSON type names `value` satisfies (an integer is a number too).
fn json_types(value: &Value) -> &'static [&'static str] {
    match value {
        Value::Null => &["null"],
        Value::Bool(_) => &["boolean"],
        Value::Number(n) if n.is_u64() || n.is_i64() => &["integer", "number"],
        Value::Number(_) => &["number"],
        Value::String(_) => &["string"],
        Value::Array(_) => &["array"],
        Value::Object(_) => &["object"],
    }
}

/// What is wrong with `value` as an instance of `schema`, each problem with its place.
/// `strict`: every declared property must be present (the value has every field set).
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, strict: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        problems.extend(check(doc, resolve(doc, reference), value, at, strict));
    }
    if let Some(options) = schema.get("oneOf").and_then(Value::as_array) {
        let matching: Vec<Vec<String>> = options
            .iter()
            .map(|o| check(doc, o, value, at, strict))
            .collect();
        let ok = matching.iter().filter(|p| p.is_empty()).count();
        if ok != 1 {
            problems.push(format!(
                "{at}: matches {ok} of the {} oneOf schemas: {matching:?}",
                options.len()
            ));
        }
    }
    if let Some(ty) = schema.get("type") {
        let allowed: Vec<&str> = match ty {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            other => panic!("{at}: a type that is neither a string nor a list: {other}"),
        };
        if !json_types(value).iter().any(|t| allowed.contains(t)) {
            problems.push(format!("{at}: {value} is not of type {ty}"));
            return problems;
        }
    }
    if let Some(constant) = schema.get("const")
        && constant != value
    {
        problems.push(format!("{at}: {value} is not the constant {constant}"));
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array)
        && !options.contains(value)
    {
        problems.push(format!("{at}: {value} is not one of {options:?}"));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            problems.push(format!("{at}: {n} is below the minimum {min}"));
        }
        if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            problems.push(format!("{at}: {n} is above the maximum {max}"));
        }
    }
    if let Some(items) = value.as_array() {
        let len = items.len() as u64;
        if schema
            .get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| len < m)
        {
            problems.push(format!("{at}: {len} items, fewer than minItems"));
        }
        if schema
            .get("maxItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| len > m)
        {
            problems.push(format!("{at}: {len} items, more than maxItems"));
        }
        if let Some(item) = schema.get("items") {
            for (i, v) in items.iter().enumerate() {
                problems.extend(check(doc, item, v, &format!("{at}[{i}]"), strict));
            }
        }
    }
    if let Some(object) = value.as_object() {
        let declared = schema.get("properties").and_then(Value::as_object);
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !object.contains_key(name) {
                problems.push(format!("{at}: required property {name:?} is missing"));
            }
        }
        if strict && let Some(declared) = declared {
            for name in declared.keys() {
                if !object.contains_key(name) {
                    problems.push(format!(
                        "{at}: declared property {name:?} is not in the type's JSON"
                    ));
                }
            }
        }
        for (name, v) in object {
            let place = format!("{at}.{name}");
            match declared.and_then(|d| d.get(name)) {
                Some(s) => problems.extend(check(doc, s, v, &place, strict)),
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        problems.push(format!("{place}: a property the schema does not declare"))
                    }
                    Some(s @ Value::Object(_)) => problems.extend(check(doc, s, v, &place, strict)),
                    _ if declared.is_some() && schema.get("oneOf").is_none() => {
                        problems.push(format!("{place}: a property the schema does not declare"))
                    }
                    _ => {}
                },
            }
        }
    }
    problems
}

/// A value of a type, as JSON, and whether every optional field of it is set.
struct Sample {
    what: &'static str,
    json: Value,
    full: bool,
}

/// `value` serialized; it must also read back as itself.
fn sample<T>(what: &'static str, value: &T, full: bool) -> Sample
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_value(value).expect("serializes");
    let back: T = serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("{what}: its own JSON does not read back: {e}"));
    assert_eq!(&back, value, "{what}: a round trip through JSON changes it");
    Sample { what, json, full }
}

fn record(full: bool) -> ExecutionRecord {
    let some = |n: u64| full.then_some(n);
    ExecutionRecord {
        id: ExecutionId(42),
        principal: "ops".into(),
        vm: "web1".into(),
        command: "uname".into(),
        args: vec!["-a".into()],
        state: if full {
            ExecState::Succeeded
        } else {
            ExecState::Pending
        },
        requested_at_ms: 1_764_633_600_000,
        started_at_ms: some(1_764_633_600_010),
        finished_at_ms: some(1_764_633_600_020),
        duration_ms: some(10),
        exit_code: full.then_some(0),
        signal: full.then_some(9),
        detail: full.then(|| "exited".into()),
        agent_generation: full.then_some(3),
        agent_counter: full.then_some(7),
        output_cap: 16 << 20,
        stdout: StreamTotals::new(5, 5),
        stderr: StreamTotals::new(2, 9),
    }
}

fn vm(full: bool) -> VmInfo {
    VmInfo {
        name: "web1".into(),
        labels: BTreeMap::from([("role".into(), "web".into())]),
        channel: "doorbell".into(),
        state: if full {
            VmState::Ready
        } else {
            VmState::CutOff
        },
        agent_generation: full.then_some(2),
        agent_software: full.then(|| "portless-agent 0.1.0".into()),
        config_revision: full.then_some(5),
        heartbeat_age_ms: full.then_some(120),
        agent_restarts: 1,
        running: 2,
        cutoffs: 1,
        last_cutoff: full.then(|| CutOff {
            at_ms: 1_764_633_600_000,
            budget: "queued_bytes".into(),
            detail: "the guest did not read".into(),
        }),
        violations: 3,
    }
}

fn commands() -> CommandList {
    CommandList {
        vm: "web1".into(),
        age_ms: 800,
        config_revision: 5,
        commands: vec![CommandInfo {
            name: "restart".into(),
            description: "restart a service".into(),
            params: vec![
                Param::Integer {
                    name: "n".into(),
                    min: -1,
                    max: 10,
                },
                Param::Choice {
                    name: "unit".into(),
                    choices: vec!["nginx".into(), "app".into()],
                },
                Param::String {
                    name: "note".into(),
                    charset: "alnum".into(),
                    min_len: 0,
                    max_len: 32,
                },
            ],
            timeout_ms: 30_000,
            max_output: 1 << 20,
        }],
    }
}

fn metrics() -> MetricsResponse {
    MetricsResponse {
        vm: "web1".into(),
        metrics: Metrics {
            uptime_ms: 60_000,
            load_milli: vec![10, 20, 30],
            mem_total_kib: 1 << 20,
            mem_available_kib: 1 << 19,
            processes: 80,
            agent_rss_kib: 900,
            agent: AgentCounters {
                frames_in: 1,
                frames_out: 2,
                output_bytes: 3,
                executions: 4,
                rejections: 5,
                running: 6,
                resets: 7,
            },
        },
    }
}

fn audit_record(full: bool) -> AuditRecord {
    AuditRecord {
        id: 9,
        entry: AuditEntry {
            at_ms: 1_764_633_600_000,
            principal: full.then(|| "ops".into()),
            caller: "uid=1000 gid=1000".into(),
            action: "exec".into(),
            target: full.then(|| "web1:uname".into()),
            allowed: full,
            reason: full.then(|| "no rule allows it".into()),
            count: 1,
        },
    }
}

fn host(full: bool) -> HostInfo {
    HostInfo {
        name: "rack4-node17".into(),
        labels: if full {
            BTreeMap::from([("zone".into(), "eu-1".into())])
        } else {
            BTreeMap::new()
        },
        online: full,
        heartbeat_age_ms: 1_500,
        software: "portless 0.1.0".into(),
        vms: 3,
        boots: 2,
    }
}

fn fleet_command(full: bool) -> FleetCommand {
    let invocation = |vm: &str, id: u64, state: ExecState| Invocation {
        vm: vm.into(),
        id: ExecutionId(id),
        state,
    };
    FleetCommand {
        id: 7,
        principal: "ops".into(),
        target: "role=web".into(),
        command: "restart".into(),
        args: if full {
            vec!["nginx".into()]
        } else {
            Vec::new()
        },
        created_at_ms: 1_764_633_600_000,
        max_concurrency: full.then_some(Limit::Count(2)),
        max_errors: full.then_some(Limit::Count(0)),
        active: 1,
        errors: 1,
        invocations: vec![
            invocation("host1/web1", 42, ExecState::Running),
            invocation("host2/web1", 43, ExecState::Failed),
        ],
        states: BTreeMap::from([("running".into(), 1), ("failed".into(), 1)]),
    }
}

/// The answer of a control plane to an exec or a push: one invocation per VM, and its
/// command.
fn fleet_answer() -> ExecResponse {
    ExecResponse {
        executions: vec![
            Dispatched {
                vm: "host1/web1".into(),
                id: Some(ExecutionId(42)),
                state: ExecState::Pending,
                error: None,
            },
            Dispatched {
                vm: "host2/web1".into(),
                id: Some(ExecutionId(43)),
                state: ExecState::Delayed,
                error: None,
            },
        ],
        skipped: Vec::new(),
        command: Some(7),
    }
}

/// The samples of each success answer with a JSON (or NDJSON) body, by route.
fn answers() -> BTreeMap<(&'static str, &'static str, &'static str), Vec<Sample>> {
    let exec = |full: bool| ExecResponse {
        executions: vec![Dispatched {
            vm: "web1".into(),
            id: full.then_some(ExecutionId(42)),
            state: if full {
                ExecState::Running
            } else {
                ExecState::Rejected
            },
            error: (!full).then(|| "rejected by the agent: UnknownCommand".into()),
        }],
        skipped: vec!["web2".into()],
        command: full.then_some(7),
    };
    let push = |full: bool| PushResponse {
        vm: "web1".into(),
        name: "patch.sh".into(),
        size: 120,
        sha256: "ab".repeat(32),
        outcome: if full {
            PushOutcome::Started
        } else {
            PushOutcome::Failed
        },
        execution: full.then_some(ExecutionId(43)),
        error: (!full).then(|| "HashMismatch".into()),
    };
    let daemon = DaemonState {
        version: "0.1.0".into(),
        started_at_ms: 1_764_633_600_000,
        vms: 4,
        follows_open: 2,
        follows: BTreeMap::from([("ops".into(), 2)]),
        follows_per_principal: 16,
        pushes_in_flight: 1,
        pushes_limit: 4,
        denied_peers: 0,
    };
    BTreeMap::from([
        (
            ("get", "/v1/vms", "200"),
            vec![
                sample(
                    "VmList",
                    &VmList {
                        vms: vec![vm(true)],
                    },
                    true,
                ),
                sample(
                    "VmList",
                    &VmList {
                        vms: vec![vm(false)],
                    },
                    false,
                ),
            ],
        ),
        (
            ("get", "/v1/vms/{vm}/commands", "200"),
            vec![sample("CommandList", &commands(), true)],
        ),
        (
            ("post", "/v1/vms/{vm}/ping", "200"),
            vec![sample(
                "PingResponse",
                &PingResponse {
                    vm: "web1".into(),
                    rtt_us: 180,
                },
                true,
            )],
        ),
        (
            ("get", "/v1/vms/{vm}/metrics", "200"),
            vec![sample("MetricsResponse", &metrics(), true)],
        ),
        (
            ("post", "/v1/vms/{vm}/push", "200"),
            vec![
                sample("PushResponse", &push(true), true),
                sample("PushResponse", &push(false), false),
            ],
        ),
        (
            ("post", "/v1/exec", "200"),
            vec![
                sample("ExecResponse", &exec(true), true),
                sample("ExecResponse", &exec(false), false),
                sample("ExecResponse", &fleet_answer(), true),
            ],
        ),
        (
            ("get", "/v1/hosts", "200"),
            vec![
                sample(
                    "HostList",
                    &HostList {
                        hosts: vec![host(true), host(false)],
                    },
                    true,
                ),
                sample("HostList", &HostList::default(), true),
            ],
        ),
        (
            ("post", "/v1/programs", "201"),
            vec![sample(
                "ProgramInfo",
                &ProgramInfo {
                    sha256: "ab".repeat(32),
                    size: 120,
                },
                true,
            )],
        ),
        (
            ("post", "/v1/push", "200"),
            vec![sample("ExecResponse", &fleet_answer(), true)],
        ),
        (
            ("get", "/v1/commands/{id}", "200"),
            vec![
                sample("FleetCommand", &fleet_command(true), true),
                sample("FleetCommand", &fleet_command(false), false),
            ],
        ),
        (
            ("get", "/v1/executions", "200"),
            vec![sample(
                "ExecutionList",
                &ExecutionList {
                    executions: vec![record(true), record(false)],
                },
                true,
            )],
        ),
        (
            ("get", "/v1/executions/{id}", "200"),
            vec![
                sample("ExecutionRecord", &record(true), true),
                sample("ExecutionRecord", &record(false), false),
            ],
        ),
        (
            ("get", "/v1/executions/{id}/wait", "200"),
            vec![sample("ExecutionRecord", &record(true), true)],
        ),
        (
            ("get", "/v1/executions/{id}/follow", "200"),
            vec![
                sample(
                    "FollowLine",
                    &FollowLine::output(Stream::Stderr, 5, b"hello"),
                    true,
                ),
                sample("FollowLine", &FollowLine::end(record(true)), true),
            ],
        ),
        (
            ("post", "/v1/executions/{id}/cancel", "202"),
            vec![sample(
                "CancelResponse",
                &CancelResponse {
                    id: ExecutionId(42),
                    state: ExecState::Running,
                },
                true,
            )],
        ),
        (
            ("get", "/v1/audit", "200"),
            vec![
                sample(
                    "AuditLog",
                    &AuditLog {
                        entries: vec![audit_record(true)],
                    },
                    true,
                ),
                sample(
                    "AuditLog",
                    &AuditLog {
                        entries: vec![audit_record(false)],
                    },
                    false,
                ),
            ],
        ),
        (
            ("get", "/v1/daemon", "200"),
            vec![sample("DaemonState", &daemon, true)],
        ),
        (
            ("get", "/v1/whoami", "200"),
            vec![sample(
                "Whoami",
                &Whoami {
                    principal: "ops".into(),
                    caller: "console session 1a2b3c4d".into(),
                    rights: Rights {
                        push: true,
                        audit: false,
                        read_all: true,
                        cancel_all: false,
                    },
                    fleet: false,
                },
                true,
            )],
        ),
        (
            ("post", "/v1/console/codes", "201"),
            vec![sample(
                "ConsoleCode",
                &ConsoleCode {
                    url: "http://127.0.0.1:7434/console/login?code=ab".into(),
                    code: "ab".into(),
                    expires_at_ms: 1_764_633_600_000,
                },
                true,
            )],
        ),
    ])
}

/// A response object, through `#/components/responses` if it is a reference.
fn response<'d>(doc: &'d Value, r: &'d Value) -> &'d Value {
    match r.get("$ref").and_then(Value::as_str) {
        Some(reference) => resolve(doc, reference),
        None => r,
    }
}

/// Every (method, path, status, media type, schema) of the document's answers.
fn documented_answers(doc: &Value) -> Vec<(String, String, String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let Some(responses) = op.get("responses").and_then(Value::as_object) else {
                continue;
            };
            for (status, r) in responses {
                let content = response(doc, r).get("content").and_then(Value::as_object);
                for (media, c) in content.into_iter().flatten() {
                    out.push((
                        method.clone(),
                        path.clone(),
                        status.clone(),
                        media.clone(),
                        c["schema"].clone(),
                    ));
                }
            }
        }
    }
    out
}

#[test]
fn every_answer_matches_its_schema() {
    let doc = document();
    let mut samples: BTreeMap<(String, String, String), Vec<Sample>> = answers()
        .into_iter()
        .map(|((m, p, s), v)| ((m.to_owned(), p.to_owned(), s.to_owned()), v))
        .collect();
    let error = sample(
        "ErrorBody",
        &ErrorBody {
            error: "no vm named \"web9\"".into(),
        },
        true,
    );
    let mut problems = Vec::new();
    let mut covered = BTreeSet::new();
    for (method, path, status, media, schema) in documented_answers(&doc) {
        let at = format!("{} {path} {status} ({media})", method.to_uppercase());
        if !status.starts_with('2') {
            // Every error answer is the error body.
            if media == "application/json" {
                problems.extend(check(&doc, &schema, &error.json, &at, true));
            }
            continue;
        }
        if !media.contains("json") {
            continue;
        }
        let key = (method.clone(), path.clone(), status.clone());
        let Some((key, list)) = samples.remove_entry(&key) else {
            problems.push(format!("{at}: no type of the crate is checked against it"));
            continue;
        };
        covered.insert(key);
        for s in list {
            problems.extend(check(
                &doc,
                &schema,
                &s.json,
                &format!("{at} as {}", s.what),
                s.full,
            ));
        }
    }
    for key in samples.keys() {
        problems.push(format!(
            "{key:?}: a sample for an answer the document lacks"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        covered.len() >= 17,
        "only {} answers checked",
        covered.len()
    );
}

/// The data of the event stream's events: `vm`, `execution` and `end` are the `Vm` and
/// `ExecutionRecord` schemas, `output` is `OutputEvent`.
/// The JSON of an event's `data:` line as the daemon sends it.
fn sse_data(event: &StreamEvent) -> Value {
    let sse = event.to_sse(None);
    let data = sse
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    serde_json::from_str(data).expect("JSON")
}

#[test]
fn the_event_stream_data_matches_its_schemas() {
    let doc = document();
    let schema = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let mut problems = Vec::new();
    let output = StreamEvent::Output {
        execution: ExecutionId(42),
        stream: Stream::Stderr,
        offset: 7,
        data: b"hello".to_vec(),
    };
    problems.extend(check(
        &doc,
        &schema("OutputEvent"),
        &sse_data(&output),
        "output event",
        true,
    ));
    for full in [true, false] {
        for (event, name, what) in [
            (
                StreamEvent::End(Box::new(record(full))),
                "ExecutionRecord",
                "end event",
            ),
            (
                StreamEvent::Execution(Box::new(record(full))),
                "ExecutionRecord",
                "execution event",
            ),
            (StreamEvent::Vm(Box::new(vm(full))), "Vm", "vm event"),
        ] {
            problems.extend(check(&doc, &schema(name), &sse_data(&event), what, full));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The samples of each JSON request body, by route.
fn bodies() -> BTreeMap<(&'static str, &'static str), Vec<Sample>> {
    let exec = |full: bool| ExecRequest {
        target: if full { "role=web" } else { "web1" }.into(),
        command: "uname".into(),
        args: if full { vec!["-a".into()] } else { Vec::new() },
        timeout_ms: full.then_some(5000),
        max_concurrency: full.then_some(Limit::Count(2)),
        max_errors: full.then_some(Limit::Percent(10)),
        idempotency_key: full.then(|| "deploy-1".into()),
    };
    let push = |full: bool| FleetPush {
        target: if full { "host1/*,role=web" } else { "*" }.into(),
        name: "fix.sh".into(),
        sha256: "ab".repeat(32),
        run: full,
        timeout_ms: full.then_some(5000),
        max_concurrency: full.then_some(Limit::Percent(25)),
        max_errors: full.then_some(Limit::Count(1)),
        idempotency_key: full.then(|| "fix-1".into()),
    };
    BTreeMap::from([
        (
            ("post", "/v1/exec"),
            vec![
                sample("ExecRequest", &exec(true), true),
                sample("ExecRequest", &exec(false), false),
            ],
        ),
        (
            ("post", "/v1/push"),
            vec![
                sample("FleetPush", &push(true), true),
                sample("FleetPush", &push(false), false),
            ],
        ),
    ])
}

#[test]
fn every_request_body_matches_its_schema() {
    let doc = document();
    let mut samples = bodies();
    let mut problems = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let content = op["requestBody"]["content"].as_object();
            for (media, c) in content.into_iter().flatten() {
                if !media.contains("json") {
                    continue;
                }
                let at = format!("{} {path} body ({media})", method.to_uppercase());
                let Some(list) = samples.remove(&(method.as_str(), path.as_str())) else {
                    problems.push(format!("{at}: no type of the crate is checked against it"));
                    continue;
                };
                for s in list {
                    let place = format!("{at} as {}", s.what);
                    problems.extend(check(&doc, &c["schema"], &s.json, &place, s.full));
                }
            }
        }
    }
    for key in samples.keys() {
        problems.push(format!("{key:?}: a sample for a body the document lacks"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_bodies_read_what_their_schemas_allow() {
    // What the schema allows, the type reads: absent fields and zero fractions.
    let minimal: ExecRequest =
        serde_json::from_str(r#"{"target":"web1","command":"uname","timeout_ms":5000.0}"#)
            .expect("a minimal body");
    assert_eq!((minimal.args.len(), minimal.timeout_ms), (0, Some(5000)));
    assert!(
        serde_json::from_str::<ExecRequest>(r#"{"target":"a","command":"b","timeout_ms":1.5}"#)
            .is_err()
    );
    let minimal: FleetPush =
        serde_json::from_str(r#"{"target":"*","name":"fix.sh","sha256":"ab","extra":1}"#)
            .expect("a minimal push");
    assert_eq!(
        (minimal.run, minimal.timeout_ms, minimal.idempotency_key),
        (false, None, None)
    );
}

/// The strings of the enum at `pointer` in the document.
fn enum_at(doc: &Value, pointer: &str) -> BTreeSet<String> {
    doc.pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no enum at {pointer}"))
        .iter()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

fn names<T: Serialize>(values: &[T]) -> BTreeSet<String> {
    values
        .iter()
        .map(|v| match serde_json::to_value(v).expect("serializes") {
            Value::String(s) => s,
            other => panic!("{other} is not a string"),
        })
        .collect()
}

#[test]
fn enums_list_exactly_the_variants() {
    let doc = document();
    assert_eq!(
        enum_at(&doc, "/components/schemas/ExecState/enum"),
        names(&ExecState::ALL)
    );
    assert_eq!(
        enum_at(&doc, "/components/schemas/VmState/enum"),
        names(&[
            VmState::WaitingForAgent,
            VmState::Ready,
            VmState::Unresponsive,
            VmState::CutOff,
            VmState::HostOffline
        ])
    );
    assert_eq!(
        enum_at(
            &doc,
            "/components/schemas/PushResponse/properties/outcome/enum"
        ),
        names(&[
            PushOutcome::Stored,
            PushOutcome::Started,
            PushOutcome::Failed
        ])
    );
    assert_eq!(
        enum_at(
            &doc,
            "/components/schemas/OutputLine/properties/stream/enum"
        ),
        names(&[Stream::Stdout, Stream::Stderr])
    );
    // The parameter kinds: one schema per kind the daemon sends.
    let kinds: BTreeSet<String> = doc["components"]["schemas"]["ParamDesc"]["oneOf"]
        .as_array()
        .expect("ParamDesc is a oneOf")
        .iter()
        .map(|r| {
            let s = resolve(&doc, r["$ref"].as_str().expect("a $ref"));
            s["properties"]["kind"]["const"]
                .as_str()
                .expect("a kind constant")
                .to_owned()
        })
        .collect();
    let sent: BTreeSet<String> = commands().commands[0]
        .params
        .iter()
        .map(|p| {
            serde_json::to_value(p).expect("serializes")["kind"]
                .as_str()
                .expect("kind")
                .to_owned()
        })
        .collect();
    assert_eq!(kinds, sent);
}

#[test]
fn unknown_values_are_tolerated() {
    // The versioning rule: a newer daemon's additions do not break this client.
    let vm: VmInfo =
        serde_json::from_str(r#"{"name":"a","state":"hibernating","shiny_new_field":[1,2]}"#)
            .expect("a VM with an unknown state and field");
    assert_eq!(vm.state, VmState::Unknown);
    let rec: ExecutionRecord =
        serde_json::from_str(r#"{"id":1,"vm":"a","command":"c","state":"paused","x":{}}"#)
            .expect("a record with an unknown state and field");
    assert_eq!(rec.state, ExecState::Unknown);
    assert!(rec.state.is_final());
    let push: PushResponse = serde_json::from_str(
        r#"{"vm":"a","name":"p","outcome":"queued","execution":null,"error":null}"#,
    )
    .expect("a push with an unknown outcome");
    assert_eq!(push.outcome, PushOutcome::Unknown);
}
