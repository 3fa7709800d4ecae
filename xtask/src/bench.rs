//! `cargo xtask bench [--quick] [--accel A]`: Portless against the QEMU guest agent in real
//! VMs. Builds the bench image (both agents in one guest), `portless` and `vm-bench` in
//! release mode, and runs `vm-bench` (benches/src/bin/vm-bench), which boots the VMs,
//! measures both agents side by side and writes `target/bench/summary.json`,
//! `samples.json` and `latency.svg`. A full run also updates the results in BENCHMARKS.md,
//! the ratios in README.md and `docs/bench-latency.svg`; `--quick` takes fewer samples and
//! leaves the documents alone (CI runs it to check that every measurement works).
//!
//! `cargo xtask bench --console [--quick]` measures the web console instead, in headless
//! Chromium against loopback agents (host-shim/benches/console.rs): click to output beside
//! `portless exec --follow`, the first load's bytes, and long tasks while 16 MiB streams. It
//! writes `target/bench/console.json`.

use anyhow::{Result, bail};
use xshell::{Shell, cmd};

use crate::step;

/// Options of `bench`.
pub(crate) struct Options {
    quick: bool,
    accel: Option<String>,
    console: bool,
}

impl Options {
    /// `--quick` with the accelerator chosen as usual.
    pub(crate) fn quick() -> Self {
        Self {
            quick: true,
            accel: None,
            console: false,
        }
    }

    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self {
            quick: false,
            accel: None,
            console: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--console" => o.console = true,
                "--accel" => match it.next().map(String::as_str) {
                    Some(v @ ("auto" | "kvm" | "tcg")) => o.accel = Some(v.to_owned()),
                    other => bail!("--accel takes auto, kvm or tcg, not {other:?}"),
                },
                other => {
                    bail!("unknown option `{other}` for `bench` (--quick, --accel A, --console)")
                }
            }
        }
        Ok(o)
    }
}

pub(crate) fn run(sh: &Shell, opts: &Options) -> Result<()> {
    if opts.console {
        return console(sh, opts.quick);
    }
    let image = crate::image::build_bench(sh)?;
    step("building portless and vm-bench (release)");
    cmd!(
        sh,
        "cargo build --locked --release -p host-shim --bin portless -p benches --bin vm-bench"
    )
    .run()?;
    let root = crate::project_root();
    let bin = root.join("target/release");
    let mut args = vec![
        "--image".to_owned(),
        image.dir.display().to_string(),
        "--portless".to_owned(),
        bin.join("portless").display().to_string(),
        "--out".to_owned(),
        root.join("target/bench").display().to_string(),
    ];
    if let Some(a) = &opts.accel {
        args.extend(["--accel".to_owned(), a.clone()]);
    }
    args.push(if opts.quick { "--quick" } else { "--docs" }.to_owned());
    step(if opts.quick {
        "vm-bench --quick: Portless and qemu-ga side by side"
    } else {
        "vm-bench: Portless and qemu-ga side by side"
    });
    let vm_bench = bin.join("vm-bench");
    cmd!(sh, "{vm_bench} {args...}").run()?;
    Ok(())
}

/// The web console's benchmark: the agent in release mode beside the bench, which cargo
/// builds with `portless` itself.
pub(crate) fn console(sh: &Shell, quick: bool) -> Result<()> {
    step("building portless-agent (release)");
    cmd!(
        sh,
        "cargo build --locked --release -p agent-linux --bin portless-agent"
    )
    .run()?;
    step(if quick {
        "the console's benchmark, --quick: Chromium against two loopback agents"
    } else {
        "the console's benchmark: Chromium against two loopback agents"
    });
    let quick = quick.then_some("--quick");
    cmd!(
        sh,
        "cargo bench --locked -p host-shim --bench console -- {quick...}"
    )
    .run()?;
    Ok(())
}
