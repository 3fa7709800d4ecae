//! `cargo xtask footprint`: builds `portless-agent` as it ships (static, musl, the `agent`
//! profile), prints its stripped size and its resident memory idle and while streaming, and
//! fails if a target is missed.

use anyhow::{Result, bail};
use xshell::{Shell, cmd};

use crate::step;

/// The target the agent ships for.
pub(crate) const MUSL: &str = "x86_64-unknown-linux-musl";
/// Largest stripped binary accepted.
const MAX_BYTES: u64 = 600 * 1024;

pub(crate) fn run(sh: &Shell) -> Result<()> {
    step("portless-agent: static build and footprint");
    cmd!(
        sh,
        "cargo build --locked -p agent-linux --profile agent --target {MUSL}"
    )
    .run()?;
    let bin = crate::project_root()
        .join("target")
        .join(MUSL)
        .join("agent/portless-agent");
    let size = std::fs::metadata(&bin)?.len();
    println!(
        "portless-agent: {} bytes ({:.0} KiB) stripped, static (target <= {} KiB): {}",
        size,
        size as f64 / 1024.0,
        MAX_BYTES / 1024,
        bin.display()
    );
    let _bin = sh.push_env("PORTLESS_AGENT_BIN", &bin);
    cmd!(
        sh,
        "cargo test --locked -p agent-linux --test footprint -- --ignored --nocapture"
    )
    .run()?;
    if size > MAX_BYTES {
        bail!("portless-agent is {size} bytes, over the {MAX_BYTES}-byte target");
    }
    Ok(())
}
