//! `cargo xtask fuzz`: runs every cargo-fuzz target of `fuzz/` for a fixed time, starting
//! from the committed seeds, so that CI tries the decoders and the channel against a hostile
//! peer on every change.
//!
//! Inputs libFuzzer finds go to a scratch corpus under `target/`, never into the committed
//! `fuzz/corpus/`; a crash leaves its input in `fuzz/artifacts/<target>/` and fails the run.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::step;

/// The fuzz crate, its own workspace, relative to the project root.
const FUZZ_DIR: &str = "fuzz";
/// Where each target's scratch corpus lives, relative to the project root.
const SCRATCH_DIR: &str = "target/fuzz-corpus";
/// Seconds one input may run before libFuzzer reports it as a hang.
const INPUT_TIMEOUT_SECS: u64 = 10;

/// Runs every fuzz target for `seconds` seconds each (0: only the seeds, once), failing if
/// any of them crashes, hangs or cannot be built.
pub(crate) fn run(sh: &Shell, seconds: u64) -> Result<()> {
    if cmd!(sh, "cargo fuzz --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_err()
    {
        bail!("`cargo fuzz` is not installed; install it with `cargo install cargo-fuzz --locked`");
    }
    // cargo-fuzz needs unstable compiler flags (sanitizers, coverage instrumentation), and
    // only the stable toolchain is sure to be there: RUSTC_BOOTSTRAP lets stable accept them.
    let _bootstrap = sh.push_env("RUSTC_BOOTSTRAP", "1");

    let targets = targets(sh)?;
    let manifest = Path::new(FUZZ_DIR).join("Cargo.toml");
    cmd!(
        sh,
        "cargo fetch --locked --quiet --manifest-path {manifest}"
    )
    .run()
    .context(
        "fuzz/Cargo.lock is out of date: run `cargo fetch --manifest-path fuzz/Cargo.toml` \
         and commit it",
    )?;
    step("cargo fuzz build (release, debug assertions, address sanitizer)");
    cmd!(sh, "cargo fuzz build --fuzz-dir {FUZZ_DIR}").run()?;

    let mut failed = Vec::new();
    for target in &targets {
        step(&match seconds {
            0 => format!("fuzz {target}: seeds only"),
            s => format!("fuzz {target} for {s} s"),
        });
        if let Err(e) = run_target(sh, target, seconds) {
            eprintln!("fuzz target {target} failed: {e:#}");
            failed.push(target.as_str());
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz target(s) {} failed; crash inputs are in fuzz/artifacts/<target>/, and \
             `cargo fuzz run --fuzz-dir fuzz <target> <input>` (with RUSTC_BOOTSTRAP=1 on \
             stable) replays one",
            failed.join(", ")
        );
    }
    Ok(())
}

/// Runs one target from its committed seeds, adding what it finds to a fresh scratch corpus.
fn run_target(sh: &Shell, target: &str, seconds: u64) -> Result<()> {
    let scratch = Path::new(SCRATCH_DIR).join(target);
    sh.remove_path(&scratch)?;
    sh.create_dir(&scratch)?;
    let seeds = Path::new(FUZZ_DIR).join("corpus").join(target);
    // libFuzzer reads every corpus directory given and writes new inputs to the first only.
    let mut corpora = vec![scratch];
    if sh.path_exists(&seeds) {
        corpora.push(seeds);
    } else {
        println!(
            "note: {} does not exist; starting from an empty corpus",
            seeds.display()
        );
    }
    // `-max_total_time=0` would mean "forever"; 0 s means "run the seeds and stop" instead.
    let duration = match seconds {
        0 => "-runs=0".to_owned(),
        s => format!("-max_total_time={s}"),
    };
    let timeout = format!("-timeout={INPUT_TIMEOUT_SECS}");
    cmd!(
        sh,
        "cargo fuzz run --fuzz-dir {FUZZ_DIR} {target} {corpora...} -- {duration} {timeout}"
    )
    .run()?;
    Ok(())
}

/// The fuzz targets: the names of the files in `fuzz/fuzz_targets/`.
fn targets(sh: &Shell) -> Result<Vec<String>> {
    let dir: PathBuf = Path::new(FUZZ_DIR).join("fuzz_targets");
    let targets: Vec<String> = sh
        .read_dir(&dir)?
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .filter_map(|p| p.file_stem()?.to_str().map(str::to_owned))
        .collect();
    if targets.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(targets)
}
