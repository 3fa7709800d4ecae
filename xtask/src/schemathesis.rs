//! The schemathesis step of `cargo xtask test`: the daemon's OpenAPI document
//! (`api/openapi.json`) against a running daemon. A daemon with one plain VM and a real
//! `portless-agent` listens on a loopback TCP port; schemathesis (from PyPI, in a virtual
//! environment under `target/`) generates requests from the document with a valid token and
//! runs every check: no 500s, every status, content type, header and body as documented,
//! schema-valid requests accepted and schema-violating ones refused. Its seed is fixed, so a
//! failure here fails the same way on the next run.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use vm_harness::Processes;

use crate::step;

/// The schemathesis release the step installs.
const VERSION: &str = "4.32.5";
/// Generated cases per operation and phase.
const MAX_EXAMPLES: u32 = 100;
/// The fixed seed.
const SEED: &str = "20261202";
/// The principal's token (the daemon holds only its hash).
const TOKEN: &str = "schemathesis-token";

const AGENT_CONFIG: &str = r#"
[agent]
max_running = 16
kill_grace_ms = 300

[push]
enabled = true
max_bytes = 1048576
dir = "PUSH_DIR"
timeout_ms = 5000

[[command]]
name = "echo"
description = "Print one word"
program = "/bin/echo"
args = ["{word}"]

[[command.param]]
name = "word"
kind = "string"
charset = "a-z0-9"
max_len = 20

[[command]]
name = "sleep"
description = "Sleep a second or two"
program = "/bin/sleep"
args = ["{seconds}"]
timeout_ms = 3000

[[command.param]]
name = "seconds"
kind = "integer"
min = 1
max = 2
"#;

/// Installs schemathesis (once) in `target/schemathesis`; the path of its command.
fn install(sh: &Shell, root: &Path) -> Result<PathBuf> {
    let venv = root.join("target/schemathesis");
    let bin = venv.join("bin/schemathesis");
    if let Ok(v) = cmd!(sh, "{bin} --version").quiet().read()
        && v.trim().ends_with(VERSION)
    {
        return Ok(bin);
    }
    cmd!(sh, "python3 -m venv {venv}").run().context(
        "python3 -m venv failed: install Python 3 with venv (Debian: apt-get install python3-venv)",
    )?;
    let pip = venv.join("bin/pip");
    cmd!(
        sh,
        "{pip} install --quiet --disable-pip-version-check schemathesis=={VERSION}"
    )
    .run()
    .context("installing schemathesis from PyPI")?;
    Ok(bin)
}

/// The document as a daemon serves it: the operations whose `x-portless-servers` names
/// `daemon` (the control plane's own routes left out), as JSON text.
fn daemon_document(text: &str) -> Result<String> {
    let mut doc: serde_json::Value = serde_json::from_str(text).context("api/openapi.json")?;
    let paths = doc["paths"]
        .as_object_mut()
        .context("api/openapi.json has no paths")?;
    for item in paths.values_mut() {
        if let Some(item) = item.as_object_mut() {
            item.retain(|_, op| {
                op.get("x-portless-servers")
                    .and_then(serde_json::Value::as_array)
                    .is_none_or(|servers| servers.iter().any(|s| s == "daemon"))
            });
        }
    }
    paths.retain(|_, item| {
        item.as_object().is_some_and(|ops| {
            ops.values()
                .any(|op| op.get("x-portless-servers").is_some())
        })
    });
    Ok(serde_json::to_string_pretty(&doc)?)
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Waits until the daemon reports its VM ready (its agent attached and listed).
fn wait_ready(port: u16, dir: &Path) -> Result<()> {
    let endpoint = portless_api::Endpoint::Tcp(format!("127.0.0.1:{port}"));
    let client = portless_api::blocking::Client::at(endpoint)?.with_token(TOKEN);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client
            .vms()
            .is_ok_and(|vms| vms.iter().any(|v| v.state == portless_api::VmState::Ready));
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the VM never became ready; see {}",
                dir.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The counts of schemathesis's summary: operations tested, cases generated, failures.
fn counts(output: &str) -> (Option<u64>, Option<u64>, u64) {
    let number_after = |key: &str| {
        output.lines().find_map(|l| {
            l.trim()
                .strip_prefix(key)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.split('/').next())
                .and_then(|n| n.parse::<u64>().ok())
        })
    };
    let operations = number_after("Tested:");
    let cases = output.lines().find_map(|l| {
        let l = l.trim();
        let (n, rest) = l.split_once(' ')?;
        rest.starts_with("generated").then(|| n.parse().ok())?
    });
    let failures = output
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix('❌')
                .and_then(|rest| rest.rsplit_once(':'))
                .and_then(|(_, n)| n.trim().parse::<u64>().ok())
        })
        .sum();
    (operations, cases, failures)
}

pub(crate) fn run(sh: &Shell) -> Result<()> {
    step("schemathesis: the daemon against its OpenAPI document");
    let root = crate::project_root();
    let schemathesis = install(sh, &root)?;
    cmd!(sh, "cargo build --locked -p host-shim -p agent-linux")
        .quiet()
        .run()?;
    let dir = root.join(format!("target/tmp/schemathesis-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
    };
    std::fs::write(
        dir.join("agent.toml"),
        AGENT_CONFIG.replace("PUSH_DIR", &dir.join("pushed").display().to_string()),
    )?;
    std::fs::write(
        dir.join("host.toml"),
        format!(
            "[daemon]\nsocket = \"{d}/portless.sock\"\nstate_dir = \"{d}/state\"\n\
             tcp = \"127.0.0.1:{port}\"\ndelivery_timeout_ms = 2000\n\n\
             [budget]\nanswer_timeout_ms = 3000\n\n\
             [[vm]]\nname = \"web1\"\nchannel = \"plain\"\npath = \"{d}/web1.region\"\n\n\
             [[principal]]\nname = \"fuzz\"\ntoken_sha256 = \"{hash}\"\nvms = [\"*\"]\n\
             commands = [\"*\"]\npush = true\naudit = true\nread_all = true\ncancel_all = true\n",
            d = dir.display()
        ),
    )?;
    let bin = root.join("target/debug");
    let mut children = Processes::default();
    let log = |name: &str| std::fs::File::create(dir.join(format!("{name}.log")));
    children.push("portless serve", crate::loopback::start_daemon(&bin, &dir)?);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        if Instant::now() > deadline {
            bail!(
                "portless serve did not listen on 127.0.0.1:{port}; see {}",
                dir.join("portless.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The daemon has made the VM's region: the agent can attach.
    children.push(
        "portless-agent",
        Command::new(bin.join("portless-agent"))
            .args(["--cgroup", "off", "--shm-file"])
            .arg(dir.join("web1.region"))
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .stdout(Stdio::null())
            .stderr(log("agent")?)
            .spawn()
            .context("starting portless-agent")?,
    );
    wait_ready(port, &dir)?;
    let document = dir.join("daemon-openapi.json");
    std::fs::write(&document, daemon_document(portless_api::OPENAPI)?)?;
    let url = format!("http://127.0.0.1:{port}");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let examples = MAX_EXAMPLES.to_string();
    // In the run's own directory: schemathesis keeps a cache of failures where it runs, which
    // would make the next run depend on this one.
    let _cwd = sh.push_dir(&dir);
    // One worker: Python 3.11 keeps the AST builder's recursion depth in state shared by its
    // threads, so two workers that parse source at once (hypothesis does, to describe its
    // filters) can stop the run with "SystemError: AST constructor recursion depth mismatch"
    // (CPython gh-106905), an error of the tool and not of the daemon.
    let out = cmd!(
        sh,
        "{schemathesis} run {document} --url {url} -H {auth} --checks all --workers 1
         --max-examples {examples} --seed {SEED} --request-timeout 30 --no-color
         --exclude-path /v1/events"
    )
    .ignore_status()
    .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    std::fs::write(dir.join("schemathesis.out"), &text)?;
    drop(children);
    let (operations, cases, failures) = counts(&text);
    let show = |n: Option<u64>| n.map_or_else(|| "?".to_owned(), |n| n.to_string());
    println!(
        "schemathesis {VERSION}: {} operations, {} cases, {failures} failures (seed {SEED}; \
         output in {})",
        show(operations),
        show(cases),
        dir.join("schemathesis.out").display()
    );
    if !out.status.success() || failures > 0 {
        print!("{text}");
        bail!("schemathesis found the daemon and its OpenAPI document disagreeing");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::counts;

    #[test]
    fn the_summary_counts_are_read() {
        let ok = "API Operations:\n  Selected: 14/14\n  Tested: 14\n\nTest cases:\n  2455 generated, 2455 passed\n";
        assert_eq!(counts(ok), (Some(14), Some(2455), 0));
        let bad = "Failures:\n  ❌ ST101 Server error: 5\n  ❌ ST202 Schema-valid request rejected: 1\n\nTest cases:\n  931 generated, 7 found 7 unique failures\n  Tested: 13\n";
        assert_eq!(counts(bad), (Some(13), Some(931), 6));
    }
}
