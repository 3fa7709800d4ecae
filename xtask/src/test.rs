//! `cargo xtask test`: every check CI runs, in the order that fails fastest.

use anyhow::{Result, bail};
use xshell::{Shell, cmd};

use crate::step;

/// What `cargo xtask test` runs.
pub(crate) struct Options {
    /// Skip the slow parts (loom model, fuzzing).
    quick: bool,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut quick = false;
        for a in args {
            match a.as_str() {
                "--quick" => quick = true,
                other => bail!("unknown option `{other}` for `test`"),
            }
        }
        Ok(Self { quick })
    }
}

/// The bare-metal target that proves the guest-side crates are `no_std` without `alloc`.
const BARE_METAL: &str = "thumbv7em-none-eabihf";

pub(crate) fn run(sh: &Shell, opts: &Options) -> Result<()> {
    let started = std::time::Instant::now();
    step("cargo fmt --check");
    cmd!(sh, "cargo fmt --all -- --check").run()?;
    cmd!(
        sh,
        "cargo fmt --manifest-path fuzz/Cargo.toml --all -- --check"
    )
    .run()?;

    step("cargo clippy -D warnings");
    cmd!(
        sh,
        "cargo clippy --workspace --all-targets --locked -- -D warnings"
    )
    .run()?;

    step("cargo doc -D warnings");
    {
        let _flags = sh.push_env("RUSTDOCFLAGS", "-D warnings");
        cmd!(sh, "cargo doc --workspace --no-deps --locked")
            .quiet()
            .run()?;
    }

    step("cargo test");
    cmd!(sh, "cargo test --workspace --locked").run()?;

    crate::schemathesis::run(sh)?;
    crate::api_example::run(sh)?;

    step("the web console in a real browser: Chromium headless over chromedriver");
    cmd!(
        sh,
        "cargo test --locked -p host-shim --test browser -- --ignored --test-threads 1 --nocapture"
    )
    .run()?;
    crate::bench::console(sh, true)?;

    // The fuzz harness is a workspace of its own: lint and test it here, so that an API change
    // breaks the build at once rather than at the fuzzing step.
    step("fuzz harness: clippy and tests");
    cmd!(
        sh,
        "cargo clippy --manifest-path fuzz/Cargo.toml --all-targets --locked -- -D warnings"
    )
    .run()?;
    cmd!(sh, "cargo test --manifest-path fuzz/Cargo.toml --locked").run()?;

    step(&format!("no_std build for {BARE_METAL}"));
    cmd!(
        sh,
        "cargo build --locked -p ring-protocol -p agent-core --target {BARE_METAL}"
    )
    .run()?;

    crate::footprint::run(sh)?;

    let image = crate::image::build(sh)?;
    step("VM tests: the agent on ivshmem-plain (polling) and ivshmem-doorbell (VFIO interrupts)");
    {
        let _vm = sh.push_env("PORTLESS_VM_DIR", &image.dir);
        cmd!(
            sh,
            "cargo test --locked -p agent-linux --test vm -- --ignored --test-threads 1 --nocapture"
        )
        .run()?;
    }
    step("VM tests: portless serve with a doorbell VM and a plain VM, through its API");
    {
        let _vm = sh.push_env("PORTLESS_VM_DIR", &image.dir);
        cmd!(
            sh,
            "cargo test --locked -p host-shim --test vm -- --ignored --test-threads 1 --nocapture"
        )
        .run()?;
    }

    if !opts.quick {
        step("cargo xtask run: the README's first command, end to end");
        crate::run::run(sh, &crate::run::Options::default())?;
    }

    if !opts.quick {
        step("cargo xtask bench --quick: every measurement against qemu-ga works");
        crate::bench::run(sh, &crate::bench::Options::quick())?;
    }

    if !opts.quick {
        step("loom model of the notify/sleep race");
        let _flags = sh.push_env("RUSTFLAGS", "--cfg loom");
        let _dir = sh.push_env("CARGO_TARGET_DIR", "target/loom");
        cmd!(
            sh,
            "cargo test --locked --release -p ring-protocol --test loom"
        )
        .run()?;
    }

    if !opts.quick {
        miri(sh)?;
    }

    if !opts.quick {
        step("fuzzing (20 s per target)");
        crate::fuzz::run(sh, 20)?;
    }

    crate::step_times();
    println!("\nall checks passed in {:.0?}", started.elapsed());
    Ok(())
}

/// Runs the ring-protocol unit tests (the region accessors, the rings, a two-thread stream)
/// under miri, which checks the `unsafe` code and reports data races. Miri needs a nightly
/// toolchain; where none with miri is installed this step says so and is skipped.
fn miri(sh: &Shell) -> Result<()> {
    step("miri on ring-protocol's unsafe code and rings");
    if cmd!(sh, "cargo +nightly miri --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_err()
    {
        println!(
            "skipped: no nightly toolchain with miri \
             (`rustup toolchain install nightly --profile minimal -c miri,rust-src`)"
        );
        return Ok(());
    }
    let _dir = sh.push_env("CARGO_TARGET_DIR", "target/miri");
    cmd!(sh, "cargo +nightly miri test -p ring-protocol --lib").run()?;
    Ok(())
}
