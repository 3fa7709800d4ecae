//! `cargo xtask bench [--quick] [--accel A]`: Portless against the QEMU guest agent in real
//! VMs. Builds the bench image (both agents in one guest), `portless` and `vm-bench` in
//! release mode, and runs `vm-bench` (benches/src/bin/vm-bench), which boots the VMs,
//! measures both agents side by side and writes `target/bench/summary.json`,
//! `samples.json` and `latency.svg`. A full run also updates the results in BENCHMARKS.md,
//! the ratios in README.md and `docs/bench-latency.svg`; `--quick` takes fewer samples and
//! leaves the documents alone (CI runs it to check that every measurement works).

use anyhow::{Result, bail};
use xshell::{Shell, cmd};

use crate::step;

/// Options of `bench`.
pub(crate) struct Options {
    quick: bool,
    accel: Option<String>,
}

impl Options {
    /// `--quick` with the accelerator chosen as usual.
    pub(crate) fn quick() -> Self {
        Self {
            quick: true,
            accel: None,
        }
    }

    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self {
            quick: false,
            accel: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--accel" => match it.next().map(String::as_str) {
                    Some(v @ ("auto" | "kvm" | "tcg")) => o.accel = Some(v.to_owned()),
                    other => bail!("--accel takes auto, kvm or tcg, not {other:?}"),
                },
                other => bail!("unknown option `{other}` for `bench` (--quick, --accel A)"),
            }
        }
        Ok(o)
    }
}

pub(crate) fn run(sh: &Shell, opts: &Options) -> Result<()> {
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
