//! `fleet-sim` (`cargo xtask fleet-sim --hosts 1000 --vms 50`): the fleet at scale on this
//! machine. A real PostgreSQL (pg-harness), a real control plane (in this process, on a
//! loopback port, reached through `portless-api`'s client), and simulated hosts: the real
//! host side of the fleet (`portless_fleet::Member`, one per host, sharing one pool and one
//! `LISTEN` connection) with VM drivers that answer at once, no processes.
//!
//! One command is fanned out to every VM. Reported: the submit, the time until every
//! invocation was claimed and until the last was final, invocations per second,
//! PostgreSQL's CPU and bytes (WAL, and database growth) per invocation, a host's claim
//! latency, and, while the fan-out runs, the latency of `GET /v1/executions/{id}` (what
//! `portless status` asks) and of the console's page of that execution (its shell and
//! record, with a session cookie that the database resolves).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use portless_api::{
    Client, CommandInfo, CommandList, Endpoint, ExecRequest, ExecState, ExecutionId,
    ExecutionRecord, Stream, StreamTotals, VmInfo, VmState,
};
use portless_fleet::control::{Control, ControlConfig};
use portless_fleet::member::{Claimed, MemberStats, Started, VmReport};
use portless_fleet::{Member, MemberConfig, Runner, Store};

const TOKEN: &str = "fleet-sim";

/// A simulated host: VMs that are ready, and executions that end at once.
struct SimHost {
    vms: Vec<VmReport>,
    next: AtomicU64,
    done: std::sync::Mutex<HashMap<u64, ExecutionRecord>>,
    output: Vec<u8>,
}

impl SimHost {
    fn new(host: &str, vms: usize, output: usize) -> Self {
        let commands = CommandList {
            vm: String::new(),
            age_ms: 0,
            config_revision: 1,
            commands: vec![CommandInfo {
                name: "true".into(),
                description: "does nothing, successfully".into(),
                params: Vec::new(),
                timeout_ms: 10_000,
                max_output: 1 << 20,
            }],
        };
        let vms = (0..vms)
            .map(|i| {
                let name = format!("vm{i}");
                VmReport {
                    info: VmInfo {
                        name: name.clone(),
                        labels: BTreeMap::from([("sim".to_owned(), host.to_owned())]),
                        channel: "plain".into(),
                        state: VmState::Ready,
                        agent_generation: Some(1),
                        agent_software: Some("fleet-sim".into()),
                        config_revision: Some(1),
                        heartbeat_age_ms: Some(0),
                        agent_restarts: 0,
                        running: 0,
                        cutoffs: 0,
                        last_cutoff: None,
                        violations: 0,
                    },
                    commands: Some(CommandList {
                        vm: name,
                        ..commands.clone()
                    }),
                }
            })
            .collect();
        Self {
            vms,
            next: AtomicU64::new(1),
            done: std::sync::Mutex::new(HashMap::new()),
            output: b"ok\n".iter().copied().cycle().take(output).collect(),
        }
    }
}

fn now_ms() -> u64 {
    portless_fleet::store::now_ms()
}

impl Runner for SimHost {
    async fn vms(&self) -> Vec<VmReport> {
        self.vms.clone()
    }

    async fn start(&self, c: Claimed) -> Started {
        // Ordering: Relaxed: a counter.
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let now = now_ms();
        let len = self.output.len() as u64;
        let rec = ExecutionRecord {
            id: ExecutionId(id),
            principal: c.principal,
            vm: c.vm,
            command: c.command,
            args: c.args,
            state: ExecState::Succeeded,
            requested_at_ms: now,
            started_at_ms: Some(now),
            finished_at_ms: Some(now),
            duration_ms: Some(0),
            exit_code: Some(0),
            signal: None,
            detail: None,
            agent_generation: Some(1),
            agent_counter: Some(u32::try_from(id).unwrap_or(u32::MAX)),
            output_cap: 1 << 20,
            stdout: StreamTotals::new(len, len),
            stderr: StreamTotals::default(),
        };
        self.done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, rec);
        Started::Local(id)
    }

    async fn records(&self, ids: Vec<u64>) -> Vec<ExecutionRecord> {
        let done = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ids.iter().filter_map(|id| done.get(id).cloned()).collect()
    }

    async fn output(&self, _id: u64, stream: Stream, offset: u64, max: usize) -> Option<Vec<u8>> {
        if stream == Stream::Stderr {
            return Some(Vec::new());
        }
        let from = usize::try_from(offset).ok()?.min(self.output.len());
        let to = from.saturating_add(max).min(self.output.len());
        Some(self.output[from..to].to_vec())
    }

    async fn cancel(&self, _id: u64) {}
}

/// CPU time (user + system, seconds) of the postmaster and its children.
fn postgres_cpu(postmaster: u32) -> f64 {
    // SAFETY: `sysconf` takes a plain value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let pid: u32 = entry.file_name().to_string_lossy().parse().unwrap_or(0);
        // After the name: state ppid ... utime(12th) stime(13th) cutime cstime.
        let ppid: u32 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        if pid == postmaster || ppid == postmaster {
            for i in 11..15 {
                total += f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    total as f64 / ticks
}

struct Args {
    hosts: usize,
    vms: usize,
    output: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        hosts: 1000,
        vms: 50,
        output: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--hosts" => a.hosts = value("--hosts")?,
            "--vms" => a.vms = value("--vms")?,
            "--output-bytes" => a.output = value("--output-bytes")?,
            "--help" | "-h" => {
                println!(
                    "usage: fleet-sim [--hosts N (1000)] [--vms N per host (50)] \
                     [--output-bytes N per invocation (64)]"
                );
                std::process::exit(0);
            }
            other => bail!("unexpected argument {other:?} (see --help)"),
        }
    }
    if a.hosts == 0 || a.vms == 0 {
        bail!("--hosts and --vms must be at least 1");
    }
    Ok(a)
}

/// `median ms, max ms (n samples)` of latencies in microseconds.
fn median_max(v: &mut [u64]) -> String {
    format!(
        "{:.1} ms, {:.1} ms ({} samples)",
        median(v) as f64 / 1000.0,
        v.iter().max().copied().unwrap_or(0) as f64 / 1000.0,
        v.len()
    )
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    if v.is_empty() {
        return 0;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let a = args()?;
    let total = a.hosts * a.vms;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/fleet-sim");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pg = pg_harness::Server::start(&dir.join("pg")).map_err(|e| anyhow::anyhow!("{e}"))?;
    pg.psql("postgres", "CREATE DATABASE fleet")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let url = pg.url("fleet");
    let hash = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
    };
    let config = ControlConfig::parse(&format!(
        "[control]\nlisten = \"127.0.0.1:0\"\ndatabase = \"{url}\"\npool_size = 16\n\n\
         [[principal]]\nname = \"ops\"\ntoken_sha256 = \"{hash}\"\nvms = [\"*\"]\n\
         commands = [\"*\"]\nread_all = true\n"
    ))
    .map_err(|e| anyhow::anyhow!(e))?;
    Store::new(&url, 1)?.migrate().await?;
    let control = Arc::new(Control::open(config).await?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(portless_fleet::control::serve_on(
        control,
        listener,
        std::future::pending(),
    ));

    eprintln!("fleet-sim: {} hosts x {} vms", a.hosts, a.vms);
    let store = Store::new(&url, 32)?;
    let stats = Arc::new(MemberStats::default());
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    for h in 0..a.hosts {
        let name = format!("host{h:04}");
        let runner = Arc::new(SimHost::new(&name, a.vms, a.output));
        let mut config = MemberConfig::new(name);
        // Spread the hosts' beats and claims over their periods.
        config.heartbeat = Duration::from_secs(2);
        let member = Member::new(store.clone(), config, runner).with_stats(stats.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros(
                (h as u64 * 1_000_000) / a.hosts as u64,
            ))
            .await;
            member.run(stop).await;
        });
    }
    let sql = |q: &str| pg.psql("fleet", q).map_err(|e| anyhow::anyhow!("{e}"));
    let t = Instant::now();
    loop {
        let n: usize = sql("SELECT count(*) FROM vms")?.parse().unwrap_or(0);
        if n == total {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("only {n} of {total} vms registered in 300 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "fleet-sim: {total} vms registered in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Let the registrations' burst settle into the steady beat.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let postmaster = pg.pid().context("postmaster pid")?;
    let wal0 = sql("SELECT pg_current_wal_lsn() - '0/0'")?;
    let size0 = sql("SELECT pg_database_size('fleet')")?;
    let cpu0 = postgres_cpu(postmaster);
    let client = Client::at(Endpoint::Tcp(addr.to_string())).with_token(TOKEN);
    // A console session (kept in the database), logged in with the token as a person would.
    let browser = Client::at(Endpoint::Tcp(addr.to_string()));
    let origin = format!("http://{addr}");
    let login = browser
        .raw(
            "POST",
            "/console/login",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &origin),
            ],
            format!("token={TOKEN}").into_bytes(),
        )
        .await?;
    let cookie = login
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .context("the console's login gave no cookie")?
        .to_owned();

    let t0 = Instant::now();
    let answer = client
        .exec(&ExecRequest {
            target: "*".into(),
            command: "true".into(),
            args: Vec::new(),
            timeout_ms: None,
            max_concurrency: None,
            max_errors: None,
            idempotency_key: None,
        })
        .await?;
    let submit = t0.elapsed();
    let command = answer
        .command
        .context("the control plane gave no command id")?;
    if answer.executions.len() != total {
        bail!("{} invocations, not {total}", answer.executions.len());
    }
    let probe_id = answer.executions[total / 2].id.context("an id")?;
    // `portless status` of one invocation, and the console's page of it (its shell and
    // the record, with the session cookie), every 100 ms while the fan-out runs.
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let probe = {
        let client = client.clone();
        let probing = probing.clone();
        tokio::spawn(async move {
            let (mut status, mut shells, mut records) = (Vec::new(), Vec::new(), Vec::new());
            let us = |s: Instant| u64::try_from(s.elapsed().as_micros()).unwrap_or(u64::MAX);
            let with_cookie = [("cookie", cookie.as_str())];
            let record = format!("/v1/executions/{probe_id}");
            // Ordering: Relaxed: a flag; the probe only has to stop eventually.
            while probing.load(Ordering::Relaxed) {
                let s = Instant::now();
                if client.execution(probe_id).await.is_ok() {
                    status.push(us(s));
                }
                let s = Instant::now();
                let shell = browser
                    .raw("GET", "/console/", &with_cookie, Vec::new())
                    .await;
                if shell.is_ok_and(|r| r.status == 200) {
                    shells.push(us(s));
                }
                let s = Instant::now();
                let rec = browser.raw("GET", &record, &with_cookie, Vec::new()).await;
                if rec.is_ok_and(|r| r.status == 200) {
                    records.push(us(s));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (status, shells, records)
        })
    };
    let mut dispatched = None;
    let finished = loop {
        let counts = sql(&format!(
            "SELECT count(*) FILTER (WHERE state IN ('pending', 'delayed')), \
             count(*) FILTER (WHERE portless_is_final(state)) \
             FROM invocations WHERE command_id = {command}"
        ))?;
        let (waiting, done) = counts
            .split_once('|')
            .map(|(w, d)| {
                (
                    w.parse::<usize>().unwrap_or(0),
                    d.parse::<usize>().unwrap_or(0),
                )
            })
            .unwrap_or((total, 0));
        if waiting == 0 && dispatched.is_none() {
            dispatched = Some(t0.elapsed());
        }
        if done == total {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("{done} of {total} final after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Ordering: Relaxed: see the probe.
    probing.store(false, Ordering::Relaxed);
    let (mut status_us, mut shell_us, mut record_us) = probe.await?;
    let cpu = postgres_cpu(postmaster) - cpu0;
    let wal: f64 = sql(&format!("SELECT pg_current_wal_lsn() - '0/0' - {wal0}"))?
        .parse()
        .unwrap_or(0.0);
    let grown: f64 = sql(&format!("SELECT pg_database_size('fleet') - {size0}"))?
        .parse()
        .unwrap_or(0.0);
    let succeeded: usize = sql(&format!(
        "SELECT count(*) FROM invocations WHERE command_id = {command} AND state = 'succeeded'"
    ))?
    .parse()
    .unwrap_or(0);
    let (mut claims, mut claim_tx): (Vec<u64>, Vec<u64>) = stats
        .claim_times_us
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|&(all, tx)| (u64::from(all), u64::from(tx)))
        .unzip();
    let dispatched = dispatched.unwrap_or(finished);
    let n = total as f64;
    let rows = [
        ("hosts x vms", format!("{} x {} = {total}", a.hosts, a.vms)),
        ("output per invocation", format!("{} B", a.output)),
        (
            "submit (POST /v1/exec)",
            format!("{:.2} s", submit.as_secs_f64()),
        ),
        ("all claimed", format!("{:.2} s", dispatched.as_secs_f64())),
        ("all final", format!("{:.2} s", finished.as_secs_f64())),
        ("succeeded", format!("{succeeded} of {total}")),
        (
            "invocations per second (submit to all final)",
            format!("{:.0}", n / finished.as_secs_f64()),
        ),
        (
            "PostgreSQL CPU",
            format!("{cpu:.1} s, {:.0} µs per invocation", cpu * 1e6 / n),
        ),
        ("WAL per invocation", format!("{:.0} B", wal / n)),
        (
            "database growth per invocation",
            format!("{:.0} B", grown / n),
        ),
        (
            "a host's claim, waiting for a connection included (median, p99)",
            format!(
                "{:.1} ms, {:.1} ms ({} claims)",
                median(&mut claims) as f64 / 1000.0,
                percentile(&mut claims, 0.99) as f64 / 1000.0,
                claims.len()
            ),
        ),
        (
            "its transaction alone (median, p99)",
            format!(
                "{:.1} ms, {:.1} ms",
                median(&mut claim_tx) as f64 / 1000.0,
                percentile(&mut claim_tx, 0.99) as f64 / 1000.0,
            ),
        ),
        (
            "GET /v1/executions/{id} while it ran (median, max)",
            median_max(&mut status_us),
        ),
        (
            "the console's page shell, session in the database (median, max)",
            median_max(&mut shell_us),
        ),
        (
            "the console's GET /v1/executions/{id} with its session (median, max)",
            median_max(&mut record_us),
        ),
    ];
    println!("| fleet-sim | |\n| --- | --- |");
    for (k, v) in &rows {
        println!("| {k} | {v} |");
    }
    let summary: BTreeMap<&str, &String> = rows.iter().map(|(k, v)| (*k, v)).collect();
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    if succeeded != total {
        bail!("{} invocations did not succeed", total - succeeded);
    }
    Ok(())
}
