//! The web console measured in a real browser: Debian's Chromium, headless, over
//! chromedriver, against `portless serve` (this build, release) with two loopback agents.
//!
//! - **Click to output**: time from the click on Run (a fan-out of `uname` to both VMs) to
//!   the first output line in a pane and to both panes' final state, taken in the page (a
//!   `MutationObserver` notes when the DOM shows them), beside the same through
//!   `portless exec --follow vm1,vm2 uname` (from spawning the CLI to its first byte of
//!   stdout and to its exit). Samples alternate page, CLI, page, ... so both see the same
//!   noise.
//! - **First load**: bytes transferred for the instances page with an empty cache (the
//!   document, its module and style sheet, the API calls), from the Resource Timing API.
//! - **16 MiB**: long tasks (the Long Tasks API: main-thread work of over 50 ms) while 16 MiB
//!   of output streams into one pane, in lines and as one long line, with the largest gap
//!   between animation frames and what stays in the DOM.
//!
//! `cargo xtask bench --console` builds the agent and runs this
//! (`cargo bench -p host-shim --bench console -- [--quick] [--samples N]`); it prints the
//! figures and writes them to `target/bench/console.json`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::stack::{AGENT_CONFIG, Stack, portless_binary};
use common::webdriver::Browser;
use serde_json::{Value, json};

/// The bench's commands beside the tests' allow-list.
const COMMANDS: &str = r#"
[[command]]
name = "uname"
program = "/bin/uname"
args = ["-srm"]

[[command]]
name = "lines"
description = "16 MiB of 64-byte lines"
program = "/bin/sh"
args = ["-c", 'yes "portless console benchmark: a line of output of 64 bytes......" | head -c 16777216']
max_output = 16777216

[[command]]
name = "one-line"
description = "16 MiB without a newline"
program = "/bin/sh"
args = ["-c", 'head -c 16777216 /dev/zero | tr "\000" "p"']
max_output = 16777216
"#;

/// Clicks Run and reports, in ms from the click, when some pane first shows output, when
/// `arguments[0]` panes all show a final state, and when they all show state and output.
const CLICK: &str = r"
const done = arguments[arguments.length - 1];
const panes = arguments[0];
const button = document.querySelector('[data-test=command-form] [data-test=run]');
let first = null;
let final = null;
let timer = null;
const t0 = performance.now();
const obs = new MutationObserver(() => {
  const now = performance.now();
  const outs = [...document.querySelectorAll('[data-test=pane] [data-test=pane-output]')];
  if (first === null && outs.some((o) => o.textContent.length > 0)) first = now - t0;
  const states = [...document.querySelectorAll('[data-test=pane] [data-test=pane-state]')]
    .map((e) => e.textContent.trim());
  if (final === null && states.length === panes
      && states.every((s) => s && s !== 'pending' && s !== 'running')) final = now - t0;
  // Done once every pane has its final state and its output (which is drawn at the next
  // animation frame, so it may come after the state).
  if (final !== null && outs.length === panes && outs.every((o) => o.textContent.length > 0)) {
    obs.disconnect();
    clearTimeout(timer);
    done({ first, final, all: now - t0, states, output: outs.map((o) => o.textContent) });
  }
});
obs.observe(document.body, { subtree: true, childList: true, characterData: true, attributes: true });
timer = setTimeout(() => { obs.disconnect(); done({ error: 'not done within 30 s', first, final }); }, 30000);
button.click();
";

/// Clicks Run on a command that prints 16 MiB and watches the main thread until the pane
/// has a final state and the page has not changed for 1 s. A busy spell before the click
/// checks that long tasks are reported at all.
const STREAM: &str = r"
const done = arguments[arguments.length - 1];
const long = [];
const po = new PerformanceObserver((list) => {
  for (const e of list.getEntries()) long.push([e.startTime, e.duration]);
});
po.observe({ type: 'longtask' });
// A control: a task of the page that keeps the main thread busy for 120 ms, which the
// observer must report, or its silence below would mean nothing.
setTimeout(() => {
  const busy = performance.now();
  while (performance.now() - busy < 120) { /* busy */ }
}, 0);
let last = performance.now();
let maxGap = 0;
let frames = 0;
let running = true;
let t0 = null;
const frame = (t) => {
  if (t0 !== null && t - last > maxGap) maxGap = t - last;
  last = t;
  frames += 1;
  if (running) requestAnimationFrame(frame);
};
requestAnimationFrame(frame);
const pre = () => document.querySelector('[data-test=pane] [data-test=pane-output]');
let final = null;
let changed = null;
let mutations = 0;
const obs = new MutationObserver(() => { mutations += 1; changed = performance.now(); });
setTimeout(() => {
  obs.observe(document.querySelector('main') ?? document.body,
    { subtree: true, childList: true, characterData: true });
  t0 = performance.now();
  changed = t0;
  document.querySelector('[data-test=command-form] [data-test=run]').click();
}, 500);
const poll = setInterval(() => {
  if (t0 === null) return;
  const now = performance.now();
  const state = document.querySelector('[data-test=pane] [data-test=pane-state]')?.textContent.trim() ?? '';
  if (final === null && state && state !== 'pending' && state !== 'running') final = now - t0;
  if ((final !== null && now - changed > 1000) || now - t0 > 120000) {
    clearInterval(poll);
    running = false;
    po.disconnect();
    obs.disconnect();
    const p = pre();
    done({ final, settled: changed - t0, state, frames, maxGap, mutations,
           control: long.filter(([start]) => start < t0).map(([, d]) => d),
           long: long.filter(([start]) => start >= t0).map(([, d]) => d),
           domChars: p ? p.textContent.length : 0,
           trimmedNote: !document.querySelector('[data-test=pane] .trimmed')?.hidden });
  }
}, 50);
";

/// The bytes of a first load: the document and every resource, as Resource Timing has them.
const LOAD: &str = r"
const nav = performance.getEntriesByType('navigation')[0];
const res = performance.getEntriesByType('resource');
return {
  document: [nav.name, nav.transferSize, nav.decodedBodySize],
  resources: res.map((r) => [r.name, r.transferSize, r.decodedBodySize]),
};
";

struct Options {
    samples: usize,
    out: PathBuf,
}

fn options() -> Options {
    let mut o = Options {
        samples: 20,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            "--quick" => o.samples = 3,
            "--samples" => {
                o.samples = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| fail("--samples takes a number above 0"));
            }
            "--out" => {
                o.out = args
                    .next()
                    .map_or_else(|| fail("--out takes a directory"), PathBuf::from)
            }
            other => fail(&format!(
                "unknown option {other:?} (--quick, --samples N, --out DIR)"
            )),
        }
    }
    o
}

fn fail(why: &str) -> ! {
    eprintln!("console bench: {why}");
    std::process::exit(2)
}

/// Median, 90th percentile, min and max of `v` (sorted in place).
fn stats(v: &mut [f64]) -> Value {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        // Nearest rank.
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    json!({
        "median_ms": at(0.5),
        "p90_ms": at(0.9),
        "min_ms": v[0],
        "max_ms": v[v.len() - 1],
        "n": v.len(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `portless exec --follow vm1,vm2 uname`: ms to its first byte of stdout and to its exit.
fn cli_sample(s: &Stack) -> (f64, f64) {
    let t0 = Instant::now();
    let mut child = Command::new(portless_binary())
        .arg("--socket")
        .arg(&s.socket)
        .args(["exec", "--follow", "vm1,vm2", "uname"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("portless exec");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).expect("the first byte");
    let t_first = t0.elapsed();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).expect("stdout");
    let out = child.wait_with_output().expect("exit");
    let t_final = t0.elapsed();
    assert!(
        out.status.success(),
        "portless exec: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rest.insert(0, first[0]);
    let lines = rest.iter().filter(|b| **b == b'\n').count();
    assert_eq!(
        lines,
        2,
        "one line from each VM: {:?}",
        String::from_utf8_lossy(&rest)
    );
    (ms(t_first), ms(t_final))
}

/// One click-to-output sample in the page.
fn page_sample(b: &Browser, base: &str) -> (f64, f64, f64) {
    b.go(&format!("{base}/console/run?all=1&command=uname"));
    b.find(
        "[data-test=command-form] [data-test=run]",
        Duration::from_secs(10),
    );
    let r = b.run_async(CLICK, &[json!(2)], Duration::from_secs(40));
    assert!(r["error"].is_null(), "{r}");
    let states = r["states"].as_array().cloned().unwrap_or_default();
    assert!(
        states.iter().all(|s| s == "succeeded"),
        "both succeeded: {states:?}"
    );
    let outputs = r["output"].as_array().cloned().unwrap_or_default();
    assert!(
        outputs.len() == 2
            && outputs
                .iter()
                .all(|o| o.as_str().is_some_and(|t| !t.is_empty())),
        "both panes show uname: {outputs:?}"
    );
    (
        r["first"].as_f64().expect("first output"),
        r["final"].as_f64().expect("final state"),
        r["all"].as_f64().expect("everything shown"),
    )
}

/// The 16 MiB run of `command` on vm1.
fn stream(b: &Browser, base: &str, command: &str) -> Value {
    b.go(&format!("{base}/console/run?vm=vm1&command={command}"));
    b.find(
        "[data-test=command-form] [data-test=run]",
        Duration::from_secs(10),
    );
    let r = b.run_async(STREAM, &[], Duration::from_secs(150));
    assert!(r["final"].is_number(), "no final state: {r}");
    let control = r["control"].as_array().cloned().unwrap_or_default();
    assert!(
        control
            .iter()
            .any(|d| d.as_f64().is_some_and(|d| d >= 100.0)),
        "the Long Tasks API did not report the 120 ms control: {control:?}"
    );
    let long: Vec<f64> = r["long"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    json!({
        "state": r["state"],
        "final_ms": r["final"],
        "settled_ms": r["settled"],
        "long_tasks": long.len(),
        "longest_task_ms": long.iter().copied().fold(0.0, f64::max),
        "long_task_total_ms": long.iter().sum::<f64>(),
        "largest_frame_gap_ms": r["maxGap"],
        "frames": r["frames"],
        "dom_chars": r["domChars"],
        "trimmed_note_shown": r["trimmedNote"],
    })
}

fn main() {
    let o = options();
    let agent = common::agent_binary();
    if !agent.exists() {
        fail(&format!(
            "no agent at {} (cargo build --release -p agent-linux, or set PORTLESS_AGENT_BIN)",
            agent.display()
        ));
    }
    let mut s = Stack::new("console-bench", &["vm1", "vm2"], "");
    std::fs::write(
        s.dir.join("agent.toml"),
        format!("{AGENT_CONFIG}{COMMANDS}"),
    )
    .expect("agent.toml");
    s.start_daemon();
    s.start_agent("vm1");
    s.start_agent("vm2");
    s.wait_ready("vm1", Duration::from_secs(15));
    s.wait_ready("vm2", Duration::from_secs(15));

    let b = Browser::start(&s.dir, 1280, 800);
    let code = s.console_code();
    let base = code.url.split("/console").next().expect("base").to_owned();
    b.log_in_with(&code.url);

    // First load, with an empty cache.
    b.cdp("Network.clearBrowserCache", &json!({}));
    b.go(&format!("{base}/console/"));
    b.find("[data-test=vm-row]", Duration::from_secs(10));
    b.wait(Duration::from_secs(10), "the load event", || {
        (b.run("return document.readyState;", &[]) == "complete").then_some(())
    });
    let load = b.run(LOAD, &[]);
    let mut items = vec![load["document"].clone()];
    items.extend(load["resources"].as_array().cloned().unwrap_or_default());
    let transferred: u64 = items.iter().filter_map(|r| r[1].as_u64()).sum();
    let decoded: u64 = items.iter().filter_map(|r| r[2].as_u64()).sum();

    // Click to output, beside the CLI, alternating.
    let (mut page_first, mut page_final, mut page_all) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cli_first, mut cli_final) = (Vec::new(), Vec::new());
    // One of each first, not counted: caches and connections warm.
    page_sample(&b, &base);
    cli_sample(&s);
    for _ in 0..o.samples {
        let (f, e, a) = page_sample(&b, &base);
        page_first.push(f);
        page_final.push(e);
        page_all.push(a);
        let (f, e) = cli_sample(&s);
        cli_first.push(f);
        cli_final.push(e);
    }

    let lines = stream(&b, &base, "lines");
    let one_line = stream(&b, &base, "one-line");

    let summary = json!({
        "samples": o.samples,
        "click_to_output": {
            "page_first_line": stats(&mut page_first),
            "page_final_state": stats(&mut page_final),
            "page_all_shown": stats(&mut page_all),
            "cli_first_line": stats(&mut cli_first),
            "cli_exit": stats(&mut cli_final),
        },
        "first_load": {
            "transferred_bytes": transferred,
            "decoded_bytes": decoded,
            "items": items,
        },
        "stream_16_mib": { "lines": lines, "one_line": one_line },
    });
    std::fs::create_dir_all(&o.out).expect("out dir");
    let path = o.out.join("console.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary).expect("json"))
        .expect("console.json");
    report(&summary);
    println!("\nwritten to {}", path.display());
}

/// Prints the figures as Markdown tables.
fn report(v: &Value) {
    let c = &v["click_to_output"];
    println!(
        "\nClick to output, `uname` on two loopback VMs ({} samples each, alternating):\n",
        v["samples"]
    );
    println!("| | median | p90 | min | max |\n|---|---|---|---|---|");
    for (name, key) in [
        ("page: first output line", "page_first_line"),
        ("page: both final states", "page_final_state"),
        ("page: both states and outputs shown", "page_all_shown"),
        ("`portless exec --follow`: first line", "cli_first_line"),
        ("`portless exec --follow`: exit", "cli_exit"),
    ] {
        let s = &c[key];
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            s["median_ms"].as_f64().unwrap_or(0.0),
            s["p90_ms"].as_f64().unwrap_or(0.0),
            s["min_ms"].as_f64().unwrap_or(0.0),
            s["max_ms"].as_f64().unwrap_or(0.0),
        );
    }
    let ratio = |a: &str, b: &str| {
        c[a]["median_ms"].as_f64().unwrap_or(0.0) / c[b]["median_ms"].as_f64().unwrap_or(1.0)
    };
    println!(
        "\npage / CLI, medians: first line {:.2}x, everything shown / exit {:.2}x",
        ratio("page_first_line", "cli_first_line"),
        ratio("page_all_shown", "cli_exit")
    );
    let l = &v["first_load"];
    println!(
        "\nFirst load of the instances page, empty cache: {} bytes transferred ({} decoded)",
        l["transferred_bytes"], l["decoded_bytes"]
    );
    for item in l["items"].as_array().into_iter().flatten() {
        println!("  {} {} bytes", item[0].as_str().unwrap_or("?"), item[1]);
    }
    println!("\n16 MiB into one pane:\n");
    println!(
        "| output | final state | settled | long tasks | longest | largest frame gap | chars in the DOM |\n\
         |---|---|---|---|---|---|---|"
    );
    for (name, key) in [("64-byte lines", "lines"), ("one line", "one_line")] {
        let s = &v["stream_16_mib"][key];
        println!(
            "| {name} | {:.0} ms ({}) | {:.0} ms | {} | {:.0} ms | {:.0} ms | {} |",
            s["final_ms"].as_f64().unwrap_or(0.0),
            s["state"].as_str().unwrap_or("?"),
            s["settled_ms"].as_f64().unwrap_or(0.0),
            s["long_tasks"],
            s["longest_task_ms"].as_f64().unwrap_or(0.0),
            s["largest_frame_gap_ms"].as_f64().unwrap_or(0.0),
            s["dom_chars"],
        );
    }
}
