//! `cargo xtask loopback [--vms N] [--dir DIR]`: Portless on this machine without VMs: the
//! `portless serve` daemon and N `portless-agent --shm-file` processes, each agent standing in
//! for a VM's guest, with the example allow-list. Runs in the foreground until Ctrl-C and
//! prints how to point the CLI at it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use vm_harness::Processes;

use crate::step;

/// Options of `loopback`.
pub(crate) struct Options {
    vms: usize,
    dir: PathBuf,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self {
            vms: 2,
            dir: crate::project_root().join("target/loopback"),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--vms" => {
                    let v = it.next().context("--vms needs a number")?;
                    o.vms = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .with_context(|| format!("--vms takes 1..64, not `{v}`"))?;
                }
                "--dir" => o.dir = PathBuf::from(it.next().context("--dir needs a path")?),
                other => bail!("unknown option `{other}` for `loopback` (--vms N, --dir DIR)"),
            }
        }
        Ok(o)
    }
}

/// Starts `portless serve` from `bin` with `dir/host.toml`, logging to `dir/portless.log`.
pub(crate) fn start_daemon(bin: &Path, dir: &Path) -> Result<std::process::Child> {
    Command::new(bin.join("portless"))
        .arg("serve")
        .arg("--config")
        .arg(dir.join("host.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("portless.log"))?)
        .spawn()
        .context("starting portless serve")
}

fn host_toml(dir: &Path, vms: usize, uid: &str) -> String {
    let mut s = format!(
        "# Written by `cargo xtask loopback`.\n[daemon]\nsocket = \"{0}/portless.sock\"\nstate_dir = \"{0}/state\"\n",
        dir.display()
    );
    for n in 1..=vms {
        let role = if n % 2 == 1 { "web" } else { "db" };
        let _ = write!(
            s,
            "\n[[vm]]\nname = \"vm{n}\"\nlabels = {{ role = \"{role}\" }}\nchannel = \"plain\"\npath = \"{}/vm{n}.region\"\n",
            dir.display()
        );
    }
    let _ = write!(
        s,
        "\n[[principal]]\nname = \"you\"\nuids = [{uid}]\nvms = [\"*\"]\ncommands = [\"*\"]\npush = true\naudit = true\n"
    );
    s
}

/// A loopback daemon and its agents, running until dropped.
pub(crate) struct Loopback {
    /// The daemon and the agents (stopped on drop).
    pub(crate) children: Processes,
    /// The daemon's unix socket.
    pub(crate) socket: PathBuf,
}

/// Starts, from the binaries in `bin`, `portless serve` and `vms` agents in `dir`, with the
/// example allow-list; returns once the daemon's socket answers.
pub(crate) fn start(sh: &Shell, bin: &Path, dir: &Path, vms: usize) -> Result<Loopback> {
    let root = crate::project_root();
    std::fs::create_dir_all(dir)?;
    for n in 1..=vms {
        let _ = std::fs::remove_file(dir.join(format!("vm{n}.region")));
    }
    let uid = cmd!(sh, "id -u").read()?;
    std::fs::write(dir.join("host.toml"), host_toml(dir, vms, &uid))?;
    // Switching users needs root: without it, the example's `user`/`group` lines go.
    let example = std::fs::read_to_string(root.join("examples/allow-list.toml"))?;
    let allow_list = if uid == "0" {
        example
    } else {
        example
            .lines()
            .filter(|l| {
                !l.trim_start().starts_with("user =") && !l.trim_start().starts_with("group =")
            })
            .map(|l| format!("{l}\n"))
            .collect()
    };
    std::fs::write(dir.join("allow-list.toml"), allow_list)?;

    let mut children = Processes::default();
    let log = |name: &str| -> Result<std::fs::File> {
        Ok(std::fs::File::create(dir.join(format!("{name}.log")))?)
    };
    children.push("portless serve", start_daemon(bin, dir)?);
    let socket = dir.join("portless.sock");
    if !vm_harness::wait_for_socket(&socket, Duration::from_secs(15)) {
        bail!(
            "portless serve did not start; see {}",
            dir.join("portless.log").display()
        );
    }
    for n in 1..=vms {
        children.push(
            &format!("portless-agent vm{n}"),
            Command::new(bin.join("portless-agent"))
                .arg("--cgroup")
                .arg("off")
                .arg("--shm-file")
                .arg(dir.join(format!("vm{n}.region")))
                .arg("--config")
                .arg(dir.join("allow-list.toml"))
                .stdout(Stdio::null())
                .stderr(log(&format!("agent-vm{n}"))?)
                .spawn()
                .context("starting portless-agent")?,
        );
    }
    Ok(Loopback { children, socket })
}

pub(crate) fn run(sh: &Shell, opts: &Options) -> Result<()> {
    step("building portless and portless-agent");
    cmd!(sh, "cargo build --locked -p host-shim -p agent-linux").run()?;
    let bin = crate::project_root().join("target/debug");
    let dir = &opts.dir;
    let Loopback {
        mut children,
        socket,
    } = start(sh, &bin, dir, opts.vms)?;
    println!(
        "\nPortless loopback: daemon and {} agents running (logs in {}).\n\nPoint the CLI at it:\n\n  export PORTLESS_SOCKET={}\n  export PATH={}:$PATH\n  portless vms\n  portless commands vm1\n  portless exec vm1 uname --wait\n  portless exec --all sleep 2 --follow\n  portless exec vm1 fail --wait; echo \"exit $?\"\n\nCtrl-C stops everything.",
        opts.vms,
        dir.display(),
        socket.display(),
        bin.display()
    );
    // Foreground until interrupted or a child dies.
    loop {
        std::thread::sleep(Duration::from_millis(200));
        if let Some((name, status)) = children.exited() {
            bail!(
                "{name} exited ({status}); see the logs in {}",
                dir.display()
            );
        }
    }
}
