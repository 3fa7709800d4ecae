//! `cargo xtask image`: a minimal bootable guest for the VM tests: Debian's cloud kernel
//! (downloaded once with `apt-get download` into `target/vm-cache/`, never committed) and an
//! initramfs with busybox, the static `portless-agent`, its allow-list (`image/allow-list.toml`), the VFIO
//! modules and an `/init` that starts the agent. Written to `target/vm/`.
//!
//! `cargo xtask image --bench`: the same guest plus the QEMU guest agent, for the benchmark
//! that compares the two agents in one VM: Debian's `qemu-ga` with exactly the shared
//! libraries it loads (also cached in `target/vm-cache/`) and the virtio console modules its
//! port needs. Written to `target/vm-bench/`; the same `/init` starts both agents.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

use crate::footprint::MUSL;
use crate::step;

/// The kernel package the image is built from; if the archive no longer has it, the newest
/// `linux-image-6.1.0-*-cloud-amd64` is used.
const KERNEL_PACKAGE: &str = "linux-image-6.1.0-56-cloud-amd64";
/// Modules for VFIO interrupts, in load order (each depends on the ones before).
const MODULES: &[&str] = &[
    "kernel/virt/lib/irqbypass.ko",
    "kernel/drivers/vfio/vfio.ko",
    "kernel/drivers/vfio/vfio_iommu_type1.ko",
    "kernel/drivers/vfio/vfio_virqfd.ko",
    "kernel/drivers/vfio/pci/vfio-pci-core.ko",
    "kernel/drivers/vfio/pci/vfio-pci.ko",
];
/// Modules for a virtio-serial port (qemu-ga's channel), in load order (each depends only on
/// the ones before). Bench image only.
const VIRTIO_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/drivers/char/virtio_console.ko",
];
/// The Debian package of the QEMU guest agent; its dependencies come from `apt-cache depends`.
const QEMU_GA_PACKAGE: &str = "qemu-guest-agent";
/// Where qemu-ga lives, in its package and in the image.
const QEMU_GA: &str = "usr/sbin/qemu-ga";
/// Where the image keeps qemu-ga's libraries (and the loader the interpreter path points to).
const LIB_DIR: &str = "lib/x86_64-linux-gnu";
/// Where a soname is looked up in the unpacked packages, in order.
const LIB_SEARCH: &[&str] = &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"];
const INIT: &str = include_str!("image/init.sh");
/// The image's allow-list: useful commands, push enabled.
const ALLOW_LIST: &str = include_str!("image/allow-list.toml");

/// Debian packages the VM tooling needs, and the command each provides.
pub(crate) const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
];

/// Tools only the bench image needs (to unpack qemu-ga and walk its libraries), and the
/// Debian package of each.
const BENCH_TOOLS: &[(&str, &str)] = &[
    ("readelf", "binutils"),
    ("apt-cache", "apt"),
    ("dpkg", "dpkg"),
];

/// Installs missing tools with apt-get when root on Debian; otherwise says what to install.
pub(crate) fn ensure_tools(sh: &Shell) -> Result<()> {
    ensure(sh, TOOLS)
}

/// Installs the packages of the missing `tools` (command, package) with apt-get when root on
/// Debian; otherwise says what to install.
fn ensure(sh: &Shell, tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| {
            cmd!(sh, "which {bin}")
                .quiet()
                .ignore_stdout()
                .run()
                .is_err()
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let root = cmd!(sh, "id -u")
        .quiet()
        .read()
        .map(|u| u == "0")
        .unwrap_or(false);
    if !root
        || cmd!(sh, "which apt-get")
            .quiet()
            .ignore_stdout()
            .run()
            .is_err()
    {
        bail!(
            "missing tools: install the Debian packages {} (apt-get install -y {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    step(&format!("installing {}", missing.join(" ")));
    cmd!(sh, "apt-get update -q").run()?;
    cmd!(sh, "apt-get install -y -q {missing...}")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()?;
    Ok(())
}

/// The image's files.
pub(crate) struct Image {
    /// The folder with `vmlinuz`, `initrd.gz` and the initramfs tree `root/`.
    pub(crate) dir: PathBuf,
}

/// Which image to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    /// `target/vm/`: portless-agent alone, for the VM tests.
    Test,
    /// `target/vm-bench/`: also qemu-ga and the virtio console, for the agent comparison.
    Bench,
}

impl Flavour {
    /// The output folder, relative to the project root.
    fn dir(self) -> &'static str {
        match self {
            Self::Test => "target/vm",
            Self::Bench => "target/vm-bench",
        }
    }

    /// The kernel modules in the image, as paths under `lib/modules/<version>/`.
    fn modules(self) -> Vec<&'static str> {
        match self {
            Self::Test => MODULES.to_vec(),
            Self::Bench => VIRTIO_MODULES.iter().chain(MODULES).copied().collect(),
        }
    }
}

fn kernel_tree(sh: &Shell, cache: &Path) -> Result<PathBuf> {
    let tree = cache.join("kernel");
    if tree.join("boot").exists() {
        return Ok(tree);
    }
    sh.create_dir(cache)?;
    let _dir = sh.push_dir(cache);
    let mut package = KERNEL_PACKAGE.to_owned();
    // Not in the archive any more: the newest 6.1 cloud kernel instead.
    if apt_download(sh, std::slice::from_ref(&package)).is_err() {
        let list = cmd!(
            sh,
            "apt-cache search --names-only ^linux-image-6.1.0-[0-9]+-cloud-amd64$"
        )
        .read()?;
        let mut names: Vec<&str> = list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        names.sort_by_key(|n| {
            n.split('-')
                .nth(4)
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        package = names
            .last()
            .context("no linux-image-*-cloud-amd64 package in the apt index")?
            .to_string();
        cmd!(sh, "apt-get download {package}").run()?;
    }
    let deb = sh
        .read_dir(cache)?
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&package) && n.ends_with(".deb"))
        })
        .context("downloaded kernel package not found")?;
    let tmp = cache.join("kernel.tmp");
    let _ = sh.remove_path(&tmp);
    cmd!(sh, "dpkg -x {deb} {tmp}").run()?;
    sh.remove_path(&deb)?;
    std::fs::rename(&tmp, &tree)?;
    Ok(tree)
}

/// `apt-get download`s `packages` into the current directory; if that fails, updates the
/// package index (it may be missing or stale on a new machine) and tries once more.
fn apt_download(sh: &Shell, packages: &[String]) -> Result<()> {
    if cmd!(sh, "apt-get download -q {packages...}").run().is_ok() {
        return Ok(());
    }
    cmd!(sh, "apt-get update -q").run()?;
    cmd!(sh, "apt-get download -q {packages...}").run()?;
    Ok(())
}

/// Debian's `qemu-guest-agent` and every package it depends on, unpacked into one tree
/// (`target/vm-cache/qemu-ga/`) the first time and reused after.
fn qemu_ga_tree(sh: &Shell, cache: &Path) -> Result<PathBuf> {
    let tree = cache.join("qemu-ga");
    if tree.join(QEMU_GA).exists() {
        return Ok(tree);
    }
    sh.create_dir(cache)?;
    let debs = cache.join("qemu-ga.debs");
    let _ = sh.remove_path(&debs);
    sh.create_dir(&debs)?;
    {
        let _dir = sh.push_dir(&debs);
        apt_download(sh, &qemu_ga_packages(sh)?)
            .context("downloading qemu-guest-agent and its dependencies")?;
    }
    let tmp = cache.join("qemu-ga.tmp");
    let _ = sh.remove_path(&tmp);
    for deb in sh.read_dir(&debs)? {
        if deb.extension().is_some_and(|e| e == "deb") {
            cmd!(sh, "dpkg -x {deb} {tmp}").run()?;
        }
    }
    sh.remove_path(&debs)?;
    if !tmp.join(QEMU_GA).exists() {
        bail!("no {QEMU_GA} in the unpacked {QEMU_GA_PACKAGE} package");
    }
    std::fs::rename(&tmp, &tree)?;
    Ok(tree)
}

/// `qemu-guest-agent` and the packages it depends on, recursively, from `apt-cache depends`
/// (real packages of this architecture only).
fn qemu_ga_packages(sh: &Shell) -> Result<Vec<String>> {
    let tree = cmd!(
        sh,
        "apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks
            --no-replaces --no-enhances --no-pre-depends {QEMU_GA_PACKAGE}"
    )
    .read()?;
    // Package names start a line; their dependencies are indented under them.
    let packages: BTreeSet<String> = tree
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('<') && !l.contains(':'))
        .map(str::to_owned)
        .collect();
    if !packages.contains(QEMU_GA_PACKAGE) {
        bail!("apt-cache depends does not know {QEMU_GA_PACKAGE}");
    }
    Ok(packages.into_iter().collect())
}

/// `readelf` on `elf` with `option` (`-d`, `-l`), in the C locale so the output parses.
fn readelf(sh: &Shell, option: &str, elf: &Path) -> Result<String> {
    cmd!(sh, "readelf {option} {elf}")
        .env("LC_ALL", "C")
        .quiet()
        .read()
        .with_context(|| format!("readelf {option} {}", elf.display()))
}

/// The text between the first `[` and the next `]` of `line`.
fn bracketed(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once('[')?;
    rest.split_once(']').map(|(inside, _)| inside)
}

/// The sonames `elf` needs directly (its `DT_NEEDED` entries).
fn needed(sh: &Shell, elf: &Path) -> Result<Vec<String>> {
    Ok(readelf(sh, "-d", elf)?
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(bracketed)
        .map(str::to_owned)
        .collect())
}

/// The program interpreter (`PT_INTERP`) of `elf`, such as `/lib64/ld-linux-x86-64.so.2`.
fn interpreter(sh: &Shell, elf: &Path) -> Result<String> {
    readelf(sh, "-l", elf)?
        .lines()
        .filter_map(bracketed)
        .find_map(|b| b.strip_prefix("Requesting program interpreter: "))
        .map(str::to_owned)
        .with_context(|| format!("{} has no program interpreter", elf.display()))
}

/// `path` with its symlinks followed inside `root` (an absolute target is taken relative to
/// `root`, as it would be in the guest, never on this machine).
fn resolve_in(root: &Path, mut path: PathBuf) -> Result<PathBuf> {
    for _ in 0..16 {
        let meta = path
            .symlink_metadata()
            .with_context(|| format!("{} is missing", path.display()))?;
        if !meta.file_type().is_symlink() {
            return Ok(path);
        }
        let target = std::fs::read_link(&path)?;
        path = match target.strip_prefix("/") {
            Ok(inside) => root.join(inside),
            Err(_) => path
                .parent()
                .context("symlink without a parent")?
                .join(target),
        };
    }
    bail!("too many levels of symlinks at {}", path.display())
}

/// The real file behind `soname` in the unpacked packages at `root`.
fn find_library(root: &Path, soname: &str) -> Result<PathBuf> {
    let path = LIB_SEARCH
        .iter()
        .map(|dir| root.join(dir).join(soname))
        .find(|p| p.symlink_metadata().is_ok())
        .with_context(|| {
            format!(
                "qemu-ga needs {soname}, which no unpacked package has (looked in {} under {})",
                LIB_SEARCH.join(" and "),
                root.display()
            )
        })?;
    resolve_in(root, path)
}

/// Copies qemu-ga from the unpacked packages at `from` into the image tree `to`, with every
/// library it loads (its `DT_NEEDED`, recursively) in [`LIB_DIR`] under its soname and its
/// interpreter path linked to the loader there. Prints what was added.
fn add_qemu_ga(sh: &Shell, from: &Path, to: &Path) -> Result<()> {
    let exe = from.join(QEMU_GA);
    sh.create_dir(to.join("usr/sbin"))?;
    sh.create_dir(to.join(LIB_DIR))?;
    sh.copy_file(&exe, to.join(QEMU_GA))?;
    let interp = interpreter(sh, &exe)?;
    let (interp_dir, loader) = interp
        .rsplit_once('/')
        .with_context(|| format!("interpreter `{interp}` is not a path"))?;

    let mut queue = needed(sh, &exe)?;
    queue.push(loader.to_owned());
    let mut copied = BTreeSet::new();
    let mut bytes = 0;
    while let Some(soname) = queue.pop() {
        if copied.contains(&soname) {
            continue;
        }
        let file = find_library(from, &soname)?;
        sh.copy_file(&file, to.join(LIB_DIR).join(&soname))?;
        bytes += std::fs::metadata(&file)?.len();
        queue.extend(needed(sh, &file)?);
        copied.insert(soname);
    }

    // The interpreter path (Debian: /lib64/ld-linux-x86-64.so.2) links to the loader, as on
    // Debian itself.
    let interp_dir = interp_dir.trim_start_matches('/');
    if interp_dir != LIB_DIR {
        let link = to.join(interp_dir).join(loader);
        sh.create_dir(to.join(interp_dir))?;
        let up = "../".repeat(interp_dir.split('/').filter(|c| !c.is_empty()).count());
        std::os::unix::fs::symlink(format!("{up}{LIB_DIR}/{loader}"), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    println!(
        "qemu-ga: {} KiB, {} libraries {} KiB ({})",
        std::fs::metadata(&exe)?.len() / 1024,
        copied.len(),
        bytes / 1024,
        copied.into_iter().collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

/// Builds the test image into `target/vm/`.
pub(crate) fn build(sh: &Shell) -> Result<Image> {
    build_flavour(sh, Flavour::Test)
}

/// Builds the bench image into `target/vm-bench/`: the test image plus qemu-ga, its
/// libraries and the virtio console modules. The initramfs tree stays in `root/`.
pub(crate) fn build_bench(sh: &Shell) -> Result<Image> {
    build_flavour(sh, Flavour::Bench)
}

fn build_flavour(sh: &Shell, flavour: Flavour) -> Result<Image> {
    step(match flavour {
        Flavour::Test => "VM image",
        Flavour::Bench => "VM image (bench: with qemu-ga)",
    });
    ensure_tools(sh)?;
    if flavour == Flavour::Bench {
        ensure(sh, BENCH_TOOLS)?;
    }
    let root = crate::project_root();
    let cache = root.join("target/vm-cache");
    let kernel = kernel_tree(sh, &cache)?;
    let qemu_ga = match flavour {
        Flavour::Test => None,
        Flavour::Bench => Some(qemu_ga_tree(sh, &cache)?),
    };
    cmd!(
        sh,
        "cargo build --locked -p agent-linux --profile agent --target {MUSL}"
    )
    .run()?;
    let agent = root.join("target").join(MUSL).join("agent/portless-agent");

    let out = root.join(flavour.dir());
    let tree = out.join("root");
    let _ = sh.remove_path(&tree);
    for d in [
        "bin",
        "lib/modules",
        "etc/portless-agent",
        "var/lib/portless-agent",
    ] {
        sh.create_dir(tree.join(d))?;
    }
    let busybox = cmd!(sh, "which busybox").read()?;
    sh.copy_file(&busybox, tree.join("bin/busybox"))?;
    sh.copy_file(&agent, tree.join("bin/portless-agent"))?;
    sh.write_file(tree.join("etc/portless-agent/allow-list.toml"), ALLOW_LIST)?;
    sh.write_file(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    // nobody is also in `users`: commands that name only a user get its groups too.
    sh.write_file(
        tree.join("etc/group"),
        "root:x:0:\nusers:x:100:nobody\nnogroup:x:65534:\n",
    )?;
    sh.write_file(tree.join("init"), INIT)?;
    cmd!(
        sh,
        "chmod 0755 {tree}/init {tree}/bin/busybox {tree}/bin/portless-agent"
    )
    .run()?;
    let modules = sh
        .read_dir(kernel.join("lib/modules"))?
        .into_iter()
        .next()
        .context("no modules in the kernel package")?;
    let module_list = flavour.modules();
    for m in &module_list {
        let src = modules.join(m);
        let name = src.file_name().context("module name")?;
        sh.copy_file(&src, tree.join("lib/modules").join(name))?;
    }
    if let Some(qemu_ga) = &qemu_ga {
        add_qemu_ga(sh, qemu_ga, &tree)?;
    }
    let vmlinuz = sh
        .read_dir(kernel.join("boot"))?
        .into_iter()
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz"))
        })
        .context("no vmlinuz in the kernel package")?;
    sh.copy_file(&vmlinuz, out.join("vmlinuz"))?;

    // newc cpio of the tree, gzip'd.
    let names = {
        let _d = sh.push_dir(&tree);
        cmd!(sh, "find .").read()?
    };
    let archive = {
        let _d = sh.push_dir(&tree);
        cmd!(sh, "cpio --quiet -o -H newc")
            .stdin(names)
            .output()?
            .stdout
    };
    let gz = cmd!(sh, "gzip -6").stdin(archive).output()?.stdout;
    std::fs::write(out.join("initrd.gz"), &gz)?;
    let kernel_size = std::fs::metadata(out.join("vmlinuz"))?.len();
    let agents = match flavour {
        Flavour::Test => "portless-agent",
        Flavour::Bench => "portless-agent, qemu-ga",
    };
    println!(
        "image: {} (kernel {} KiB, initramfs {} KiB: busybox, {agents}, {} modules)",
        out.display(),
        kernel_size / 1024,
        gz.len() / 1024,
        module_list.len()
    );
    Ok(Image { dir: out })
}
