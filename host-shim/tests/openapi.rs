//! `openapi.json` against the code: the document parses; every operation names the servers
//! that serve it in `x-portless-servers` (`daemon`, `control` or both); the operations a
//! server is named for are exactly the (method, path) pairs its router registers (the
//! daemon's `http::router`, scanned from the text of `src/http/mod.rs`, and the control
//! plane's `router`, scanned from the text of that function in
//! `fleet/src/control/routes.rs`), so a route added, removed or renamed there fails here
//! until the document follows; and the document declares every path parameter of its
//! templates, and resolves every `$ref`.

use std::collections::BTreeSet;

use serde_json::Value;

/// The document, as `portless-api` ships it.
const DOCUMENT: &str = portless_api::OPENAPI;
/// The source of the daemon's router.
const DAEMON_SOURCE: &str = include_str!("../src/http/mod.rs");
/// The source of the control plane's router (its `router` function).
const CONTROL_SOURCE: &str = include_str!("../../fleet/src/control/routes.rs");

/// A server of the API, as `x-portless-servers` names it, and where its routes are.
struct Server {
    name: &'static str,
    file: &'static str,
    /// The text the routes are scanned from.
    routes: fn() -> &'static str,
}

const SERVERS: [Server; 2] = [
    Server {
        name: "daemon",
        file: "host-shim/src/http/mod.rs",
        routes: || DAEMON_SOURCE,
    },
    Server {
        name: "control",
        file: "fleet/src/control/routes.rs",
        routes: || function_text(CONTROL_SOURCE, "router"),
    },
];

/// The HTTP methods an OpenAPI path item can hold, which are also axum's method routers.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
}

/// The text of the bracketed group whose opening bracket (`open_char`, closed by
/// `close_char`) is at `open` in `s`, without the brackets.
fn group(s: &str, open: usize, open_char: char, close_char: char) -> &str {
    let mut depth = 0usize;
    for (i, c) in s[open..].char_indices() {
        if c == open_char {
            depth += 1;
        } else if c == close_char {
            depth -= 1;
            if depth == 0 {
                return &s[open + 1..open + i];
            }
        }
    }
    panic!("unbalanced {open_char}{close_char} after byte {open}");
}

/// The text of the call whose opening parenthesis is at `open` in `s`, without the
/// parentheses.
fn call_args(s: &str, open: usize) -> &str {
    group(s, open, '(', ')')
}

/// The body of the function `name` in `source`, without its braces.
fn function_text(source: &'static str, name: &str) -> &'static str {
    let at = source
        .find(&format!("fn {name}("))
        .unwrap_or_else(|| panic!("no function {name} in the source"));
    let open = at + source[at..].find('{').expect("the function's body");
    group(source, open, '{', '}')
}

/// The (method, path) pairs of every `.route("path", get(h).post(h2))` of a server's
/// router.
fn routes_in_source(server: &Server) -> BTreeSet<(String, String)> {
    let source = (server.routes)();
    let mut routes = BTreeSet::new();
    for (at, _) in source.match_indices(".route(") {
        let args = call_args(source, at + ".route".len());
        let rest = args.trim_start();
        let rest = rest
            .strip_prefix('"')
            .unwrap_or_else(|| panic!("a route whose path is not a string literal: {args}"));
        let end = rest.find('"').expect("the path literal ends");
        let path = &rest[..end];
        let router = rest[end + 1..].trim_start();
        let router = router
            .strip_prefix(',')
            .unwrap_or_else(|| panic!("route {path}: no method router in {args}"));
        // The method routers: `get(..)`, `.post(..)`, ... at the top level of the argument.
        let mut found = 0;
        let mut depth = 0usize;
        let mut word = String::new();
        for c in router.chars() {
            match c {
                '(' => {
                    // Layers on a method router (`post(h).layer(limit)`) are not methods.
                    if depth == 0 && word == "layer" {
                        depth += 1;
                        word.clear();
                        continue;
                    }
                    if depth == 0 {
                        assert!(
                            METHODS.contains(&word.as_str()),
                            "{}: route {path}: method router `{word}(..)` is not one this \
                             test knows (any, on, ...): describe it in openapi.json and teach \
                             the test",
                            server.file
                        );
                        let pair = (word.clone(), path.to_owned());
                        assert!(routes.insert(pair), "route {word} {path} registered twice");
                        found += 1;
                    }
                    depth += 1;
                    word.clear();
                }
                ')' => {
                    depth -= 1;
                    word.clear();
                }
                c if c.is_alphanumeric() || c == '_' => word.push(c),
                _ => word.clear(),
            }
        }
        assert!(found > 0, "route {path}: no method router in {args}");
    }
    routes
}

/// The (method, path) pairs of the document's `paths`.
fn routes_in_document(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut routes = BTreeSet::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is an object");
        for method in item.keys().filter(|k| METHODS.contains(&k.as_str())) {
            routes.insert((method.clone(), path.clone()));
        }
    }
    routes
}

/// The servers an operation's `x-portless-servers` names.
fn servers_of(op: &Value) -> Vec<&str> {
    op["x-portless-servers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| s.as_str().unwrap_or("(not a string)"))
        .collect()
}

/// The (method, path) pairs of the operations that `x-portless-servers` says `server`
/// serves.
fn routes_of_server(doc: &Value, server: &str) -> BTreeSet<(String, String)> {
    routes_in_document(doc)
        .into_iter()
        .filter(|(method, path)| servers_of(&doc["paths"][path][method]).contains(&server))
        .collect()
}

/// What a `$ref` of this document points at.
fn resolve<'a>(doc: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("{reference} is not a reference into the document"));
    doc.pointer(pointer)
        .unwrap_or_else(|| panic!("{reference} resolves to nothing"))
}

/// `value`, or what it refers to.
fn deref<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(r) => resolve(doc, r),
        None => value,
    }
}

#[test]
fn the_document_is_openapi_3_1() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3.1."), "openapi {version}");
    assert!(doc["info"]["title"].is_string());
    assert!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer",
        "the bearer scheme"
    );
}

#[test]
fn every_operation_names_its_servers() {
    let doc = document();
    let known: Vec<&str> = SERVERS.iter().map(|s| s.name).collect();
    for (method, path) in routes_in_document(&doc) {
        let servers = servers_of(&doc["paths"][&path][&method]);
        assert!(
            !servers.is_empty(),
            "{method} {path}: no x-portless-servers (an array of {known:?})"
        );
        for (i, s) in servers.iter().enumerate() {
            assert!(
                known.contains(s),
                "{method} {path}: x-portless-servers names {s:?}, not one of {known:?}"
            );
            assert!(
                !servers[..i].contains(s),
                "{method} {path}: x-portless-servers names {s:?} twice"
            );
        }
    }
}

#[test]
fn each_server_is_named_for_exactly_the_routes_of_its_router() {
    let doc = document();
    let mut problems = Vec::new();
    for server in &SERVERS {
        let code = routes_in_source(server);
        assert!(
            code.len() >= 10,
            "{}: the scan found too few routes: {code:?}",
            server.file
        );
        let documented = routes_of_server(&doc, server.name);
        let missing: Vec<_> = code.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&code).collect();
        if !missing.is_empty() || !extra.is_empty() {
            problems.push(format!(
                "openapi.json is out of step with the router of {}: routes of the router no \
                 operation with {:?} in its x-portless-servers has: {missing:?}; operations \
                 with {:?} that the router does not have: {extra:?}",
                server.file, server.name, server.name
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_operation_declares_its_path_parameters_and_errors() {
    let doc = document();
    for (method, path) in routes_in_document(&doc) {
        let op = &doc["paths"][&path][&method];
        let declared: BTreeSet<&str> = op["parameters"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|p| deref(&doc, p))
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().expect("a parameter's name"))
            .collect();
        let in_template: BTreeSet<&str> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        assert_eq!(declared, in_template, "{method} {path}: path parameters");
        assert!(
            op["operationId"].is_string(),
            "{method} {path}: operationId"
        );
        let responses = op["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{method} {path}: no success response"
        );
        // Every route identifies and authorizes its caller (and so can refuse it) and audits
        // the decision: a daemon refuses with 403; a control plane refuses a caller it cannot
        // identify with 401.
        let servers = servers_of(op);
        for (server, status) in [("daemon", "403"), ("control", "401")] {
            assert!(
                !servers.contains(&server) || responses.contains_key(status),
                "{method} {path}: served by the {server} but no {status} response"
            );
        }
        assert!(
            op["x-portless-audit"]["action"].is_string(),
            "{method} {path}: no audit action"
        );
    }
}

#[test]
fn every_reference_resolves() {
    fn walk(doc: &Value, v: &Value, refs: &mut usize) {
        match v {
            Value::Object(map) => {
                if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                    resolve(doc, r);
                    *refs += 1;
                }
                for (k, child) in map {
                    // Discriminator mappings are references too.
                    if k == "mapping" {
                        for target in child.as_object().expect("a mapping").values() {
                            resolve(doc, target.as_str().expect("a mapping target"));
                        }
                    }
                    walk(doc, child, refs);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(doc, i, refs)),
            _ => {}
        }
    }
    let doc = document();
    let mut refs = 0;
    walk(&doc, &doc, &mut refs);
    assert!(refs > 0);
}
