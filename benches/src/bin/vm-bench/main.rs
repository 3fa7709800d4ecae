//! `vm-bench`: Portless against the QEMU guest agent in real VMs, in one run, on one guest
//! image holding both agents (run by `cargo xtask bench`, which builds that image).
//!
//! 1. One VM whose Portless agent is woken by interrupts (ivshmem-doorbell, VFIO MSI-X), then
//!    one whose agent polls (ivshmem-plain); qemu-ga runs in both, on virtio-serial. In each:
//!    time from QEMU start to the first answer, no-op round trips back to back and after an
//!    idle gap, `/bin/true` to final status, 64 KiB and 16 MiB of output (bytes checked),
//!    the agents' resident memory before and after, the CPU time host and QEMU spend per
//!    1,000 round trips and while idle. Portless and qemu-ga take turns in blocks, so that
//!    drifts of this machine touch both alike.
//! 2. Four interrupt VMs behind `portless serve`: one command on all four (Portless's
//!    fan-out vs four qemu-ga clients in parallel threads) and the no-op round trip through
//!    the daemon's HTTP API.
//!
//! Writes `summary.json`, `samples.json` and `latency.svg` into the output directory and, with
//! `--docs`, the results sections of BENCHMARKS.md and README.md and `docs/bench-latency.svg`.

mod host;
mod qemu;
mod qga;
mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use benches::plot::{self, Series};
use host::Host;
use qemu::{REGION, Vm, Wakeup};
use qga::Qga;
use report::{Figure, Summary};
use vm_harness::{Ivshmem, Processes};

const USAGE: &str = "\
vm-bench [options]   (normally run by `cargo xtask bench`)

  --image DIR       the bench image: vmlinuz, initrd.gz, root/ (target/vm-bench)
  --portless FILE   the `portless` binary for the daemon figures (target/release/portless)
  --out DIR         where summary.json, samples.json and latency.svg go (target/bench)
  --accel A         auto (KVM if it boots, else TCG), kvm or tcg (auto)
  --region-dir DIR  where the polling guest's memory-backend file goes (/dev/shm)
  --quick           fewer samples (a check that all of it works)
  --only PARTS      run only these parts: interrupts, polling, containment, fan-out
                    (comma-separated);
                    the documents are not updated then
  --docs            also update BENCHMARKS.md, README.md and docs/bench-latency.svg
";

/// The `bytes` command's pattern (the bench image's allow-list), repeated.
const PATTERN: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n";
/// The program behind the `bytes` command, run the same way through qemu-ga.
const BYTES_SCRIPT: &str =
    "yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | head -c \"$0\"";
/// Time allowed from QEMU start to an agent's first answer, per accelerator.
const BOOT_LIMIT_KVM: Duration = Duration::from_secs(15);
const BOOT_LIMIT_TCG: Duration = Duration::from_secs(180);
/// Round trips are measured in blocks of this many, Portless and qemu-ga in turn.
const BLOCK: usize = 50;
/// The gap before each "after idle" round trip: both agents are asleep by then.
const IDLE_GAP: Duration = Duration::from_millis(20);
/// The parts of a run, in order.
const PARTS: &[&str] = &["interrupts", "polling", "containment", "fan-out"];
/// VMs of the fan-out.
const FAN_OUT_VMS: usize = 4;

/// How many samples of each kind.
struct Counts {
    pings: usize,
    spaced: usize,
    execs: usize,
    small: usize,
    large: usize,
    fan_out: usize,
    idle: Duration,
}

struct Options {
    /// The workspace, whose documents `--docs` updates.
    root: PathBuf,
    image: PathBuf,
    portless: PathBuf,
    out: PathBuf,
    accel: String,
    region_dir: PathBuf,
    quick: bool,
    docs: bool,
    parts: Vec<String>,
}

impl Options {
    fn parse() -> Result<Self> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(Path::to_path_buf)
            .context("workspace root")?;
        let mut o = Self {
            root: root.clone(),
            image: root.join("target/vm-bench"),
            portless: root.join("target/release/portless"),
            out: root.join("target/bench"),
            accel: "auto".into(),
            region_dir: PathBuf::from("/dev/shm"),
            quick: false,
            docs: false,
            parts: PARTS.iter().map(|p| (*p).to_owned()).collect(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .with_context(|| format!("{name} needs a value\n\n{USAGE}"))
            };
            match a.as_str() {
                "--image" => o.image = value("--image")?.into(),
                "--portless" => o.portless = value("--portless")?.into(),
                "--out" => o.out = value("--out")?.into(),
                "--accel" => o.accel = value("--accel")?,
                "--region-dir" => o.region_dir = value("--region-dir")?.into(),
                "--quick" => o.quick = true,
                "--docs" => o.docs = true,
                "--only" => {
                    o.parts = value("--only")?.split(',').map(str::to_owned).collect();
                    if let Some(p) = o.parts.iter().find(|p| !PARTS.contains(&p.as_str())) {
                        bail!("unknown part `{p}` (parts: {})", PARTS.join(", "));
                    }
                }
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown option `{other}`\n\n{USAGE}"),
            }
        }
        if o.docs && o.parts.len() < PARTS.len() {
            bail!("--docs needs every part (no --only)");
        }
        if !["auto", "kvm", "tcg"].contains(&o.accel.as_str()) {
            bail!("--accel takes auto, kvm or tcg, not `{}`", o.accel);
        }
        for f in ["vmlinuz", "initrd.gz", "root/usr/sbin/qemu-ga"] {
            if !o.image.join(f).exists() {
                bail!(
                    "{} has no {f}: build the bench image first (`cargo xtask image --bench`)",
                    o.image.display()
                );
            }
        }
        Ok(o)
    }

    fn counts(&self) -> Counts {
        if self.quick {
            Counts {
                pings: 300,
                spaced: 50,
                execs: 50,
                small: 10,
                large: 1,
                fan_out: 5,
                idle: Duration::from_secs(10),
            }
        } else {
            Counts {
                pings: 1000,
                spaced: 200,
                execs: 100,
                small: 30,
                large: 3,
                fan_out: 20,
                idle: Duration::from_secs(10),
            }
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vm-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Samples and figures gathered so far.
#[derive(Default)]
struct Results {
    figures: Vec<Figure>,
    /// Latency samples in microseconds, by series key.
    samples: BTreeMap<String, Vec<f64>>,
    qemu_ga: String,
    guest: String,
}

fn run() -> Result<()> {
    let opts = Options::parse()?;
    let counts = opts.counts();
    std::fs::create_dir_all(&opts.out)?;
    let work = opts.out.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut results = Results::default();

    let accel = accelerator(&opts, &work)?;
    println!("accelerator: {accel}");
    for wakeup in [Wakeup::Interrupts, Wakeup::Polling] {
        if !opts.parts.iter().any(|p| p == wakeup.name()) {
            continue;
        }
        println!("\n== one VM, Portless woken by {}", wakeup.name());
        single_vm(&opts, &counts, &accel, wakeup, &work, &mut results)?;
    }
    disk_footprint(&opts.image, &mut results)?;
    if opts.parts.iter().any(|p| p == "containment") {
        println!("\n== what containment costs: a cgroup per execution against the process group");
        containment(&opts, &counts, &accel, &work, &mut results)?;
    }
    if opts.parts.iter().any(|p| p == "fan-out") {
        println!("\n== {FAN_OUT_VMS} VMs behind `portless serve`");
        fan_out(&opts, &counts, &accel, &work, &mut results)?;
    }

    let summary = Summary {
        generated: utc_now(),
        command: if opts.docs {
            "cargo xtask bench".into()
        } else {
            std::iter::once("vm-bench".to_owned())
                .chain(std::env::args().skip(1))
                .collect::<Vec<_>>()
                .join(" ")
        },
        accelerator: accel,
        host: host_description(),
        qemu: command_line("qemu-system-x86_64", &["--version"])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned(),
        qemu_ga: results.qemu_ga.clone(),
        guest: results.guest.clone(),
        figures: results.figures,
    };
    summary.write_json(&opts.out)?;
    std::fs::write(
        opts.out.join("samples.json"),
        serde_json::to_string(&results.samples)? + "\n",
    )?;
    let series = plot_series(&results.samples);
    plot::latency_cdf(
        &opts.out.join("latency.svg"),
        "No-op round trip and /bin/true to final status, one VM",
        &series,
    )?;
    println!("\n{}", summary.markdown("latency.svg"));
    if opts.docs {
        let root = &opts.root;
        std::fs::create_dir_all(root.join("docs"))?;
        std::fs::copy(
            opts.out.join("latency.svg"),
            root.join("docs/bench-latency.svg"),
        )?;
        report::replace_section(
            &root.join("BENCHMARKS.md"),
            "results",
            &summary.markdown("docs/bench-latency.svg"),
        )?;
        report::replace_section(&root.join("README.md"), "ratios", &summary.ratios())?;
        println!("updated BENCHMARKS.md, README.md and docs/bench-latency.svg");
    }
    println!(
        "wrote {}/summary.json, samples.json and latency.svg",
        opts.out.display()
    );
    Ok(())
}

/// The accelerator: the one asked for, or KVM if a guest boots with it, else TCG.
fn accelerator(opts: &Options, work: &Path) -> Result<String> {
    if opts.accel != "auto" {
        return Ok(opts.accel.clone());
    }
    let kvm = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !kvm {
        return Ok("tcg".into());
    }
    let dir = work.join("probe");
    std::fs::create_dir_all(&dir)?;
    let mut host = Host::create(Wakeup::Polling, &dir.join("s"), &dir.join("region"))?;
    let vm = Vm::boot(
        &opts.image,
        &dir,
        "probe",
        "kvm",
        Ivshmem::Plain {
            file: dir.join("region"),
            size: REGION,
        },
    )?;
    let ok = host.hello(BOOT_LIMIT_KVM).is_ok();
    drop(vm);
    println!(
        "KVM {}",
        if ok {
            "works"
        } else {
            "did not boot a guest in 15 s: using TCG"
        }
    );
    Ok(if ok { "kvm" } else { "tcg" }.into())
}

fn boot_limit(accel: &str) -> Duration {
    if accel == "kvm" {
        BOOT_LIMIT_KVM
    } else {
        BOOT_LIMIT_TCG
    }
}

/// Microseconds of a duration.
fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// CPU used by this thread and by QEMU over some work.
struct Cpu {
    host: Duration,
    qemu: Duration,
}

fn measure_cpu<T>(vm: &Vm, f: impl FnOnce() -> Result<T>) -> Result<(T, Cpu)> {
    let (h, q) = (qemu::thread_cpu(), vm.cpu());
    let t = f()?;
    Ok((
        t,
        Cpu {
            host: qemu::thread_cpu().saturating_sub(h),
            qemu: vm.cpu().saturating_sub(q),
        },
    ))
}

/// `/bin/true` to final status in two polling VMs of the same image, one whose agent runs each
/// execution in a cgroup of its own (the default) and one with `--cgroup off` (the process
/// group only), in alternating blocks.
fn containment(
    opts: &Options,
    counts: &Counts,
    accel: &str,
    work: &Path,
    results: &mut Results,
) -> Result<()> {
    let dir = work.join("containment");
    std::fs::create_dir_all(&dir)?;
    let mut hosts = Vec::new();
    let mut vms = Vec::new();
    for (name, args) in [
        ("cgroups", &[][..]),
        (
            "process-groups",
            &["agent_args=--wakeup,poll,--cgroup,off"][..],
        ),
    ] {
        let region = region_file(opts, name);
        let host = Host::create(Wakeup::Polling, &dir.join(format!("{name}.sock")), &region)?;
        let ivshmem = Ivshmem::Plain {
            file: region,
            size: REGION,
        };
        vms.push(Vm::boot_with(
            &opts.image,
            &dir,
            name,
            accel,
            ivshmem,
            args,
        )?);
        hosts.push(host);
    }
    for (host, vm) in hosts.iter_mut().zip(&mut vms) {
        if let Err(e) = host.hello(boot_limit(accel)) {
            vm.check_alive()?;
            bail!("{}: {e:#}; console:\n{}", vm.name, vm.console_tail());
        }
        for _ in 0..20 {
            host.run_ok("true", &[])?;
        }
    }
    let (mut with, mut without) = (Vec::new(), Vec::new());
    let block = (counts.execs / 4).max(1);
    while with.len() < counts.execs {
        for (host, samples) in hosts.iter_mut().zip([&mut with, &mut without]) {
            for _ in 0..block {
                let t = Instant::now();
                host.run_ok("true", &[])?;
                samples.push(us(t.elapsed()));
            }
        }
    }
    results.figures.push(
        Figure::latency(
            "bin_true_cgroup_per_execution",
            "/bin/true to final status, a cgroup per execution (polling)",
            &with,
            Some(&without),
            None,
        )?
        .against("the process group only (--cgroup off)")
        .with_note(
            "two polling VMs of the same image at once, in alternating blocks; the cgroup's \
             cost is its mkdir, the child joining it, the checks that it is empty, and its rmdir",
        ),
    );
    results.samples.insert("portless_true_cgroups".into(), with);
    results
        .samples
        .insert("portless_true_process_groups".into(), without);
    for vm in &mut vms {
        vm.check_alive()?;
    }
    drop(vms);
    for name in ["cgroups", "process-groups"] {
        let _ = std::fs::remove_file(region_file(opts, name));
    }
    Ok(())
}

/// Boots one VM and measures both agents in it.
fn single_vm(
    opts: &Options,
    counts: &Counts,
    accel: &str,
    wakeup: Wakeup,
    work: &Path,
    results: &mut Results,
) -> Result<()> {
    let mode = wakeup.name();
    let dir = work.join(mode);
    std::fs::create_dir_all(&dir)?;
    // The polling guest's memory-backend file lives in tmpfs (`--region-dir`), as guest
    // RAM would.
    let region = region_file(opts, mode);
    let mut host = Host::create(wakeup, &dir.join("ivshmem.sock"), &region)?;
    let ivshmem = match wakeup {
        Wakeup::Interrupts => Ivshmem::Doorbell {
            socket: dir.join("ivshmem.sock"),
        },
        Wakeup::Polling => Ivshmem::Plain {
            file: region,
            size: REGION,
        },
    };
    let mut vm = Vm::boot(&opts.image, &dir, mode, accel, ivshmem)?;

    // Time to first answer: qemu-ga in a thread, Portless here, both from QEMU's start.
    let limit = boot_limit(accel);
    let (qga_path, started) = (vm.qga.clone(), vm.started);
    let qga_thread = thread::spawn(move || -> Result<(Qga, Duration)> {
        let mut qga = Qga::connect(&qga_path, limit)?;
        qga.ping()?;
        Ok((qga, started.elapsed()))
    });
    let first = host
        .hello(limit)
        .and_then(|()| host.ping())
        .map(|_| vm.started.elapsed());
    let first = match first {
        Ok(t) => t,
        Err(e) => {
            vm.check_alive()?;
            bail!("Portless ({mode}): {e:#}; console:\n{}", vm.console_tail());
        }
    };
    let (mut qga, qga_first) = qga_thread
        .join()
        .map_err(|_| anyhow::anyhow!("qemu-ga thread panicked"))?
        .with_context(|| format!("qemu-ga ({mode}); console:\n{}", vm.console_tail()))?;
    println!("first answer after QEMU start: Portless {first:.2?}, qemu-ga {qga_first:.2?}");
    results.qemu_ga = qga.version()?;
    results.figures.push(Figure::amount(
        &format!("first_answer_{mode}"),
        &format!("QEMU start to first answer ({mode})"),
        "s",
        first.as_secs_f64(),
        Some(qga_first.as_secs_f64()),
        None,
    ));
    let rss_idle = rss(&mut host)?;
    let uname = host.run_ok("uname", &[])?;
    results.guest = String::from_utf8_lossy(&uname.stdout).trim().to_owned();

    // Warm both up.
    for _ in 0..50 {
        host.ping()?;
        qga.ping()?;
    }

    // Back-to-back round trips, in turns, with the CPU each side costs.
    let (mut p, mut q) = (Vec::new(), Vec::new());
    let (mut p_cpu, mut q_cpu) = (Cpu::zero(), Cpu::zero());
    while p.len() < counts.pings {
        let ((), c) = measure_cpu(&vm, || {
            for _ in 0..BLOCK {
                p.push(us(host.ping()?));
            }
            Ok(())
        })?;
        p_cpu.add(&c);
        let ((), c) = measure_cpu(&vm, || {
            for _ in 0..BLOCK {
                q.push(us(qga.ping()?));
            }
            Ok(())
        })?;
        q_cpu.add(&c);
    }
    let target = match wakeup {
        Wakeup::Interrupts => 0.25,
        Wakeup::Polling => 0.02,
    };
    results.figures.push(Figure::latency(
        &format!("noop_round_trip_{mode}"),
        &format!("No-op round trip, back to back ({mode})"),
        &p,
        Some(&q),
        Some(target),
    )?);
    let per_1000 = 1000.0 / p.len() as f64;
    results.figures.push(Figure::amount(
        &format!("host_cpu_per_1000_round_trips_{mode}"),
        &format!("Host CPU per 1,000 round trips ({mode})"),
        "ms",
        p_cpu.host.as_secs_f64() * 1e3 * per_1000,
        Some(q_cpu.host.as_secs_f64() * 1e3 * per_1000),
        None,
    ));
    results.figures.push(Figure::amount(
        &format!("qemu_cpu_per_1000_round_trips_{mode}"),
        &format!("QEMU CPU per 1,000 round trips ({mode})"),
        "ms",
        p_cpu.qemu.as_secs_f64() * 1e3 * per_1000,
        Some(q_cpu.qemu.as_secs_f64() * 1e3 * per_1000),
        None,
    ));
    results.samples.insert(format!("portless_ping_{mode}"), p);
    results.samples.insert(format!("qemu_ga_ping_{mode}"), q);

    // Round trips after an idle gap: both agents asleep, woken by the request.
    let (mut p, mut q) = (Vec::new(), Vec::new());
    for _ in 0..counts.spaced {
        thread::sleep(IDLE_GAP);
        p.push(us(host.ping()?));
        thread::sleep(IDLE_GAP);
        q.push(us(qga.ping()?));
    }
    let mut fig = Figure::latency(
        &format!("noop_round_trip_after_idle_{mode}"),
        &format!(
            "No-op round trip after {} ms idle ({mode})",
            IDLE_GAP.as_millis()
        ),
        &p,
        Some(&q),
        (wakeup == Wakeup::Interrupts).then_some(0.25),
    )?;
    results
        .samples
        .insert(format!("portless_ping_after_idle_{mode}"), p);
    results
        .samples
        .insert(format!("qemu_ga_ping_after_idle_{mode}"), q);
    if wakeup == Wakeup::Polling {
        fig = fig.with_note(
            "an idle polling agent has backed off to sleeps of up to 1 ms (--poll-max-us)",
        );
    }
    results.figures.push(fig);

    // /bin/true to final status.
    let (mut p, mut q) = (Vec::new(), Vec::new());
    let mut polls = 0;
    let mut life_ms = 0;
    for _ in 0..counts.execs {
        let t = Instant::now();
        let run = host.run_ok("true", &[])?;
        p.push(us(t.elapsed()));
        life_ms += run.finished.duration_ms;
        let t = Instant::now();
        let run = qga.run("/bin/true", &[])?;
        q.push(us(t.elapsed()));
        if run.exit_code != 0 {
            bail!("qemu-ga: /bin/true exited {}", run.exit_code);
        }
        polls += run.polls;
    }
    results.figures.push(
        Figure::latency(
            &format!("bin_true_{mode}"),
            &format!("/bin/true to final status ({mode})"),
            &p,
            Some(&q),
            Some(1.0 / 3.0),
        )?
        .with_note(format!(
            "Portless: exec, then the agent's exit message; qemu-ga: guest-exec, then \
             guest-exec-status back to back ({:.1} calls per run on average). Of Portless's \
             time, the process's own life (started to reaped, by the agent's millisecond \
             clock) is {:.1} ms on average: a cost any agent pays",
            f64::from(polls) / counts.execs as f64,
            life_ms as f64 / counts.execs as f64
        )),
    );
    results.figures.push(overhead(
        &format!("bin_true_overhead_{mode}"),
        &format!("/bin/true: the agent's part, beyond the process's own life ({mode})"),
        &p,
        &q,
        life_ms as f64 / counts.execs as f64,
    )?);
    results.samples.insert(format!("portless_true_{mode}"), p);
    results.samples.insert(format!("qemu_ga_true_{mode}"), q);

    // Output: time to all of it, bytes checked.
    for (size, n, label, target) in [
        (64 << 10, counts.small, "64 KiB", Some(1.0 / 3.0)),
        (16 << 20, counts.large, "16 MiB", None),
    ] {
        let expected = pattern(size);
        let count = size.to_string();
        let (mut p, mut q) = (Vec::new(), Vec::new());
        let mut life_ms = 0;
        for _ in 0..n {
            let t = Instant::now();
            let run = host.run_ok("bytes", &[&count])?;
            p.push(us(t.elapsed()));
            life_ms += run.finished.duration_ms;
            check_bytes("Portless", label, &run.stdout, &expected)?;
            let t = Instant::now();
            let run = qga.run("/bin/sh", &["-c", BYTES_SCRIPT, &count])?;
            q.push(us(t.elapsed()));
            let who = if run.truncated {
                "qemu-ga (which says it truncated the output)"
            } else {
                "qemu-ga"
            };
            check_bytes(who, label, &run.stdout, &expected)?;
        }
        let key = label.replace(' ', "").to_lowercase();
        results.figures.push(
            Figure::latency(
                &format!("output_{key}_{mode}"),
                &format!("{label} of output, all of it at the host ({mode})"),
                &p,
                Some(&q),
                target,
            )?
            .with_note(format!(
                "`sh -c 'yes ... | head -c N'` (three processes); its own life in the guest \
                 (the agent's clock) is {:.1} ms on average of Portless's time",
                life_ms as f64 / n as f64
            )),
        );
        if target.is_some() {
            results.figures.push(overhead(
                &format!("output_{key}_overhead_{mode}"),
                &format!(
                    "{label} of output: the agent's part, beyond the processes' life ({mode})"
                ),
                &p,
                &q,
                life_ms as f64 / n as f64,
            )?);
        }
    }

    let rss_after = rss(&mut host)?;
    for (when, (p, q)) in [("idle", rss_idle), ("after the runs", rss_after)] {
        results.figures.push(Figure::amount(
            &format!("rss_{}_{mode}", when.replace(' ', "_")),
            &format!("Agent resident memory, {when} ({mode})"),
            "KiB",
            p as f64,
            Some(q as f64),
            Some(1.0 / 3.0),
        ));
    }

    // Idle: what the mode costs while nobody asks anything.
    let ((), idle) = measure_cpu(&vm, || host.idle(counts.idle))?;
    let secs = counts.idle.as_secs();
    results.figures.push(
        Figure::amount(
            &format!("idle_host_cpu_{mode}"),
            &format!("Host CPU while idle {secs} s ({mode})"),
            "ms",
            idle.host.as_secs_f64() * 1e3,
            None,
            None,
        )
        .with_note(match wakeup {
            Wakeup::Interrupts => "the host sleeps on the guest's doorbell",
            Wakeup::Polling => "the host looks at the ring every 10 ms, as `portless serve` does",
        }),
    );
    results.figures.push(
        Figure::amount(
            &format!("idle_qemu_cpu_{mode}"),
            &format!("QEMU CPU while idle {secs} s ({mode})"),
            "ms",
            idle.qemu.as_secs_f64() * 1e3,
            None,
            None,
        )
        .with_note(match wakeup {
            Wakeup::Interrupts => {
                "the whole guest, with qemu-ga idle in it too; the agent sleeps until an \
                 interrupt or its 1 s heartbeat"
            }
            Wakeup::Polling => {
                "the whole guest, with qemu-ga idle in it too; the agent looks at the ring \
                 every 1 ms (--poll-max-us)"
            }
        }),
    );
    // The guest's kernel log (with the agent's lines), for a look at where time went.
    let dmesg = qga.run("/bin/dmesg", &[])?;
    std::fs::write(dir.join(format!("{mode}.dmesg")), &dmesg.stdout)?;
    vm.check_alive()?;
    drop(vm);
    let _ = std::fs::remove_file(region_file(opts, mode));
    Ok(())
}

/// The polling guest's memory-backend file, private to this run.
fn region_file(opts: &Options, mode: &str) -> PathBuf {
    opts.region_dir.join(format!(
        "portless-bench-{}-{mode}.region",
        std::process::id()
    ))
}

impl Cpu {
    fn zero() -> Self {
        Self {
            host: Duration::ZERO,
            qemu: Duration::ZERO,
        }
    }

    fn add(&mut self, other: &Self) {
        self.host += other.host;
        self.qemu += other.qemu;
    }
}

/// What an agent adds to a command beyond the command's own life in the guest: each side's
/// mean time minus the mean life the Portless agent measured for the same program (the same
/// program in the same guest lives as long under either agent). Means, not medians, so that
/// the millisecond steps of the agent's clock average out.
fn overhead(key: &str, label: &str, p: &[f64], q: &[f64], life_ms: f64) -> Result<Figure> {
    let mean = |s: &[f64]| (!s.is_empty()).then(|| s.iter().sum::<f64>() / s.len() as f64 / 1e3);
    let (Some(pm), Some(qm)) = (mean(p), mean(q)) else {
        bail!("{key}: no samples");
    };
    Ok(Figure::amount(
        key,
        label,
        "ms",
        (pm - life_ms).max(0.0),
        Some((qm - life_ms).max(0.0)),
        None,
    )
    .with_note(format!(
        "each mean ({pm:.2} ms and {qm:.2} ms) minus the {life_ms:.2} ms the program itself \
         lives (the Portless agent's mean, by its millisecond clock, so good to about 0.1 ms)"
    )))
}

/// The agents' resident memory (portless-agent, qemu-ga) in KiB, from the image's
/// `footprint` command.
fn rss(host: &mut Host) -> Result<(u64, u64)> {
    let run = host.run_ok("footprint", &[])?;
    let text = String::from_utf8_lossy(&run.stdout);
    let kib = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(name)).then(|| w.next()?.parse().ok())?
            })
            .with_context(|| format!("no resident memory of {name} in `footprint`: {text}"))
    };
    Ok((kib("portless-agent")?, kib("qemu-ga")?))
}

/// `size` bytes of the `bytes` command's output.
fn pattern(size: usize) -> Vec<u8> {
    PATTERN.iter().copied().cycle().take(size).collect()
}

fn check_bytes(who: &str, label: &str, got: &[u8], want: &[u8]) -> Result<()> {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        bail!(
            "{who}: {label} of output came back as {} bytes, {}",
            got.len(),
            at.map_or("a prefix of the expected bytes".to_owned(), |i| format!(
                "differing at byte {i}"
            ))
        );
    }
    Ok(())
}

/// Sizes on disk: the static portless-agent against qemu-ga and every library it loads.
fn disk_footprint(image: &Path, results: &mut Results) -> Result<()> {
    let root = image.join("root");
    let size = |p: &Path| -> Result<u64> {
        Ok(std::fs::metadata(p)
            .with_context(|| format!("{}", p.display()))?
            .len())
    };
    let agent = size(&root.join("bin/portless-agent"))?;
    let mut qga = size(&root.join("usr/sbin/qemu-ga"))?;
    let mut libs = 0;
    for dir in ["lib/x86_64-linux-gnu", "lib64"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries {
            let e = e?;
            if e.file_type()?.is_file() {
                qga += e.metadata()?.len();
                libs += 1;
            }
        }
    }
    if libs == 0 {
        bail!("the bench image holds no libraries for qemu-ga");
    }
    results.figures.push(
        Figure::amount(
            "disk_footprint",
            "Agent binary plus shared libraries on disk",
            "KiB",
            agent as f64 / 1024.0,
            Some(qga as f64 / 1024.0),
            Some(0.2),
        )
        .with_note(format!(
            "portless-agent is static (musl); qemu-ga loads {libs} libraries"
        )),
    );
    Ok(())
}

/// Four VMs behind `portless serve`: fan-out, and round trips through the daemon's API.
fn fan_out(
    opts: &Options,
    counts: &Counts,
    accel: &str,
    work: &Path,
    results: &mut Results,
) -> Result<()> {
    use portless_api::blocking::Client;
    use portless_api::{ExecRequest, ExecState, VmState};

    let dir = work.join("fan-out");
    std::fs::create_dir_all(&dir)?;
    let uid = command_line("id", &["-u"]);
    let mut config = format!(
        "[daemon]\nsocket = \"{d}/portless.sock\"\nstate_dir = \"{d}/state\"\n\n\
         [[principal]]\nname = \"bench\"\nuids = [{uid}]\nvms = [\"*\"]\ncommands = [\"*\"]\n",
        d = dir.display(),
        uid = uid.trim()
    );
    for i in 1..=FAN_OUT_VMS {
        config.push_str(&format!(
            "\n[[vm]]\nname = \"vm{i}\"\nchannel = \"doorbell\"\nsocket = \"{}/vm{i}.ivshmem\"\nsize = \"1M\"\n",
            dir.display()
        ));
    }
    std::fs::write(dir.join("host.toml"), config)?;
    // Declared before the VMs, so that it is stopped after them.
    let mut daemon = Processes::default();
    daemon.push(
        "portless serve",
        Command::new(&opts.portless)
            .args(["serve", "--config"])
            .arg(dir.join("host.toml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("portless.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", opts.portless.display()))?,
    );
    let socket = dir.join("portless.sock");
    if !vm_harness::wait_for_socket(&socket, Duration::from_secs(15)) {
        bail!(
            "portless serve did not start; see {}/portless.log",
            dir.display()
        );
    }
    let mut vms = Vec::new();
    for i in 1..=FAN_OUT_VMS {
        let socket = dir.join(format!("vm{i}.ivshmem"));
        vms.push(Vm::boot(
            &opts.image,
            &dir,
            &format!("vm{i}"),
            accel,
            Ivshmem::Doorbell { socket },
        )?);
    }
    let client = Client::new(&socket)?;
    let limit = boot_limit(accel) * 2;
    let start = Instant::now();
    loop {
        let ready = client
            .vms()
            .map(|v| v.iter().filter(|v| v.state == VmState::Ready).count())
            .unwrap_or(0);
        if ready == FAN_OUT_VMS {
            break;
        }
        if start.elapsed() > limit {
            for vm in &mut vms {
                vm.check_alive()?;
            }
            bail!("only {ready} of {FAN_OUT_VMS} VMs became ready within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let mut qgas = Vec::new();
    for vm in &vms {
        let mut q = Qga::connect(&vm.qga, limit)?;
        q.ping()?;
        qgas.push(q);
    }
    println!("{FAN_OUT_VMS} VMs ready after {:.2?}", start.elapsed());

    // Round trips through the daemon's API, beside qemu-ga's in the same VM.
    let (mut p, mut q) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        client.ping("vm1")?;
        qgas[0].ping()?;
    }
    while p.len() < counts.pings / 2 {
        for _ in 0..BLOCK {
            let t = Instant::now();
            client.ping("vm1")?;
            p.push(us(t.elapsed()));
        }
        for _ in 0..BLOCK {
            q.push(us(qgas[0].ping()?));
        }
    }
    results.figures.push(
        Figure::latency(
            "noop_round_trip_daemon_api",
            "No-op round trip through `portless serve`'s HTTP API (interrupts)",
            &p,
            Some(&q),
            None,
        )?
        .with_note(
            "an operator's view: HTTP over the daemon's unix socket, policy, audit record \
             and the ring; qemu-ga's figure is its raw chardev socket",
        ),
    );

    // One command on all four VMs, to final status on all.
    let (mut p, mut q) = (Vec::new(), Vec::new());
    for _ in 0..counts.fan_out {
        let t = Instant::now();
        let answer = client.exec(&ExecRequest {
            target: "*".into(),
            command: "true".into(),
            args: Vec::new(),
            timeout_ms: None,
            max_concurrency: None,
            max_errors: None,
            idempotency_key: None,
        })?;
        if answer.executions.len() != FAN_OUT_VMS {
            bail!("fan-out reached {} VMs", answer.executions.len());
        }
        for e in &answer.executions {
            let id = e.id.with_context(|| format!("{}: {:?}", e.vm, e.error))?;
            let record = client.wait_final(id)?;
            if record.state != ExecState::Succeeded {
                bail!("{}: true ended {}", e.vm, record.state);
            }
        }
        p.push(us(t.elapsed()));
        let t = Instant::now();
        thread::scope(|s| -> Result<()> {
            let runs: Vec<_> = qgas
                .iter_mut()
                .map(|g| s.spawn(move || g.run("/bin/true", &[])))
                .collect();
            for r in runs {
                let run = r
                    .join()
                    .map_err(|_| anyhow::anyhow!("qemu-ga thread panicked"))??;
                if run.exit_code != 0 {
                    bail!("qemu-ga: /bin/true exited {}", run.exit_code);
                }
            }
            Ok(())
        })?;
        q.push(us(t.elapsed()));
    }
    results.figures.push(
        Figure::latency(
            "fan_out_4_vms",
            "`true` on 4 VMs, to final status on all",
            &p,
            Some(&q),
            None,
        )?
        .with_note(
            "Portless: one exec through the daemon's API, then waiting for each record; \
             qemu-ga: four clients in parallel threads",
        ),
    );
    for vm in &mut vms {
        vm.check_alive()?;
    }
    Ok(())
}

/// Series for the plot: the round trips and `/bin/true` of both modes.
fn plot_series(samples: &BTreeMap<String, Vec<f64>>) -> Vec<Series> {
    [
        ("portless_ping_polling", "Portless no-op, polling"),
        ("portless_ping_interrupts", "Portless no-op, interrupts"),
        ("qemu_ga_ping_interrupts", "qemu-ga guest-ping"),
        (
            "portless_ping_after_idle_interrupts",
            "Portless no-op after 20 ms idle, interrupts",
        ),
        (
            "qemu_ga_ping_after_idle_interrupts",
            "qemu-ga guest-ping after 20 ms idle",
        ),
        ("portless_true_interrupts", "Portless /bin/true, interrupts"),
        ("qemu_ga_true_interrupts", "qemu-ga /bin/true"),
    ]
    .iter()
    .filter_map(|(key, label)| {
        samples.get(*key).map(|s| Series {
            label: (*label).to_owned(),
            samples_us: s.clone(),
        })
    })
    .collect()
}

/// A command's stdout, trimmed (empty if it fails).
fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn utc_now() -> String {
    command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"])
}

/// CPU model, CPU count and kernel of this machine.
fn host_description() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = command_line("uname", &["-r"]);
    serde_json::json!({
        "description": format!("{cpus} CPUs ({model}), Linux {kernel}"),
        "cpu_model": model,
        "cpus": cpus,
        "kernel": kernel,
    })
}
