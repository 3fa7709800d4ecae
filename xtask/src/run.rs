//! `cargo xtask run [--keep]`: Portless end to end on real VMs. Builds the image, starts
//! `portless serve`, boots two QEMU guests (one `ivshmem-doorbell` VM on q35 with a virtual
//! IOMMU whose agent is woken by VFIO interrupts, one `ivshmem-plain` VM whose agent polls),
//! with KVM when it works and TCG otherwise, and takes a short tour through the `portless`
//! CLI. Then it stops everything, unless `--keep`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use vm_harness::{Guest, Ivshmem, Processes};

use crate::step;

/// Options of `run`.
#[derive(Default)]
pub(crate) struct Options {
    keep: bool,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut keep = false;
        for a in args {
            match a.as_str() {
                "--keep" => keep = true,
                other => bail!("unknown option `{other}` for `run` (--keep)"),
            }
        }
        Ok(Self { keep })
    }
}

fn host_toml(dir: &Path, uid: &str) -> String {
    format!(
        "# Written by `cargo xtask run`.\n[daemon]\nsocket = \"{d}/portless.sock\"\nstate_dir = \"{d}/state\"\n\n\
         [[vm]]\nname = \"vmd\"\nlabels = {{ wakeup = \"interrupts\" }}\nchannel = \"doorbell\"\nsocket = \"{d}/vmd.ivshmem\"\nsize = \"1M\"\n\n\
         [[vm]]\nname = \"vmp\"\nlabels = {{ wakeup = \"polling\" }}\nchannel = \"plain\"\npath = \"{d}/vmp.region\"\nsize = \"1M\"\n\n\
         [[principal]]\nname = \"you\"\nuids = [{uid}]\nvms = [\"*\"]\ncommands = [\"*\"]\npush = true\naudit = true\n",
        d = dir.display()
    )
}

/// Whether KVM is there to try (whether it works is found by booting).
fn kvm_available() -> bool {
    std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn boot(dir: &Path, image: &Path, accel: &str, vm: &str) -> Result<Child> {
    let ivshmem = if vm == "vmd" {
        Ivshmem::Doorbell {
            socket: dir.join("vmd.ivshmem"),
        }
    } else {
        Ivshmem::Plain {
            file: dir.join("vmp.region"),
            size: 1 << 20,
        }
    };
    let file = |ext: &str| dir.join(format!("{vm}.{ext}"));
    Guest::new(image, ivshmem)
        .accel(accel)
        .spawn(&file("console"), Some(&file("qemu-err")))
        .context("starting qemu-system-x86_64")
}

/// The CLI, pointed at the daemon of this run.
fn portless(bin: &Path, socket: &Path) -> Command {
    let mut c = Command::new(bin.join("portless"));
    c.env("PORTLESS_SOCKET", socket);
    c
}

/// Runs one CLI command of the tour, echoing it; returns its stdout.
fn tour(bin: &Path, socket: &Path, args: &[&str]) -> Result<String> {
    println!("\n$ portless {}", args.join(" "));
    let out = portless(bin, socket)
        .args(args)
        .stderr(Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{text}");
    if !out.status.success() {
        println!("(exit status {})", out.status.code().unwrap_or(-1));
    }
    Ok(text)
}

/// Waits until both VMs' agents have greeted the daemon (or `limit` passes).
fn wait_ready(bin: &Path, socket: &Path, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(out) = portless(bin, socket).args(["--json", "vms"]).output() {
            let text = String::from_utf8_lossy(&out.stdout);
            if text.matches("\"ready\"").count() >= 2 {
                return Some(start.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

pub(crate) fn run(sh: &Shell, opts: &Options) -> Result<()> {
    let image = crate::image::build(sh)?;
    step("building portless");
    cmd!(sh, "cargo build --locked -p host-shim").run()?;
    let root = crate::project_root();
    let bin = root.join("target/debug");
    let dir: PathBuf = root.join("target/run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let uid = cmd!(sh, "id -u").read()?;
    std::fs::write(dir.join("host.toml"), host_toml(&dir, &uid))?;
    let socket = dir.join("portless.sock");

    let mut procs = Processes::default();
    step("starting portless serve");
    let serve = Command::new(bin.join("portless"))
        .args(["serve", "--config"])
        .arg(dir.join("host.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("portless.log"))?)
        .spawn()
        .context("starting portless serve")?;
    procs.push("serve", serve);
    if !vm_harness::wait_for_socket(&socket, Duration::from_secs(15)) {
        bail!(
            "portless serve did not start; see {}",
            dir.join("portless.log").display()
        );
    }

    // KVM if it works (try it), else TCG.
    let accels: &[&str] = if kvm_available() {
        &["kvm", "tcg"]
    } else {
        &["tcg"]
    };
    let mut booted = None;
    for accel in accels {
        step(&format!("booting two VMs with {accel}"));
        let started = Instant::now();
        for vm in ["vmd", "vmp"] {
            procs.push(vm, boot(&dir, &image.dir, accel, vm)?);
        }
        let limit = if *accel == "kvm" {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(120)
        };
        if let Some(ready) = wait_ready(&bin, &socket, limit) {
            booted = Some((*accel, started, ready));
            break;
        }
        println!("no agent answered with {accel} within {limit:?}; stopping those VMs");
        procs.stop("vmd");
        procs.stop("vmp");
    }
    let Some((accel, started, ready)) = booted else {
        bail!("the VMs did not come up; consoles are in {}", dir.display());
    };

    step("a tour through the portless CLI");
    tour(&bin, &socket, &["vms"])?;
    tour(&bin, &socket, &["exec", "vmd", "uname", "--follow"])?;
    let to_first = started.elapsed();
    tour(&bin, &socket, &["commands", "vmd"])?;
    tour(&bin, &socket, &["exec", "vmp", "sysinfo", "--follow"])?;
    tour(&bin, &socket, &["exec", "--all", "self-test", "--wait"])?;
    let out = tour(&bin, &socket, &["--json", "exec", "vmp", "sleep", "600"])?;
    if let Some(id) = out.split("\"id\":").nth(1).and_then(|r| {
        r.split(|c: char| !c.is_ascii_digit())
            .find(|s| !s.is_empty())
    }) {
        tour(&bin, &socket, &["cancel", id])?;
        std::thread::sleep(Duration::from_millis(500));
        tour(&bin, &socket, &["status", id])?;
    }
    let script = dir.join("hello.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"hello from a pushed script on $(uname -n), pid $$\"\n",
    )?;
    let script = script.display().to_string();
    let pushed = tour(&bin, &socket, &["push", "vmd", &script, "--run"])?;
    let id = pushed
        .split("execution ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next());
    if let Some(id) = id.filter(|i| !i.is_empty()) {
        std::thread::sleep(Duration::from_millis(500));
        tour(&bin, &socket, &["output", id])?;
    }
    tour(&bin, &socket, &["exec", "vmd", "fail", "--wait"])?;
    tour(&bin, &socket, &["ping", "vmd", "--count", "5"])?;
    tour(&bin, &socket, &["ping", "vmp", "--count", "5"])?;
    tour(&bin, &socket, &["metrics", "vmd"])?;
    tour(&bin, &socket, &["audit", "--limit", "12"])?;

    println!(
        "\nstartup ({accel}): QEMU start to both agents' hello {:.2?}; to the first completed command {:.2?}",
        ready, to_first
    );
    if opts.keep {
        println!(
            "\nThe VMs are up. Try the CLI by hand:\n\n  export PORTLESS_SOCKET={}\n  export PATH={}:$PATH\n  portless vms\n\nCtrl-C stops everything (consoles and logs in {}).",
            socket.display(),
            bin.display(),
            dir.display()
        );
        loop {
            std::thread::sleep(Duration::from_millis(500));
            if let Some((name, status)) = procs.exited() {
                bail!("{name} exited ({status}); see {}", dir.display());
            }
        }
    }
    step("stopping the VMs and the daemon");
    drop(procs);
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    println!("done: nothing left running, {} removed", dir.display());
    Ok(())
}
