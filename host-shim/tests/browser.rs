//! The web console in a real browser: Debian's Chromium, headless, driven over WebDriver
//! (`chromedriver`) against a real `portless serve` with loopback agents. Ignored by plain
//! `cargo test` (they need Chromium); `cargo xtask test` runs them. Screenshots of each page,
//! at desktop and phone width, are written under `target/console/`; with
//! `PORTLESS_DOCS_SCREENSHOT=1` the instances page also replaces `docs/console-instances.png`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::proxy::Relay;
use common::stack::Stack;
use common::webdriver::Browser;

/// Where the screenshots go.
fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console")
}

/// A command that prints a line every 200 ms, `n` times.
const TICKS: &str = r#"
[[command]]
name = "ticks"
description = "a line every 200 ms"
program = "/bin/sh"
args = ["-c", 'i=0; while [ $i -lt "$1" ]; do i=$((i+1)); echo "tick $i"; sleep 0.2; done', "ticks", "{n}"]

[[command.param]]
name = "n"
kind = "integer"
min = 1
max = 100
"#;

/// A stack of two loopback VMs with a second principal `viewer` (token `viewer-token`)
/// that sees vm2 only and may not read the audit log.
fn stack(name: &str) -> Stack {
    stack_with(name, &[])
}

/// [`stack`] with more keys in VMs' tables (`("vm1", "labels = { role = \"web\" }")`).
fn stack_with(name: &str, vm_keys: &[(&str, &str)]) -> Stack {
    // SHA-256 of "viewer-token".
    let viewer = "\n[[principal]]\nname = \"viewer\"\n\
                  token_sha256 = \"d036bd6d01a1cae081d39a2f8dab751dc042de814fd60df31fcb553170950f29\"\n\
                  vms = [\"vm2\"]\ncommands = [\"echo\"]\n";
    let mut s = Stack::new(name, &["vm1", "vm2"], viewer);
    for (vm, keys) in vm_keys {
        s.vm_keys(vm, keys);
    }
    // Pushed programs land in a directory of the stack (vm1 is the one pushed to).
    let push = format!(
        "[push]\nenabled = true\nmax_bytes = 1048576\ndir = \"{}\"\n",
        s.dir.join("guest-push").display()
    );
    let config = format!("{push}{}{TICKS}", common::stack::AGENT_CONFIG);
    std::fs::write(s.dir.join("agent.toml"), config).expect("agent.toml");
    s.start_daemon();
    s.start_agent("vm1");
    s.start_agent("vm2");
    s.wait_ready("vm1", Duration::from_secs(15));
    s.wait_ready("vm2", Duration::from_secs(15));
    s
}

/// Opens a one-time login link and confirms it.
fn log_in(s: &Stack, b: &Browser) {
    assert_eq!(b.log_in_with(&s.console_code().url), "ops");
}

#[test]
#[ignore = "needs chromium and chromium-driver; run by cargo xtask test"]
fn log_in_and_see_the_instances_update_live() {
    let mut s = stack("browser-instances");
    let b = Browser::start(&s.dir, 1280, 800);
    log_in(&s, &b);
    let rows = b.wait(Duration::from_secs(10), "both VMs", || {
        let rows = b.all("[data-test=vm-row]");
        (rows.len() == 2).then_some(rows)
    });
    assert_eq!(rows.len(), 2);
    b.screenshot(&shots().join("instances-desktop.png"));
    // `PORTLESS_DOCS_SCREENSHOT=1` also refreshes the README's picture.
    if std::env::var_os("PORTLESS_DOCS_SCREENSHOT").is_some_and(|v| v == "1") {
        let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/console-instances.png");
        std::fs::copy(shots().join("instances-desktop.png"), docs).expect("docs screenshot");
    }
    let state = |vm: &str| {
        b.text(&format!(
            "[data-test=vm-row][data-vm={vm}] [data-test=vm-state]"
        ))
    };
    assert!(state("vm1").contains("ready"), "{}", state("vm1"));
    s.kill_agent("vm1");
    b.wait(Duration::from_secs(20), "vm1 no longer ready", || {
        (!state("vm1").contains("ready")).then_some(())
    });
    s.start_agent("vm1");
    b.wait(Duration::from_secs(20), "vm1 ready again", || {
        state("vm1").contains("ready").then_some(())
    });
    let severe = b.severe_logs();
    assert!(severe.is_empty(), "{severe:?}");
}

#[test]
#[ignore = "needs chromium and chromium-driver; run by cargo xtask test"]
fn forms_check_as_the_user_types_and_the_daemon_has_the_last_word() {
    let s = stack("browser-forms");
    let b = Browser::start(&s.dir, 1280, 800);
    log_in(&s, &b);
    let url = b.url().replace("/console/", "/console/vms/vm1");
    b.go(&url);
    let form = "[data-test=command-form][data-command=sleep]";
    b.find(form, Duration::from_secs(10));
    b.screenshot_page(&shots().join("vm-desktop.png"), 1280);
    b.resize(1280, 800);
    let input = b.find(
        &format!("{form} input[name=seconds]"),
        Duration::from_secs(5),
    );
    b.type_into(&input, "601");
    let error = format!("{form} [data-test=field-error][data-param=seconds]");
    b.wait(Duration::from_secs(5), "the page's own refusal", || {
        (!b.text(&error).trim().is_empty()).then_some(())
    });
    b.click(&b.find(&format!("{form} [data-test=run]"), Duration::from_secs(5)));
    std::thread::sleep(Duration::from_millis(500));
    let (_, list) = s.call("GET", "/v1/executions", None);
    assert_eq!(
        list["executions"],
        serde_json::json!([]),
        "nothing was sent"
    );

    // Without the page's checks, the daemon refuses it, and says so next to the field.
    b.run("document.body.dataset.skipClientChecks = '1';", &[]);
    b.click(&b.find(&format!("{form} [data-test=run]"), Duration::from_secs(5)));
    b.wait(
        Duration::from_secs(10),
        "the daemon's refusal next to the field",
        || {
            let t = b.text(&error);
            (t.contains("601") || t.contains("range") || t.contains("600")).then_some(t)
        },
    );
    let (_, list) = s.call("GET", "/v1/executions", None);
    let states: Vec<_> = list["executions"]
        .as_array()
        .map(|a| a.iter().map(|e| e["state"].clone()).collect())
        .unwrap_or_default();
    assert!(states.iter().all(|st| st == "rejected"), "{states:?}");
}

#[test]
#[ignore = "needs chromium and chromium-driver; run by cargo xtask test"]
fn a_fan_out_streams_both_vms_live_and_cancel_ends_a_sleep() {
    let s = stack("browser-fanout");
    let b = Browser::start(&s.dir, 1280, 800);
    log_in(&s, &b);
    let base = b.url().replace("/console/", "");
    b.go(&format!("{base}/console/run?all=1&command=ticks"));
    b.run_form(&[("n", "15")]);
    let lines = |vm: &str| {
        b.text(&format!(
            "[data-test=pane][data-vm={vm}] [data-test=pane-output]"
        ))
        .lines()
        .filter(|l| l.contains("tick"))
        .count()
    };
    // Both panes grow while the command runs (it prints for 3 s).
    let first = b.wait(Duration::from_secs(10), "output in both panes", || {
        let (a, c) = (lines("vm1"), lines("vm2"));
        (a > 0 && c > 0 && a < 15 && c < 15).then_some((a, c))
    });
    let later = b.wait(Duration::from_secs(10), "more output in both panes", || {
        let (a, c) = (lines("vm1"), lines("vm2"));
        (a > first.0 && c > first.1).then_some((a, c))
    });
    assert!(later.0 > first.0 && later.1 > first.1);
    b.screenshot(&shots().join("run-desktop.png"));
    b.wait(Duration::from_secs(20), "both succeeded", || {
        let st = b.text("[data-test=pane][data-vm=vm1] [data-test=pane-state]")
            + &b.text("[data-test=pane][data-vm=vm2] [data-test=pane-state]");
        (st.matches("succeeded").count() == 2).then_some(())
    });
    assert_eq!((lines("vm1"), lines("vm2")), (15, 15));

    // sleep 600 on vm1, cancelled from its pane.
    b.go(&format!("{base}/console/run?vm=vm1&command=sleep"));
    b.run_form(&[("seconds", "600")]);
    wait_pane_state(&b, "running", Duration::from_secs(10));
    b.click(&b.find(
        "[data-test=pane] [data-test=cancel]",
        Duration::from_secs(5),
    ));
    wait_pane_state(&b, "cancelled", Duration::from_secs(15));
}

#[test]
#[ignore = "needs chromium and chromium-driver; run by cargo xtask test"]
fn the_audit_page_lists_the_calls_and_a_lesser_principal_sees_less() {
    let s = stack("browser-audit");
    let b = Browser::start(&s.dir, 1280, 800);
    log_in(&s, &b);
    let base = b.url().replace("/console/", "");
    b.go(&format!("{base}/console/audit"));
    let rows = b.wait(Duration::from_secs(10), "audit rows", || {
        let t = b.text("table");
        (t.contains("console_login") && t.contains("list_vms")).then_some(t)
    });
    assert!(rows.contains("ops"));
    b.screenshot(&shots().join("audit-desktop.png"));
    // Log out, then in as `viewer` with its token.
    b.click(&b.find("[data-test=logout]", Duration::from_secs(5)));
    b.find("[data-test=login-notice]", Duration::from_secs(10));
    let token = b.find("[data-test=login-token]", Duration::from_secs(5));
    b.type_into(&token, "viewer-token");
    b.click(&b.find("[data-test=login-token-submit]", Duration::from_secs(5)));
    let rows = b.wait(Duration::from_secs(10), "viewer's instances", || {
        let rows = b.all("[data-test=vm-row]");
        (!rows.is_empty()).then_some(rows)
    });
    assert_eq!(rows.len(), 1, "viewer sees vm2 only");
    assert!(b.all("[data-test=vm-row][data-vm=vm1]").is_empty());
    assert!(
        !b.text("#nav").contains("Audit"),
        "no audit link: {}",
        b.text("#nav")
    );
    b.go(&format!("{base}/console/audit"));
    b.find("[data-test=forbidden]", Duration::from_secs(10));
    b.resize(390, 844);
    b.go(&format!("{base}/console/"));
    b.find("[data-test=vm-row]", Duration::from_secs(10));
    b.screenshot(&shots().join("instances-phone.png"));
}

/// The console's address in a login URL (`http://127.0.0.1:PORT/...`).
fn authority(url: &str) -> std::net::SocketAddr {
    let rest = url.strip_prefix("http://").expect("an http URL");
    rest.split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("host:port")
}

/// `portless --socket SOCKET ARGS`: its stdout, after checking it succeeded.
fn cli(s: &Stack, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(common::stack::portless_binary())
        .arg("--socket")
        .arg(&s.socket)
        .args(args)
        .output()
        .expect("portless");
    assert!(
        out.status.success(),
        "portless {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Waits up to `within` for the one pane's state to read `state`.
fn wait_pane_state(b: &Browser, state: &str, within: Duration) {
    b.wait(within, &format!("the pane {state}"), || {
        b.text("[data-test=pane] [data-test=pane-state]")
            .contains(state)
            .then_some(())
    });
}

/// The text of the one pane's output, as the page holds it (not as it is laid out).
fn pane_text(b: &Browser) -> String {
    b.run(
        "const p = document.querySelector('[data-test=pane] [data-test=pane-output]');\
         return p ? p.textContent : '';",
        &[],
    )
    .as_str()
    .unwrap_or_default()
    .to_owned()
}

#[test]
#[ignore = "needs chromium and chromium-driver; run by cargo xtask test"]
fn a_dropped_connection_resumes_with_nothing_lost_or_doubled() {
    let s = stack("browser-resume");
    let b = Browser::start(&s.dir, 1280, 800);
    // The browser reaches the console through a relay that the test cuts mid-stream.
    let code = s.console_code();
    let console = authority(&code.url);
    let relay = Relay::start(console);
    let via = format!("127.0.0.1:{}", relay.addr().port());
    b.log_in_with(&code.url.replacen(&console.to_string(), &via, 1));
    b.go(&format!("http://{via}/console/run?vm=vm1&command=ticks"));
    b.run_form(&[("n", "40")]);
    let ticks = |b: &Browser| pane_text(b).matches("tick").count();
    // Two cuts while it prints (a line every 200 ms for 8 s), each after more output came.
    let mut seen = 0;
    for cut in 0..2 {
        seen = b.wait(Duration::from_secs(10), "more output before a cut", || {
            let t = ticks(&b);
            (t >= seen + 5 && t < 35).then_some(t)
        });
        let heads_before = relay.heads().len();
        let closed = relay.cut();
        assert!(closed > 0, "cut {cut}: no connection was open");
        b.wait(Duration::from_secs(10), "the stream resumed", || {
            relay.heads()[heads_before..]
                .iter()
                .any(|h| h.starts_with("GET /v1/events") && h.contains("Last-Event-ID:"))
                .then_some(())
        });
    }
    wait_pane_state(&b, "succeeded", Duration::from_secs(20));
    let id = b
        .all("[data-test=pane]")
        .first()
        .map(|p| b.property(p, "dataset")["execution"].clone())
        .and_then(|v| v.as_str().map(str::to_owned))
        .expect("the pane's execution");
    let recorded = String::from_utf8(cli(&s, &["output", &id])).expect("UTF-8");
    let expected: String = (1..=40).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(recorded, expected, "the daemon's record");
    b.wait(Duration::from_secs(5), "the page's copy", || {
        (pane_text(&b) == recorded).then_some(())
    });
}

#[test]
#[ignore = "needs chromium and chromium-driver; run by cargo xtask test"]
fn a_pushed_program_runs_and_its_output_shows() {
    let s = stack("browser-push");
    let b = Browser::start(&s.dir, 1280, 800);
    log_in(&s, &b);
    let base = b.url().replace("/console/", "");
    let script = s.dir.join("fix.sh");
    let body = b"#!/bin/sh\necho patched-ok\necho a-warning >&2\nexit 0\n";
    std::fs::write(&script, body).expect("script");
    b.go(&format!("{base}/console/push"));
    let file = b.find("[data-test=push-file]", Duration::from_secs(10));
    b.choose_file(&file, &script);
    let want = sha256_hex(body);
    b.wait(Duration::from_secs(10), "the file's SHA-256", || {
        (b.text("[data-test=push-sha256]") == want).then_some(())
    });
    b.click(&b.find("[data-test=push-vm][value=vm1]", Duration::from_secs(10)));
    b.click(&b.find("[data-test=push-run]", Duration::from_secs(5)));
    b.click(&b.find("[data-test=push-go]", Duration::from_secs(5)));
    b.wait(Duration::from_secs(20), "the guest's confirmation", || {
        let row = b.text("[data-test=push-row][data-vm=vm1]");
        row.contains(&want).then_some(row)
    });
    assert!(
        b.text("[data-test=push-row][data-vm=vm1] [data-test=push-match]")
            .contains('✓'),
        "the guest's hash matches the page's"
    );
    b.wait(Duration::from_secs(20), "the run's output and end", || {
        let state = b.text("[data-test=pane] [data-test=pane-state]");
        let out = pane_text(&b);
        (state.contains("succeeded") && out.contains("patched-ok") && out.contains("a-warning"))
            .then_some(())
    });
    b.screenshot_page(&shots().join("push-run-desktop.png"), 1280);
}

/// Lower-case hex SHA-256 of `data`.
fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
#[ignore = "needs chromium and chromium-driver; run by cargo xtask test"]
fn every_page_reads_at_desktop_and_phone_width() {
    let s = stack("browser-pages");
    let (_, done) = s.exec("vm1", "echo", &["hello"]);
    let id = done["executions"][0]["id"].as_u64().expect("an execution");
    s.wait(id, 10_000);
    let b = Browser::start(&s.dir, 1280, 800);
    let code = s.console_code();
    let base = code.url.split("/console").next().expect("base").to_owned();
    // Each page, and what shows that it has drawn.
    let pages = [
        ("instances", "/console/".to_owned(), "[data-test=vm-row]"),
        (
            "vm",
            "/console/vms/vm1".to_owned(),
            "[data-test=command-form]",
        ),
        (
            "run",
            "/console/run?vm=vm1&command=ticks".to_owned(),
            "[data-test=command-form]",
        ),
        (
            "history",
            "/console/executions".to_owned(),
            "[data-test=history-row]",
        ),
        (
            "execution",
            format!("/console/executions/{id}"),
            "[data-test=execution-state]",
        ),
        ("push", "/console/push".to_owned(), "[data-test=push-vm]"),
        (
            "audit",
            "/console/audit".to_owned(),
            "[data-test=audit-row]",
        ),
    ];
    for (width, height, kind) in [(1280, 800, "desktop"), (390, 844, "phone")] {
        b.resize(width, height);
        b.go(&format!("{base}/console/login"));
        b.find("[data-test=login-token]", Duration::from_secs(10));
        fits(&b, "login", width);
        b.screenshot(&shots().join(format!("login-{kind}.png")));
    }
    log_in(&s, &b);
    for (width, height, kind) in [(1280, 800, "desktop"), (390, 844, "phone")] {
        for (name, path, drawn) in &pages {
            b.resize(width, height);
            b.go(&format!("{base}{path}"));
            b.find(drawn, Duration::from_secs(10));
            fits(&b, name, width);
            labelled(&b, name);
            b.screenshot_page(&shots().join(format!("{name}-{kind}.png")), width);
        }
    }
    // A VM's metrics and a ping, on demand.
    b.go(&format!("{base}/console/vms/vm1"));
    b.click(&b.find("[data-test=metrics-refresh]", Duration::from_secs(10)));
    let metrics = b.wait(Duration::from_secs(10), "the metrics", || {
        let t = b.text("[data-test=metrics]");
        t.contains("Agent RSS").then_some(t)
    });
    assert!(
        metrics.contains("Load") && metrics.contains("Memory used") && metrics.contains("Uptime"),
        "{metrics}"
    );
    let after = |label: &str| {
        metrics
            .lines()
            .skip_while(|l| *l != label)
            .nth(1)
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        after("Agent RSS").ends_with("MiB") || after("Agent RSS").ends_with("KiB"),
        "{metrics}"
    );
    // vm1's agent ran the one `echo` of this test so far.
    assert_eq!(after("Agent executions (running)"), "1 (0)", "{metrics}");
    b.click(&b.find("[data-test=ping]", Duration::from_secs(5)));
    b.wait(Duration::from_secs(10), "the ping's round trip", || {
        b.text("[data-test=ping-result]")
            .contains("Round trip")
            .then_some(())
    });

    // By keyboard alone: type the value and press Enter in the field.
    b.resize(1280, 800);
    b.go(&format!("{base}/console/run?vm=vm1&command=ticks"));
    let n = b.find(
        "[data-test=command-form] input[name=n]",
        Duration::from_secs(10),
    );
    b.clear(&n);
    b.type_into(&n, "3\u{E007}");
    wait_pane_state(&b, "succeeded", Duration::from_secs(15));
    let severe = b.severe_logs();
    assert!(severe.is_empty(), "{severe:?}");
}

/// Asserts that every form control shown has a name for assistive technology: a `<label>`,
/// `aria-label` or `aria-labelledby` (a button its text).
fn labelled(b: &Browser, page: &str) {
    let bad = b.run(
        "return [...document.querySelectorAll('input, select, textarea, button')]\
           .filter((el) => el.type !== 'hidden' && !el.closest('[hidden]'))\
           .filter((el) => !((el.labels && el.labels.length) || el.getAttribute('aria-label')\
             || el.getAttribute('aria-labelledby')\
             || (el.tagName === 'BUTTON' && el.textContent.trim())))\
           .map((el) => el.outerHTML.slice(0, 160));",
        &[],
    );
    assert_eq!(
        bad,
        serde_json::json!([]),
        "unlabelled controls on the {page} page"
    );
}

/// Asserts that the page needs no sideways scrolling at its window's width (wide content
/// such as tables and output scrolls inside its own box).
fn fits(b: &Browser, page: &str, width: u32) {
    let v = b.run(
        "return [document.documentElement.scrollWidth, window.innerWidth];",
        &[],
    );
    let (scroll, inner) = (v[0].as_u64().unwrap_or(0), v[1].as_u64().unwrap_or(0));
    assert!(
        scroll <= inner,
        "the {page} page is {scroll} px wide in a {inner} px window ({width} px)"
    );
}

#[test]
#[ignore = "needs chromium and chromium-driver; run by cargo xtask test"]
fn instances_filter_by_label_and_state_and_a_label_or_a_selection_runs() {
    let s = stack_with(
        "browser-labels",
        &[
            ("vm1", "labels = { role = \"web\", zone = \"a\" }"),
            ("vm2", "labels = { role = \"db\", zone = \"a\" }"),
        ],
    );
    let b = Browser::start(&s.dir, 1280, 800);
    log_in(&s, &b);
    let shown = || -> Vec<String> {
        b.run(
            "return [...document.querySelectorAll('[data-test=vm-row]')]\
               .filter((r) => !r.hidden && r.offsetParent !== null).map((r) => r.dataset.vm);",
            &[],
        )
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
    };
    b.wait(Duration::from_secs(10), "both VMs", || {
        (shown().len() == 2).then_some(())
    });
    assert!(
        b.text("[data-test=vm-row][data-vm=vm1]")
            .contains("role=web")
    );
    let filter = b.find("[data-test=filter-label]", Duration::from_secs(5));
    b.type_into(&filter, "role=web");
    b.wait(Duration::from_secs(5), "only vm1", || {
        (shown() == ["vm1"]).then_some(())
    });
    // The label's own fan-out.
    let run_label = b.find("[data-test=run-label]", Duration::from_secs(5));
    b.wait(Duration::from_secs(5), "a link to run on the label", || {
        b.text("[data-test=run-label]")
            .contains("role=web")
            .then_some(())
    });
    b.click(&run_label);
    b.wait(
        Duration::from_secs(10),
        "the run page for the label",
        || b.url().contains("label=role%3Dweb").then_some(()),
    );
    let select = b.find("[data-test=command-select]", Duration::from_secs(10));
    b.choose(&select, "echo");
    b.run_form(&[("word", "labelled")]);
    wait_pane_state(&b, "succeeded", Duration::from_secs(15));
    let panes: Vec<_> = b.all("[data-test=pane]");
    assert_eq!(panes.len(), 1, "role=web is vm1 alone");
    assert!(b.text("[data-test=pane][data-vm=vm1]").contains("labelled"));

    // A selection of both (a key alone matches both), and the state filter.
    b.go(&format!(
        "{}/console/?label=zone",
        b.url().split("/console").next().unwrap_or("")
    ));
    b.wait(Duration::from_secs(10), "both VMs have a zone", || {
        (shown().len() == 2).then_some(())
    });
    let state = b.find("[data-test=filter-state]", Duration::from_secs(5));
    b.choose(&state, "unresponsive");
    b.wait(Duration::from_secs(5), "none unresponsive", || {
        shown().is_empty().then_some(())
    });
    b.choose(&state, "");
    b.wait(Duration::from_secs(5), "both again", || {
        (shown().len() == 2).then_some(())
    });
    for vm in ["vm1", "vm2"] {
        b.click(&b.find(
            &format!("[data-test=vm-row][data-vm={vm}] [data-test=vm-select]"),
            Duration::from_secs(5),
        ));
    }
    b.click(&b.find("[data-test=run-selected]", Duration::from_secs(5)));
    b.wait(Duration::from_secs(10), "the run page for both", || {
        let u = b.url();
        (u.contains("vm=vm1") && u.contains("vm=vm2")).then_some(())
    });
}

#[test]
#[ignore = "needs chromium and chromium-driver; run by cargo xtask test"]
fn the_console_shows_the_fleet() {
    let mut fleet = common::fleet::Fleet::start("browser-fleet");
    fleet.wait_registered(6);
    let b = Browser::start(&fleet.dir, 1280, 800);
    // A login link from one control-plane server; the browser stays on it, the session
    // lives in the database.
    let code =
        portless_api::blocking::Client::at(portless_api::Endpoint::Tcp(fleet.addrs[0].clone()))
            .expect("client")
            .with_token(common::fleet::TOKEN)
            .console_code()
            .expect("code");
    assert_eq!(b.log_in_with(&code.url), "ops");
    let row = |vm: &str| format!("[data-test=vm-row][data-vm=\"{vm}\"]");
    let rows = b.wait(Duration::from_secs(10), "the fleet's six VMs", || {
        let rows = b.all("[data-test=vm-row]");
        (rows.len() == 6).then_some(rows)
    });
    assert_eq!(rows.len(), 6);
    for host in ["host1", "host2", "host3"] {
        for vm in ["vm1", "vm2"] {
            assert!(
                b.text(&row(&format!("{host}/{vm}"))).contains("ready"),
                "{host}/{vm}"
            );
        }
    }
    // Host labels are the VMs' labels.
    assert!(b.text(&row("host3/vm1")).contains("role=db"));
    b.screenshot(&shots().join("fleet-instances-desktop.png"));

    // Run on a label across two hosts: four panes, each with its VM's output.
    let filter = b.find("[data-test=filter-label]", Duration::from_secs(5));
    b.type_into(&filter, "role=web");
    let run_label = b.find("[data-test=run-label]", Duration::from_secs(5));
    b.wait(Duration::from_secs(5), "a link to run on the label", || {
        b.text("[data-test=run-label]")
            .contains("role=web")
            .then_some(())
    });
    b.click(&run_label);
    let select = b.find("[data-test=command-select]", Duration::from_secs(10));
    b.choose(&select, "echo");
    b.run_form(&[("word", "fleetwide")]);
    b.wait(Duration::from_secs(30), "four panes succeeded", || {
        let states = b.run(
            "return [...document.querySelectorAll('[data-test=pane] [data-test=pane-state]')]\
               .map((e) => e.textContent);",
            &[],
        );
        let states = states.as_array().cloned().unwrap_or_default();
        (states.len() == 4
            && states
                .iter()
                .all(|s| s.as_str().is_some_and(|s| s.contains("succeeded"))))
        .then_some(())
    });
    for vm in ["host1/vm1", "host1/vm2", "host2/vm1", "host2/vm2"] {
        let pane = b.text(&format!("[data-test=pane][data-vm=\"{vm}\"]"));
        assert!(pane.contains("fleetwide"), "{vm}: {pane}");
    }
    b.screenshot(&shots().join("fleet-run-desktop.png"));

    // A VM's page: its commands from the registered cache; ping and metrics are its
    // host's.
    let base = b.url().split("/console").next().unwrap_or("").to_owned();
    b.go(&format!("{base}/console/vms/host3%2Fvm1"));
    b.find("[data-test=fleet-note]", Duration::from_secs(10));
    b.find(
        "[data-test=command-form][data-command=sleep]",
        Duration::from_secs(10),
    );
    assert!(b.all("[data-test=ping]").is_empty());

    // A host that goes away shows as such, live.
    b.go(&format!("{base}/console/"));
    b.find(&row("host3/vm1"), Duration::from_secs(10));
    fleet.hosts[2].kill_daemon();
    b.wait(Duration::from_secs(20), "host3's VMs offline", || {
        let (a, c) = (b.text(&row("host3/vm1")), b.text(&row("host3/vm2")));
        (a.contains("host offline") && c.contains("host offline")).then_some(())
    });
    assert!(b.text(&row("host1/vm1")).contains("ready"));
    b.screenshot(&shots().join("fleet-offline-desktop.png"));

    // The history and the audit log are the fleet's.
    b.go(&format!("{base}/console/executions"));
    b.wait(
        Duration::from_secs(10),
        "the four runs in the history",
        || {
            (b.text("table").matches("fleetwide").count() >= 4
                || b.text("table").matches("echo").count() >= 4)
                .then_some(())
        },
    );
    b.go(&format!("{base}/console/audit"));
    b.wait(Duration::from_secs(10), "audit rows", || {
        let t = b.text("table");
        (t.contains("console_login") && t.contains("exec")).then_some(())
    });
    let severe = b.severe_logs();
    assert!(severe.is_empty(), "{severe:?}");
}
