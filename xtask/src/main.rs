//! `cargo xtask`: the one entry point for automation (checks, tests, fuzzing, images, VMs,
//! benches). Run `cargo xtask help` for the list.
#![forbid(unsafe_code)]

mod api_example;
mod bench;
mod footprint;
mod fuzz;
mod image;
mod loopback;
mod run;
mod schemathesis;
mod test;

use std::path::PathBuf;

use anyhow::{Result, bail};

const HELP: &str = "\
cargo xtask <command> [options]

commands:
  test [--quick]         everything CI checks: fmt, clippy -D warnings, all tests,
                         `schemathesis`, `api-example`, the browser tests and
                         `bench --console --quick`, the no_std build for thumbv7em-none-eabihf,
                         the VM tests, `run`, `bench --quick`,
                         the loom model, miri (when a nightly toolchain with miri is
                         installed) and a short fuzz run (--quick skips run, bench, loom,
                         miri and fuzzing)
  fuzz [--seconds N]     run every fuzz target for N seconds each (default 30)
  run [--keep]           boot two VMs (interrupts and polling) with `portless serve` and
                         tour the CLI; --keep leaves them up to try by hand
  loopback [--vms N] [--dir DIR]
                         run `portless serve` and N agents over shared files on this
                         machine (default 2, in target/loopback) until Ctrl-C
  bench [--quick] [--accel auto|kvm|tcg]
                         Portless against the QEMU guest agent in real VMs, side by side:
                         writes target/bench/summary.json and (not with --quick) the results
                         in BENCHMARKS.md and README.md; see BENCHMARKS.md
  bench --console [--quick]
                         the web console in headless Chromium with two loopback agents:
                         click to output beside `portless exec --follow`, first-load bytes,
                         long tasks while 16 MiB streams; writes target/bench/console.json
  fleet-sim [--hosts N] [--vms N] [--output-bytes N]
                         the fleet at scale: a real PostgreSQL, the control plane, and N
                         simulated hosts (the real host side, drivers that answer at once;
                         default 1000 x 50), one fan-out to every VM; writes
                         target/fleet-sim/summary.json; see BENCHMARKS.md
  image [--bench]        build the VM test image (kernel and initramfs) into target/vm;
                         --bench builds the benchmark's image, which adds the QEMU guest
                         agent (qemu-ga) and its virtio-serial port, into target/vm-bench
  schemathesis           the daemon against its OpenAPI document (schemathesis from PyPI, in
                         target/schemathesis), with a valid token: every check, no 500s
  api-example            docs/api.md's example (portless-api's client) against a loopback
                         daemon with three agents
  footprint              build the static portless-agent, print its size and resident
                         memory idle and streaming, check the targets
  help                   this text
";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let cmd = args.next().unwrap_or_else(|| "help".to_owned());
    let rest: Vec<String> = args.collect();
    let sh = xshell::Shell::new()?;
    sh.change_dir(project_root());
    match cmd.as_str() {
        "test" => test::run(&sh, &test::Options::parse(&rest)?),
        "fuzz" => fuzz::run(&sh, parse_seconds(&rest, 30)?),
        "footprint" => footprint::run(&sh),
        "fleet-sim" => {
            xshell::cmd!(
                sh,
                "cargo build --locked --release -p benches --bin fleet-sim"
            )
            .run()?;
            let bin = project_root().join("target/release/fleet-sim");
            xshell::cmd!(sh, "{bin} {rest...}").run()?;
            Ok(())
        }
        "schemathesis" => schemathesis::run(&sh),
        "api-example" => api_example::run(&sh),
        "image" => match rest.as_slice() {
            [] => image::build(&sh).map(|_| ()),
            [flag] if flag == "--bench" => image::build_bench(&sh).map(|_| ()),
            _ => bail!("unexpected arguments {rest:?} (expected nothing or `--bench`)"),
        },
        "run" => run::run(&sh, &run::Options::parse(&rest)?),
        "bench" => bench::run(&sh, &bench::Options::parse(&rest)?),
        "loopback" => loopback::run(&sh, &loopback::Options::parse(&rest)?),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n\n{HELP}"),
    }
}

/// The workspace root (the parent of this crate).
pub(crate) fn project_root() -> PathBuf {
    let dir = env!("CARGO_MANIFEST_DIR");
    PathBuf::from(dir)
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(dir))
}

/// `--seconds N` from `args`, or `default`.
pub(crate) fn parse_seconds(args: &[String], default: u64) -> Result<u64> {
    match args {
        [] => Ok(default),
        [flag, n] if flag == "--seconds" => n
            .parse()
            .map_err(|_| anyhow::anyhow!("--seconds takes a whole number, not `{n}`")),
        _ => bail!("unexpected arguments {args:?} (expected `--seconds N`)"),
    }
}

/// The steps begun so far: each one's name and when it began.
static STEPS: std::sync::Mutex<Vec<(String, std::time::Instant)>> =
    std::sync::Mutex::new(Vec::new());

/// Prints a step banner so that CI logs show where time goes; the step before it is
/// reported with how long it took.
pub(crate) fn step(name: &str) {
    let now = std::time::Instant::now();
    let mut steps = STEPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((last, began)) = steps.last() {
        println!("\n(`{last}` took {:.0?})", now.duration_since(*began));
    }
    steps.push((name.to_owned(), now));
    println!("\n==> {name}");
}

/// Prints how long each step took, slowest first (the last one ends now).
pub(crate) fn step_times() {
    let now = std::time::Instant::now();
    let steps = STEPS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut took: Vec<(std::time::Duration, &str)> = steps
        .iter()
        .enumerate()
        .map(|(i, (name, began))| {
            let end = steps.get(i + 1).map_or(now, |(_, next)| *next);
            (end.duration_since(*began), name.as_str())
        })
        .collect();
    took.sort_by_key(|t| std::cmp::Reverse(t.0));
    println!("\nsteps, slowest first:");
    for (d, name) in took {
        println!("{:>8.1} s  {name}", d.as_secs_f64());
    }
}
