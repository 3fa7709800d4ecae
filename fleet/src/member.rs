//! The host side of the fleet: a host daemon's membership. It registers the host and its
//! VMs, keeps a heartbeat (which renews the leases of what it holds and brings cancels),
//! claims the invocations meant for its VMs, runs them through its [`Runner`] (the host's
//! own drivers, records and policy), and writes their states and output back in batches.
//!
//! # Delivery
//!
//! A claim takes up to [`MemberConfig::claim_batch`] invocations in one transaction
//! (`FOR UPDATE SKIP LOCKED`, so hosts never wait for each other), raises each one's
//! `attempt` and gives it a lease. Every report is fenced by that attempt: once a lease has
//! passed and the invocation was claimed again, or ended otherwise, a late report changes
//! nothing and the host lets the invocation go. The runner records an invocation before it
//! sends it to a guest, keyed by the invocation's id, so a redelivery (the host restarted,
//! or its lease passed) finds the execution already started and resumes reporting it
//! instead of running it again.
//!
//! Output is copied from the host's records from the offset the database already holds, as
//! chunks keyed by `(invocation, stream, offset)`: a batch written twice is stored once.
//! The final state is reported only once every kept byte has been copied.
//!
//! When the database is away, the host keeps serving its local callers; the membership
//! retries, and on its return registers again, claims what it missed and reports what
//! happened meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portless_api::{CommandList, ExecState, ExecutionRecord, Stream, VmInfo};
use sha2::Digest as _;
use tokio::sync::{mpsc, watch};

use crate::store::{Store, StoreError, host_channel, retry};

/// Bytes of one stream copied per invocation per report.
pub const REPORT_CHUNK: usize = 256 * 1024;
/// Bytes of output written per report transaction, at most (beyond one chunk).
pub const REPORT_BUDGET: usize = 4 * 1024 * 1024;

/// How a host takes part in the fleet (`[fleet]` of `host.toml`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberConfig {
    /// The host's name in the fleet (VMs are `host/vm`).
    pub host: String,
    /// The host's labels.
    pub labels: BTreeMap<String, String>,
    /// How long a claim holds an invocation without a heartbeat renewing it.
    pub lease: Duration,
    /// Period of the heartbeat.
    pub heartbeat: Duration,
    /// Period of the claim when no wake-up came.
    pub claim_interval: Duration,
    /// Period of the reports of states and output.
    pub report_interval: Duration,
    /// Invocations claimed per transaction, at most.
    pub claim_batch: usize,
    /// Invocations held (claimed and not yet final) at once, at most.
    pub max_held: usize,
    /// The host software's name and version.
    pub software: String,
}

impl MemberConfig {
    /// A configuration with the defaults: 30 s lease, 2 s heartbeat, 1 s claim fallback,
    /// 100 ms reports, 256 claimed at once, 4096 held.
    pub fn new(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            labels: BTreeMap::new(),
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(2),
            claim_interval: Duration::from_secs(1),
            report_interval: Duration::from_millis(100),
            claim_batch: 256,
            max_held: 4096,
            software: concat!("portless ", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// One VM as the host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmReport {
    /// Its state and facts (its name is the host's).
    pub info: VmInfo,
    /// Its allow-list, once the host has it.
    pub commands: Option<CommandList>,
}

/// An invocation claimed by this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The invocation's id (the fleet's execution id).
    pub id: u64,
    /// The attempt the claim gave it.
    pub attempt: i32,
    /// The VM, by the host's name for it.
    pub vm: String,
    /// Who asked for it at the control plane.
    pub principal: String,
    /// The command.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// A timeout that overrides the command's.
    pub timeout_ms: Option<u32>,
    /// For a push: the program, fetched from the fleet once per host.
    pub push: Option<Push>,
}

/// A push by reference, claimed: the program and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The file name in the guest.
    pub name: String,
    /// The program's SHA-256 (hex).
    pub sha256: String,
    /// Run it once stored.
    pub run: bool,
    /// The program.
    pub program: Arc<Vec<u8>>,
}

/// What became of a claimed invocation at the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// The host's execution (new, or found again: started by an earlier attempt).
    Local(u64),
    /// The host would not run it (its policy, an unknown VM, ...): it ends in this state.
    Refused {
        /// The final state.
        state: ExecState,
        /// Why.
        detail: String,
    },
}

/// The host's side: its VMs, and executions run through its own drivers and records.
pub trait Runner: Send + Sync + 'static {
    /// The host's VMs as they stand.
    fn vms(&self) -> impl Future<Output = Vec<VmReport>> + Send;
    /// Runs a claimed invocation, or finds the execution an earlier attempt started for it.
    fn start(&self, invocation: Claimed) -> impl Future<Output = Started> + Send;
    /// The records of these executions (those that exist).
    fn records(&self, ids: Vec<u64>) -> impl Future<Output = Vec<ExecutionRecord>> + Send;
    /// Up to `max` kept bytes of a stream of an execution from `offset`.
    fn output(
        &self,
        id: u64,
        stream: Stream,
        offset: u64,
        max: usize,
    ) -> impl Future<Output = Option<Vec<u8>>> + Send;
    /// Cancels a running execution.
    fn cancel(&self, id: u64) -> impl Future<Output = ()> + Send;
}

/// An invocation this host holds.
#[derive(Debug)]
struct Held {
    attempt: i32,
    command_id: i64,
    /// The host's execution, once started.
    local: Option<u64>,
    /// Bytes of each stream the database holds.
    copied: [u64; 2],
    /// The state last reported.
    reported: ExecState,
    /// Being started.
    starting: bool,
    /// Whether the cancel was passed on.
    cancelled: bool,
}

/// Counters of a membership, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct MemberStats {
    /// Invocations claimed (a reclaim counts again).
    pub claimed: std::sync::atomic::AtomicU64,
    /// Reports refused by the fence.
    pub fenced: std::sync::atomic::AtomicU64,
    /// Invocations reported final.
    pub finished: std::sync::atomic::AtomicU64,
    /// Claim transactions and their total time, in microseconds.
    pub claims: std::sync::atomic::AtomicU64,
    /// Total time of claim transactions, in microseconds.
    pub claim_us: std::sync::atomic::AtomicU64,
    /// Each claim that took something (the first 100,000), in microseconds: its whole time
    /// (waiting for a connection included) and its transaction's.
    pub claim_times_us: std::sync::Mutex<Vec<(u32, u32)>>,
}

/// A host's membership in the fleet, running until `stop` turns true.
pub struct Member<R> {
    store: Store,
    config: MemberConfig,
    runner: Arc<R>,
    held: HashMap<i64, Held>,
    /// What was last written of each VM (its info without the heartbeat age), and the
    /// revision of its allow-list.
    written: HashMap<String, (String, Option<u32>)>,
    registered: bool,
    stats: Arc<MemberStats>,
    last_error: Option<Instant>,
    /// Invocations the runner refused, to report as final.
    refused: Vec<(i64, i32, ExecState, String)>,
    /// Programs fetched for pushes, by SHA-256, with when they were last used.
    programs: HashMap<String, (Arc<Vec<u8>>, Instant)>,
}

/// How long a fetched program is kept for more pushes of it.
const PROGRAM_KEEP: Duration = Duration::from_secs(600);

/// One invocation's part of a report.
struct Update {
    id: i64,
    attempt: i32,
    rec: ExecutionRecord,
    state: ExecState,
    chunks: Vec<(Stream, u64, Vec<u8>)>,
    copied: [u64; 2],
}

impl<R: Runner> Member<R> {
    /// A membership of the host `config.host` in the fleet of `store`.
    pub fn new(store: Store, config: MemberConfig, runner: Arc<R>) -> Self {
        Self {
            store,
            config,
            runner,
            held: HashMap::new(),
            written: HashMap::new(),
            registered: false,
            stats: Arc::new(MemberStats::default()),
            last_error: None,
            refused: Vec::new(),
            programs: HashMap::new(),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<MemberStats> {
        self.stats.clone()
    }

    /// The same membership, counting into `stats` (shared by simulated hosts).
    pub fn with_stats(mut self, stats: Arc<MemberStats>) -> Self {
        self.stats = stats;
        self
    }

    /// Takes part until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut wake = self.store.listen(host_channel(&self.config.host));
        let (started_tx, mut started_rx) = mpsc::unbounded_channel::<(i64, i32, Started)>();
        let mut heartbeat = tokio::time::interval(self.config.heartbeat);
        let mut claim = tokio::time::interval(self.config.claim_interval);
        let mut report = tokio::time::interval(self.config.report_interval);
        for t in [&mut heartbeat, &mut claim, &mut report] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            let mut claim_now = false;
            let mut beat_now = false;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                Some(()) = wake.recv() => claim_now = true,
                _ = claim.tick() => claim_now = true,
                _ = heartbeat.tick() => beat_now = true,
                _ = report.tick() => {}
                Some((id, attempt, started)) = started_rx.recv() => {
                    self.started(id, attempt, started);
                }
            }
            while let Ok((id, attempt, started)) = started_rx.try_recv() {
                self.started(id, attempt, started);
            }
            if !self.registered || beat_now {
                let result = if self.registered {
                    self.heartbeat().await
                } else {
                    self.register().await
                };
                match result {
                    Ok(()) => self.registered = true,
                    Err(e) => {
                        self.complain("heartbeat", &e);
                        if e.is_transient() {
                            self.registered = false;
                        }
                        continue;
                    }
                }
            }
            if let Err(e) = self.report().await {
                self.complain("report", &e);
            }
            if claim_now && self.held.len() < self.config.max_held {
                match self.claim().await {
                    Ok(claimed) => {
                        let more = claimed.len() >= self.config.claim_batch;
                        for c in claimed {
                            let tx = started_tx.clone();
                            let runner = self.runner.clone();
                            let (id, attempt) = (c.id as i64, c.attempt);
                            tokio::spawn(async move {
                                let started = runner.start(c).await;
                                let _ = tx.send((id, attempt, started));
                            });
                        }
                        if more {
                            claim.reset_immediately();
                        }
                    }
                    Err(e) => self.complain("claim", &e),
                }
            }
        }
        // What was not reported yet is reported by the next daemon, from the records.
        let _ = self.report().await;
    }

    fn complain(&mut self, what: &str, e: &StoreError) {
        // One line per 10 s at most, while the database is away.
        if self
            .last_error
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            eprintln!("portless: fleet {what}: {e} (retrying)");
            self.last_error = Some(Instant::now());
        }
    }

    fn started(&mut self, id: i64, attempt: i32, started: Started) {
        let Some(held) = self.held.get_mut(&id) else {
            return;
        };
        if held.attempt != attempt {
            return;
        }
        held.starting = false;
        match started {
            Started::Local(local) => held.local = Some(local),
            Started::Refused { state, detail } => {
                self.held.remove(&id);
                self.refused.push((id, attempt, state, detail));
            }
        }
    }

    /// Registers the host (a new boot) and writes every VM.
    async fn register(&mut self) -> Result<(), StoreError> {
        let labels = serde_json::to_value(&self.config.labels).unwrap_or_default();
        let (host, software) = (self.config.host.clone(), self.config.software.clone());
        let store = self.store.clone();
        retry(|| {
            let (store, host, software, labels) = (
                store.clone(),
                host.clone(),
                software.clone(),
                labels.clone(),
            );
            async move {
                let client = store.client().await?;
                client
                    .execute(
                        "INSERT INTO hosts (name, labels, software) VALUES ($1, $2, $3) \
                         ON CONFLICT (name) DO UPDATE SET labels = $2, software = $3, \
                         heartbeat_at = now(), boots = hosts.boots + 1",
                        &[&host, &labels, &software],
                    )
                    .await?;
                Ok(())
            }
        })
        .await?;
        self.written.clear();
        self.write_vms(true).await
    }

    /// Writes the VMs whose state or allow-list changed since last written (all with
    /// `all`, and then removes those the host no longer has).
    async fn write_vms(&mut self, all: bool) -> Result<(), StoreError> {
        let vms = self.runner.vms().await;
        let mut changed = Vec::new();
        for vm in &vms {
            let mut info = vm.info.clone();
            info.heartbeat_age_ms = None;
            let text = serde_json::to_string(&info).unwrap_or_default();
            let revision = vm.commands.as_ref().map(|c| c.config_revision);
            let same = self
                .written
                .get(&info.name)
                .is_some_and(|(t, r)| *t == text && (*r == revision || revision.is_none()));
            if !same {
                changed.push((info, vm.commands.clone(), text, revision));
            }
        }
        if changed.is_empty() && !all {
            return Ok(());
        }
        let mut client = self.store.client().await?;
        let tx = client.transaction().await?;
        let upsert = tx
            .prepare(
                "INSERT INTO vms (host, name, labels, info, commands, commands_revision, \
                 commands_at) VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $5::jsonb IS NULL \
                 THEN NULL ELSE now() END) \
                 ON CONFLICT (host, name) DO UPDATE SET labels = $3, info = $4, \
                 commands = COALESCE($5, vms.commands), \
                 commands_revision = COALESCE($6, vms.commands_revision), \
                 commands_at = CASE WHEN $5::jsonb IS NULL THEN vms.commands_at ELSE now() END, \
                 updated_at = now()",
            )
            .await?;
        for (info, commands, _, revision) in &changed {
            let labels = serde_json::to_value(&info.labels).unwrap_or_default();
            let info_json = serde_json::to_value(info).unwrap_or_default();
            let commands = commands
                .as_ref()
                .map(|c| serde_json::to_value(c).unwrap_or_default());
            let revision = revision.map(i64::from);
            tx.execute(
                &upsert,
                &[
                    &self.config.host,
                    &info.name,
                    &labels,
                    &info_json,
                    &commands,
                    &revision,
                ],
            )
            .await?;
        }
        if all {
            let names: Vec<String> = vms.iter().map(|v| v.info.name.clone()).collect();
            tx.execute(
                "DELETE FROM vms WHERE host = $1 AND NOT (name = ANY($2))",
                &[&self.config.host, &names],
            )
            .await?;
        }
        tx.commit().await?;
        for (info, _, text, revision) in changed {
            let revision = revision.or_else(|| self.written.get(&info.name).and_then(|w| w.1));
            self.written.insert(info.name, (text, revision));
        }
        Ok(())
    }

    /// The heartbeat: the host's, its VMs' changes, the leases of what it holds (letting go
    /// of what is no longer its own), and the cancels asked for.
    async fn heartbeat(&mut self) -> Result<(), StoreError> {
        let client = self.store.client().await?;
        let n = client
            .execute(
                "UPDATE hosts SET heartbeat_at = now() WHERE name = $1",
                &[&self.config.host],
            )
            .await?;
        drop(client);
        if n == 0 {
            // Removed from the fleet meanwhile: join again.
            return self.register().await;
        }
        self.write_vms(false).await?;
        let (ids, attempts): (Vec<i64>, Vec<i32>) =
            self.held.iter().map(|(id, h)| (*id, h.attempt)).unzip();
        if ids.is_empty() {
            return Ok(());
        }
        let lease_ms = i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
        let client = self.store.client().await?;
        let rows = client
            .query(
                "UPDATE invocations i SET lease_until = now() + $3::bigint * interval '1 millisecond' \
                 FROM unnest($1::bigint[], $2::integer[]) AS h(id, attempt) \
                 WHERE i.id = h.id AND i.attempt = h.attempt \
                 AND i.state IN ('in_progress', 'running') \
                 RETURNING i.id, i.cancel_requested",
                &[&ids, &attempts, &lease_ms],
            )
            .await?;
        drop(client);
        let mut kept = std::collections::HashSet::new();
        for row in rows {
            let (id, cancel): (i64, bool) = (row.get(0), row.get(1));
            kept.insert(id);
            if let Some(h) = self.held.get_mut(&id)
                && cancel
                && !h.cancelled
                && let Some(local) = h.local
            {
                h.cancelled = true;
                let runner = self.runner.clone();
                tokio::spawn(async move { runner.cancel(local).await });
            }
        }
        let before = self.held.len();
        self.held.retain(|id, h| kept.contains(id) || h.starting);
        let lost = before - self.held.len();
        // Ordering: Relaxed: a statistic.
        self.stats
            .fenced
            .fetch_add(lost as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Claims the invocations meant for this host that it may run now: new ones (within
    /// their commands' `max_concurrency`, not once `max_errors` was passed), and its own
    /// whose lease has passed (a redelivery).
    async fn claim(&mut self) -> Result<Vec<Claimed>, StoreError> {
        let t0 = Instant::now();
        let room = self.config.max_held.saturating_sub(self.held.len());
        let limit = i64::try_from(self.config.claim_batch.min(room)).unwrap_or(0);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let lease_ms = i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX);
        let mut client = self.store.client().await?;
        let waited = t0.elapsed();
        let tx = client.transaction().await?;
        // The commands with limits are locked first, in id order, so that claims and
        // reports of one command take their locks in the same order.
        let limited = tx
            .query(
                "SELECT c.id, c.active, c.max_concurrency, c.errors, c.max_errors \
                 FROM commands c WHERE c.id IN (SELECT DISTINCT command_id FROM invocations \
                   WHERE host = $1 AND state IN ('pending', 'delayed')) \
                 AND (c.max_concurrency IS NOT NULL OR c.max_errors IS NOT NULL) \
                 ORDER BY c.id FOR UPDATE",
                &[&self.config.host],
            )
            .await?;
        let mut room: HashMap<i64, i64> = HashMap::new();
        for row in limited {
            let (id, active, max_c, errors, max_e): (i64, i32, Option<i32>, i32, Option<i32>) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            let left = if max_e.is_some_and(|m| errors > m) {
                0
            } else {
                max_c.map_or(i64::MAX, |m| i64::from(m) - i64::from(active))
            };
            room.insert(id, left.max(0));
        }
        let candidates = tx
            .query(
                "SELECT id, command_id, state FROM invocations \
                 WHERE host = $1 AND (state IN ('pending', 'delayed') \
                   OR (state IN ('in_progress', 'running') AND lease_until < now())) \
                 ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&self.config.host, &limit],
            )
            .await?;
        let mut take: Vec<i64> = Vec::new();
        for row in candidates {
            let (id, command, state): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
            let fresh = state == "pending" || state == "delayed";
            if fresh && let Some(left) = room.get_mut(&command) {
                if *left == 0 {
                    continue;
                }
                *left -= 1;
            }
            take.push(id);
        }
        let rows = if take.is_empty() {
            Vec::new()
        } else {
            tx.query(
                "UPDATE invocations SET attempt = attempt + 1, \
                 lease_until = now() + $2::bigint * interval '1 millisecond', \
                 state = CASE WHEN state IN ('pending', 'delayed') THEN 'in_progress' \
                   ELSE state END \
                 WHERE id = ANY($1) \
                 RETURNING id, attempt, command_id, vm, principal, command, args, timeout_ms, \
                   state, stdout_stored, stderr_stored, program, program_name, run",
                &[&take, &lease_ms],
            )
            .await?
        };
        tx.commit().await?;
        let wanted: Vec<String> = rows
            .iter()
            .filter_map(|r| r.get::<_, Option<String>>(11))
            .collect();
        let fetch_failed = match self.fetch_programs(wanted).await {
            Ok(()) => false,
            Err(e) => {
                // Those pushes are claimed again once their lease passes.
                self.complain("program fetch", &e);
                true
            }
        };
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let sha: Option<String> = row.get(11);
            let push = match sha {
                None => None,
                Some(sha) => match self.programs.get(&sha) {
                    Some((program, _)) => Some(Push {
                        name: row.get::<_, Option<String>>(12).unwrap_or_default(),
                        sha256: sha,
                        run: row.get(13),
                        program: program.clone(),
                    }),
                    None => {
                        if !fetch_failed {
                            self.refused.push((
                                row.get(0),
                                row.get(1),
                                ExecState::Rejected,
                                "the program's bytes in the fleet do not match its SHA-256".into(),
                            ));
                        }
                        continue;
                    }
                },
            };
            let id: i64 = row.get(0);
            let attempt: i32 = row.get(1);
            let args: serde_json::Value = row.get(6);
            let timeout: Option<i64> = row.get(7);
            let state: String = row.get(8);
            let (out, err): (i64, i64) = (row.get(9), row.get(10));
            let c = Claimed {
                id: id as u64,
                attempt,
                vm: row.get(3),
                principal: row.get(4),
                command: row.get(5),
                args: serde_json::from_value(args).unwrap_or_default(),
                timeout_ms: timeout.and_then(|t| u32::try_from(t).ok()),
                push,
            };
            self.held.insert(
                id,
                Held {
                    attempt,
                    command_id: row.get(2),
                    local: None,
                    copied: [out as u64, err as u64],
                    reported: ExecState::from_name(&state).unwrap_or(ExecState::InProgress),
                    starting: true,
                    cancelled: false,
                },
            );
            claimed.push(c);
        }
        // Ordering: Relaxed: statistics.
        self.stats
            .claimed
            .fetch_add(claimed.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.stats
            .claims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let took = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats
            .claim_us
            .fetch_add(took, std::sync::atomic::Ordering::Relaxed);
        if !claimed.is_empty() {
            let mut times = self
                .stats
                .claim_times_us
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if times.len() < 100_000 {
                let waited = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
                times.push((
                    u32::try_from(took).unwrap_or(u32::MAX),
                    u32::try_from(took.saturating_sub(waited)).unwrap_or(u32::MAX),
                ));
            }
        }
        Ok(claimed)
    }

    /// Fetches the programs of `wanted` this host does not hold yet (once each, recorded in
    /// `program_fetches`), checking each one's SHA-256; forgets those unused for
    /// [`PROGRAM_KEEP`].
    async fn fetch_programs(&mut self, wanted: Vec<String>) -> Result<(), StoreError> {
        let now = Instant::now();
        self.programs.retain(|sha, (_, used)| {
            wanted.contains(sha) || now.duration_since(*used) < PROGRAM_KEEP
        });
        for sha in wanted {
            if let Some(entry) = self.programs.get_mut(&sha) {
                entry.1 = now;
                continue;
            }
            let client = self.store.client().await?;
            let row = client
                .query_opt("SELECT data FROM programs WHERE sha256 = $1", &[&sha])
                .await?;
            let Some(row) = row else {
                continue;
            };
            let data: Vec<u8> = row.get(0);
            if hex::encode(sha2::Sha256::digest(&data)) != sha {
                eprintln!(
                    "portless: fleet program {sha}: its bytes do not match their SHA-256; not pushed"
                );
                continue;
            }
            client
                .execute(
                    "INSERT INTO program_fetches (host, sha256) VALUES ($1, $2)",
                    &[&self.config.host, &sha],
                )
                .await?;
            self.programs.insert(sha, (Arc::new(data), now));
        }
        Ok(())
    }

    /// Writes what changed of the invocations held: states, output, ends; and the
    /// refusals. One transaction; the invocations whose fence fails are let go.
    async fn report(&mut self) -> Result<(), StoreError> {
        let ids: Vec<u64> = self.held.values().filter_map(|h| h.local).collect();
        if ids.is_empty() && self.refused.is_empty() {
            return Ok(());
        }
        let records = if ids.is_empty() {
            Vec::new()
        } else {
            self.runner.records(ids).await
        };
        let by_local: HashMap<u64, ExecutionRecord> =
            records.into_iter().map(|r| (r.id.0, r)).collect();
        let mut updates: Vec<Update> = Vec::new();
        let mut budget = REPORT_BUDGET;
        let mut held: Vec<(&i64, &Held)> = self.held.iter().collect();
        held.sort_by_key(|(id, h)| (h.command_id, **id));
        for (id, h) in held {
            let Some(rec) = h.local.and_then(|l| by_local.get(&l)) else {
                continue;
            };
            let mut chunks = Vec::new();
            let mut copied = h.copied;
            for (k, stream) in [(0, Stream::Stdout), (1, Stream::Stderr)] {
                let stored = rec.totals(stream).stored_len;
                if copied[k] < stored && budget > 0 {
                    let want = REPORT_CHUNK.min(budget.max(1));
                    if let Some(data) = self
                        .runner
                        .output(rec.id.0, stream, copied[k], want)
                        .await
                        .filter(|d| !d.is_empty())
                    {
                        budget = budget.saturating_sub(data.len());
                        chunks.push((stream, copied[k], data));
                        copied[k] += chunks.last().map_or(0, |c| c.2.len() as u64);
                    }
                }
            }
            let all_copied =
                copied[0] >= rec.stdout.stored_len && copied[1] >= rec.stderr.stored_len;
            let state = match rec.state {
                ExecState::Pending => ExecState::InProgress,
                s if s.is_final() && !all_copied => ExecState::Running,
                s => s,
            };
            if chunks.is_empty() && state == h.reported && copied == h.copied {
                continue;
            }
            updates.push(Update {
                id: *id,
                attempt: h.attempt,
                rec: rec.clone(),
                state,
                chunks,
                copied,
            });
        }
        if updates.is_empty() && self.refused.is_empty() {
            return Ok(());
        }
        let refused = std::mem::take(&mut self.refused);
        let result = write_report(&self.store, &updates, &refused).await;
        let accepted = match result {
            Ok(a) => a,
            Err(e) => {
                if e.is_transient() {
                    // Written again at the next report (the chunks are keyed, a batch that
                    // did commit is not stored twice).
                    self.refused = refused;
                }
                return Err(e);
            }
        };
        for u in updates {
            if !accepted.contains(&u.id) {
                self.held.remove(&u.id);
                // Ordering: Relaxed: a statistic.
                self.stats
                    .fenced
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            if u.state.is_final() {
                self.held.remove(&u.id);
                // Ordering: Relaxed: a statistic.
                self.stats
                    .finished
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            } else if let Some(h) = self.held.get_mut(&u.id) {
                h.copied = u.copied;
                h.reported = u.state;
            }
        }
        Ok(())
    }
}

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.and_then(|v| i64::try_from(v).ok())
}

/// Writes one report in one transaction: the fenced updates first, then the chunks of the
/// invocations whose fence held. The ids whose fence held.
async fn write_report(
    store: &Store,
    updates: &[Update],
    refused: &[(i64, i32, ExecState, String)],
) -> Result<std::collections::HashSet<i64>, StoreError> {
    let mut client = store.client().await?;
    let tx = client.transaction().await?;
    let mut accepted = std::collections::HashSet::new();
    if !updates.is_empty() {
        let mut cols = ReportColumns::default();
        for u in updates {
            cols.push(u);
        }
        let rows = tx
            .query(
                "UPDATE invocations i SET state = u.state, local_id = u.local_id, \
                   started_at_ms = COALESCE(u.started, i.started_at_ms), \
                   finished_at_ms = u.finished, duration_ms = u.duration, \
                   exit_code = u.exit_code, signal = u.signal, detail = u.detail, \
                   agent_generation = u.generation, agent_counter = u.counter, \
                   output_cap = u.cap, \
                   stdout_stored = u.out_stored, stdout_total = u.out_total, \
                   stderr_stored = u.err_stored, stderr_total = u.err_total \
                 FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::bigint[], \
                   $5::bigint[], $6::bigint[], $7::bigint[], $8::integer[], $9::integer[], \
                   $10::text[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], \
                   $15::bigint[], $16::bigint[], $17::bigint[]) \
                   AS u(id, attempt, state, local_id, started, finished, duration, exit_code, \
                        signal, detail, generation, counter, cap, out_stored, out_total, \
                        err_stored, err_total) \
                 WHERE i.id = u.id AND i.attempt = u.attempt \
                   AND i.state IN ('in_progress', 'running') \
                 RETURNING i.id",
                &[
                    &cols.id,
                    &cols.attempt,
                    &cols.state,
                    &cols.local,
                    &cols.started,
                    &cols.finished,
                    &cols.duration,
                    &cols.exit_code,
                    &cols.signal,
                    &cols.detail,
                    &cols.generation,
                    &cols.counter,
                    &cols.cap,
                    &cols.out_stored,
                    &cols.out_total,
                    &cols.err_stored,
                    &cols.err_total,
                ],
            )
            .await?;
        accepted.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
        let (mut inv, mut stream, mut offset, mut data) = (vec![], vec![], vec![], vec![]);
        for u in updates.iter().filter(|u| accepted.contains(&u.id)) {
            for (s, off, bytes) in &u.chunks {
                inv.push(u.id);
                stream.push(match s {
                    Stream::Stdout => 0i16,
                    Stream::Stderr => 1,
                });
                offset.push(i64::try_from(*off).unwrap_or(i64::MAX));
                data.push(bytes.as_slice());
            }
        }
        if !inv.is_empty() {
            tx.execute(
                "INSERT INTO output (invocation, stream, \"offset\", data) \
                 SELECT * FROM unnest($1::bigint[], $2::smallint[], $3::bigint[], $4::bytea[]) \
                 ON CONFLICT DO NOTHING",
                &[&inv, &stream, &offset, &data],
            )
            .await?;
        }
    }
    for (id, attempt, state, detail) in refused {
        tx.execute(
            "UPDATE invocations SET state = $3, detail = $4, \
               finished_at_ms = (extract(epoch FROM clock_timestamp()) * 1000)::bigint \
             WHERE id = $1 AND attempt = $2 AND state IN ('in_progress', 'running')",
            &[id, attempt, &state.as_str(), detail],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(accepted)
}

/// The columns of a report's `unnest`.
#[derive(Default)]
struct ReportColumns {
    id: Vec<i64>,
    attempt: Vec<i32>,
    state: Vec<&'static str>,
    local: Vec<i64>,
    started: Vec<Option<i64>>,
    finished: Vec<Option<i64>>,
    duration: Vec<Option<i64>>,
    exit_code: Vec<Option<i32>>,
    signal: Vec<Option<i32>>,
    detail: Vec<Option<String>>,
    generation: Vec<Option<i64>>,
    counter: Vec<Option<i64>>,
    cap: Vec<i64>,
    out_stored: Vec<i64>,
    out_total: Vec<i64>,
    err_stored: Vec<i64>,
    err_total: Vec<i64>,
}

impl ReportColumns {
    fn push(&mut self, u: &Update) {
        let r = &u.rec;
        let fin = u.state.is_final();
        self.id.push(u.id);
        self.attempt.push(u.attempt);
        self.state.push(u.state.as_str());
        self.local.push(i64::try_from(r.id.0).unwrap_or(i64::MAX));
        self.started.push(opt_i64(r.started_at_ms));
        self.finished
            .push(opt_i64(r.finished_at_ms.filter(|_| fin)));
        self.duration.push(opt_i64(r.duration_ms.filter(|_| fin)));
        self.exit_code.push(r.exit_code.filter(|_| fin));
        self.signal.push(r.signal.filter(|_| fin));
        self.detail.push(r.detail.clone().filter(|_| fin));
        self.generation.push(r.agent_generation.map(i64::from));
        self.counter.push(r.agent_counter.map(i64::from));
        self.cap.push(opt_i64(Some(r.output_cap)).unwrap_or(0));
        // What the database holds after this report (not more than was copied).
        self.out_stored
            .push(opt_i64(Some(u.copied[0])).unwrap_or(0));
        self.out_total
            .push(opt_i64(Some(r.stdout.total_len.max(u.copied[0]))).unwrap_or(0));
        self.err_stored
            .push(opt_i64(Some(u.copied[1])).unwrap_or(0));
        self.err_total
            .push(opt_i64(Some(r.stderr.total_len.max(u.copied[1]))).unwrap_or(0));
    }
}
