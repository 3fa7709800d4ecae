//! `cargo xtask image`: a minimal bootable guest for the VM tests: Debian's cloud kernel
//! (downloaded once with `apt-get download` into `target/vm-cache/`, never committed) and an
//! initramfs with busybox, the static `portless-agent`, its allow-list (`image/allow-list.toml`), the VFIO
//! modules and an `/init` that starts the agent. Written to `target/vm/`.

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
const INIT: &str = include_str!("image/init.sh");
/// The image's allow-list: useful commands, push enabled.
const ALLOW_LIST: &str = include_str!("image/allow-list.toml");

/// Debian packages the VM tooling needs, and the command each provides.
pub(crate) const TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
];

/// Installs missing tools with apt-get when root on Debian; otherwise says what to install.
pub(crate) fn ensure_tools(sh: &Shell) -> Result<()> {
    let missing: Vec<&str> = TOOLS
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
    pub(crate) dir: PathBuf,
}

fn kernel_tree(sh: &Shell, cache: &Path) -> Result<PathBuf> {
    let tree = cache.join("kernel");
    if tree.join("boot").exists() {
        return Ok(tree);
    }
    sh.create_dir(cache)?;
    let _dir = sh.push_dir(cache);
    let mut package = KERNEL_PACKAGE.to_owned();
    if cmd!(sh, "apt-get download {package}").run().is_err() {
        cmd!(sh, "apt-get update -q").run()?;
        if cmd!(sh, "apt-get download {package}").run().is_err() {
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

/// Builds the image into `target/vm/`.
pub(crate) fn build(sh: &Shell) -> Result<Image> {
    step("VM image");
    ensure_tools(sh)?;
    let root = crate::project_root();
    let cache = root.join("target/vm-cache");
    let kernel = kernel_tree(sh, &cache)?;
    cmd!(
        sh,
        "cargo build --locked -p agent-linux --profile agent --target {MUSL}"
    )
    .run()?;
    let agent = root.join("target").join(MUSL).join("agent/portless-agent");

    let out = root.join("target/vm");
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
    sh.write_file(tree.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
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
    for m in MODULES {
        let src = modules.join(m);
        let name = src.file_name().context("module name")?;
        sh.copy_file(&src, tree.join("lib/modules").join(name))?;
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
    println!(
        "image: {} (kernel {} KiB, initramfs {} KiB: busybox, portless-agent, {} modules)",
        out.display(),
        kernel_size / 1024,
        gz.len() / 1024,
        MODULES.len()
    );
    Ok(Image { dir: out })
}
