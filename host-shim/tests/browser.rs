//! The web console in a real browser: Debian's Chromium, headless, driven over WebDriver
//! (`chromedriver`) against a real `portless serve` with loopback agents. Ignored by plain
//! `cargo test` (they need Chromium); `cargo xtask test` runs them. Screenshots of each page,
//! at desktop and phone width, are written under `target/console/`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::stack::Stack;
use common::webdriver::Browser;
use portless_api::blocking::Client;

/// Where the screenshots go.
fn shots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/console")
}

/// A stack of two loopback VMs with a second principal `viewer` (token `viewer-token`)
/// that sees vm2 only and may not read the audit log.
fn stack(name: &str) -> Stack {
    // SHA-256 of "viewer-token".
    let viewer = "\n[[principal]]\nname = \"viewer\"\n\
                  token_sha256 = \"d036bd6d01a1cae081d39a2f8dab751dc042de814fd60df31fcb553170950f29\"\n\
                  vms = [\"vm2\"]\ncommands = [\"echo\"]\n";
    let mut s = Stack::new(name, &["vm1", "vm2"], viewer);
    s.start_daemon();
    s.start_agent("vm1");
    s.start_agent("vm2");
    s.wait_ready("vm1", Duration::from_secs(15));
    s.wait_ready("vm2", Duration::from_secs(15));
    s
}

/// Opens a one-time login link and confirms it.
fn log_in(s: &Stack, b: &Browser) {
    let code = Client::new(&s.socket)
        .expect("client")
        .console_code()
        .expect("code");
    b.go(&code.url);
    let confirm = b.find("[data-test=login-confirm]", Duration::from_secs(10));
    assert_eq!(b.text("[data-test=login-principal]"), "ops");
    b.click(&confirm);
    b.find("[data-test=vm-row]", Duration::from_secs(10));
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
    assert!(b.severe_logs().is_empty(), "{:?}", b.severe_logs());
}
