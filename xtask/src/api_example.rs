//! The API crate's example (`api/examples/follow.rs`, shown in `docs/api.md`) run against a
//! loopback daemon with three agents: it must list the VMs, run `uname` on the VMs
//! labelled `role=web` (vm1 and vm3, not vm2) and follow their output to the end.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::loopback;
use crate::step;

pub(crate) fn run(sh: &Shell) -> Result<()> {
    step("docs/api.md's example: portless-api's client against a loopback daemon");
    cmd!(
        sh,
        "cargo build --locked -p host-shim -p agent-linux -p portless-api --example follow"
    )
    .run()?;
    let root = crate::project_root();
    let source = std::fs::read_to_string(root.join("api/examples/follow.rs"))?;
    let doc = std::fs::read_to_string(root.join("docs/api.md"))?;
    if !doc.contains(&format!("```rust\n{source}```")) {
        bail!("docs/api.md does not show api/examples/follow.rs as it is; copy it over");
    }
    let bin = root.join("target/debug");
    let dir = root.join("target/api-example");
    let _ = std::fs::remove_dir_all(&dir);
    let running = loopback::start(sh, &bin, &dir, 3)?;
    let client = portless_api::blocking::Client::new(&running.socket)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .vms()
        .is_ok_and(|vms| vms.iter().all(|v| v.state == portless_api::VmState::Ready))
    {
        if Instant::now() > deadline {
            bail!(
                "the agents never became ready; see the logs in {}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = Command::new(bin.join("examples/follow"))
        .arg(&running.socket)
        .args(["role=web", "uname"])
        .output()
        .context("running the example")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    if !output.status.success() {
        bail!(
            "the example failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let kernel = cmd!(sh, "uname -s").read()?;
    for want in [
        "vm vm1 ready [role=web]".to_owned(),
        "vm vm2 ready [role=db]".to_owned(),
        format!("vm1: {kernel}"),
        format!("vm3: {kernel}"),
    ] {
        if !stdout.lines().any(|l| l.starts_with(&want)) {
            bail!("the example's output has no line starting {want:?}");
        }
    }
    let ended = stdout
        .lines()
        .filter(|l| l.contains("ended succeeded (exit code 0)"))
        .count();
    if ended != 2 || stdout.lines().any(|l| l.starts_with("vm2:")) {
        bail!("the example should have run on vm1 and vm3 only, to success");
    }
    Ok(())
}
