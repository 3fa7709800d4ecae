//! The `portless` command line, for every verb but `serve`: argument parsing (clap), the
//! verbs over `portless_api`'s client, tables for people and `--json` for scripts, and the exit
//! codes scripts rely on.
//!
//! # Exit codes
//!
//! - `0`: done (for `exec --wait`/`--follow`: every execution succeeded).
//! - `exec --wait`/`--follow`: the remote exit code; `128 + signal` when the program was
//!   killed by a signal ([`EXIT_SIGNAL_BASE`]; a cancelled execution without a recorded
//!   signal counts as SIGTERM, which is what the agent sends first); [`EXIT_TIMED_OUT`] (124)
//!   on timeout; [`EXIT_NOT_RUN`] (125) when Portless itself could not run it (rejected,
//!   denied, undeliverable, agent lost, failed to start, skipped past `--max-errors`). Each
//!   non-zero outcome gets a one-line reason on stderr. With several VMs: the first non-zero
//!   code in VM order, or 0.
//! - `exec` without `--wait`: 0 when every VM accepted the execution, else 125.
//! - [`EXIT_ERROR`] (1): anything else that went wrong (daemon unreachable, an error answer
//!   from the daemon, a file that cannot be read), with `portless: <message>` on stderr.
//! - 2: bad usage (clap's code).
//!
//! Pure pieces (tables, exit-code rules, line prefixing) are pinned without a daemon by
//! the tests in `cli/tests.rs`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use clap::builder::RangedU64ValueParser;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use host_shim::config::{DEFAULT_SOCKET, Target};
use portless_api::{
    AuditOrder, AuditQuery, AuditRecord, Client, ClientError, CommandList, Dispatched, ExecRequest,
    ExecResponse, ExecState, ExecutionId, ExecutionRecord, FollowEvent, MetricsResponse, Param,
    PushOutcome, PushRequest, Stream, VmInfo,
};

/// The environment variable that names the daemon's socket when `--socket` is not given.
pub const SOCKET_ENV: &str = "PORTLESS_SOCKET";

/// Exit code for errors of Portless or of the caller that are not about a remote program.
pub const EXIT_ERROR: u8 = 1;
/// Exit code of bad usage (clap's).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of an execution that timed out.
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit code of an execution that Portless could not run.
pub const EXIT_NOT_RUN: u8 = 125;
/// A program killed by signal `n` exits `EXIT_SIGNAL_BASE + n`.
pub const EXIT_SIGNAL_BASE: u8 = 128;
/// SIGTERM, what a cancelled execution is assumed to have died of when no signal is recorded.
const SIGTERM: i32 = 15;

/// Bytes asked for per `output` request.
const OUTPUT_PAGE: usize = 1024 * 1024;
/// How many times in a row a wait or follow is retried after the daemon went away (a
/// restart of the daemon), [`RETRY_DELAY`] apart.
const RETRY_ATTEMPTS: u32 = 30;
/// The pause before a wait or follow is retried.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Audit entries shown when `--limit` is not given.
const DEFAULT_AUDIT_LIMIT: usize = 100;

/// `portless`: run allow-listed commands in VMs through shared memory.
#[derive(Debug, Parser)]
#[command(
    name = "portless",
    version,
    about = "Run allow-listed commands in VMs through shared memory, without a network.",
    after_help = "The daemon's socket is --socket PATH, else $PORTLESS_SOCKET, else \
                  /run/portless/portless.sock."
)]
pub struct Cli {
    /// The daemon's API socket [default: $PORTLESS_SOCKET, else /run/portless/portless.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print JSON for scripts instead of tables for people.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// List the VMs and the state of their agents.
    Vms,
    /// List the commands a VM allows.
    Commands {
        /// The VM.
        vm: String,
    },
    /// Run a command on a VM, a comma list of VMs, every VM with a label, or all.
    #[command(
        override_usage = "portless exec [OPTIONS] <TARGET> <COMMAND> [ARGS]...\n       \
                                portless exec [OPTIONS] --all <COMMAND> [ARGS]..."
    )]
    Exec(ExecArgs),
    /// Show an execution's record.
    Status {
        /// The execution.
        id: ExecutionId,
    },
    /// Print an execution's output as recorded.
    Output {
        /// The execution.
        id: ExecutionId,
        /// Which stream.
        #[arg(long, value_enum, default_value_t = StreamArg::Stdout)]
        stream: StreamArg,
    },
    /// Cancel a running execution.
    Cancel {
        /// The execution.
        id: ExecutionId,
    },
    /// Copy a program into a VM, and run it with --run.
    Push(PushArgs),
    /// Measure the round trip to a VM's agent.
    Ping {
        /// The VM.
        vm: String,
        /// How many round trips.
        #[arg(long, short = 'c', default_value_t = 1, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
    },
    /// Show a VM's figures (uptime, load, memory, agent counters).
    Metrics {
        /// The VM.
        vm: String,
    },
    /// Show the audit log, newest last.
    Audit(AuditArgs),
    /// Run the daemon: `portless serve --config host.toml` (must be the first argument).
    Serve {
        /// The daemon's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// `portless exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Run on every VM (then the first word is the command).
    #[arg(long)]
    pub all: bool,
    /// Wait for the end; exit with the remote exit code (see `portless --help`).
    #[arg(long)]
    pub wait: bool,
    /// Print the output as it arrives (stdout to stdout, stderr to stderr; with several
    /// VMs each line is prefixed with `vm: `), then exit as --wait does.
    #[arg(long)]
    pub follow: bool,
    /// Timeout in milliseconds, instead of the command's own.
    #[arg(long, value_name = "MS")]
    pub timeout: Option<u32>,
    /// Run on at most N VMs at once.
    #[arg(long, value_name = "N", value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_concurrency: Option<usize>,
    /// Stop dispatching once more than N executions have failed.
    #[arg(long, value_name = "N")]
    pub max_errors: Option<usize>,
    /// TARGET (`vm1`, `vm1,vm2`, `label=value`), unless --all; then COMMAND and its
    /// arguments (after `--` when one starts with `-`).
    #[arg(value_name = "TARGET COMMAND ARGS", required = true, num_args = 1..,
          allow_negative_numbers = true)]
    pub words: Vec<String>,
}

/// What an `exec` runs, where: the positional words sorted out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecPlan {
    /// The target as the API takes it (`vm1`, `a,b`, `role=web`, `*`).
    pub target: String,
    /// The command name.
    pub command: String,
    /// Its arguments.
    pub args: Vec<String>,
}

impl ExecArgs {
    /// Sorts out the positional words: `TARGET COMMAND ARGS...`, or `COMMAND ARGS...` with
    /// `--all`; the target is checked and written in its canonical form.
    pub fn plan(&self) -> Result<ExecPlan, String> {
        let (target, rest) = if self.all {
            (Target::All, self.words.as_slice())
        } else {
            match self.words.as_slice() {
                [target, rest @ ..] if !rest.is_empty() => {
                    (Target::parse(target).map_err(|e| e.to_string())?, rest)
                }
                _ => {
                    return Err("a TARGET and a COMMAND are needed (or --all and a COMMAND)".into());
                }
            }
        };
        let (command, args) = rest
            .split_first()
            .ok_or_else(|| "a COMMAND is needed".to_owned())?;
        Ok(ExecPlan {
            target: target.to_string(),
            command: command.clone(),
            args: args.to_vec(),
        })
    }
}

/// `portless push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The VM.
    pub vm: String,
    /// The program to copy.
    pub file: PathBuf,
    /// Run it once stored.
    #[arg(long)]
    pub run: bool,
    /// Its name in the guest [default: the file's name].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Timeout of the run, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub timeout: Option<u32>,
}

/// `portless audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only calls of this principal.
    #[arg(long, value_name = "P")]
    pub principal: Option<String>,
    /// Only calls of this action (`exec`, `push`, ...).
    #[arg(long, value_name = "A")]
    pub action: Option<String>,
    /// Only denied calls.
    #[arg(long)]
    pub denied: bool,
    /// The newest N entries.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_AUDIT_LIMIT)]
    pub limit: usize,
}

/// An output stream on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StreamArg {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl From<StreamArg> for Stream {
    fn from(s: StreamArg) -> Self {
        match s {
            StreamArg::Stdout => Stream::Stdout,
            StreamArg::Stderr => Stream::Stderr,
        }
    }
}

/// Parses the command line (with the program name first), including the checks clap cannot
/// express (the words of `exec`); a usage error is a clap error, exit code 2.
pub fn parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args)?;
    if let Verb::Exec(exec) = &cli.verb
        && let Err(message) = exec.plan()
    {
        let mut command = Cli::command();
        command.build();
        let error = match command.find_subcommand_mut("exec") {
            Some(exec) => exec.error(ErrorKind::InvalidValue, message),
            None => Cli::command().error(ErrorKind::InvalidValue, message),
        };
        return Err(error);
    }
    Ok(cli)
}

/// The daemon's socket: `--socket`, else `$PORTLESS_SOCKET` (when set and not empty), else
/// the default of `portless serve`.
pub fn resolve_socket(flag: Option<&Path>, env: Option<OsString>) -> PathBuf {
    match (flag, env) {
        (Some(path), _) => path.to_owned(),
        (None, Some(env)) if !env.is_empty() => PathBuf::from(env),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// The `portless` command line for every verb but `serve`: parses `args` (program name
/// first), runs the verb and returns the exit code.
pub fn main_cli<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match parse_args(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(EXIT_USAGE));
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portless: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let mut stdout = io::stdout().lock();
    let mut stderr = io::stderr();
    let progress = stderr.is_terminal();
    let mut io = Io {
        out: &mut stdout,
        err: &mut stderr,
        progress,
    };
    let client = Client::new(resolve_socket(
        cli.socket.as_deref(),
        std::env::var_os(SOCKET_ENV),
    ));
    let code = runtime.block_on(run(&cli, &client, &mut io));
    let _ = io.out.flush();
    ExitCode::from(code)
}

/// Where a verb writes: stdout for results, stderr for reasons and progress.
pub struct Io<'a> {
    /// Results (tables, JSON, program output).
    pub out: &'a mut dyn Write,
    /// Reasons, errors, the program's stderr, progress.
    pub err: &'a mut dyn Write,
    /// Whether to draw a progress line on `err` (it is a terminal).
    pub progress: bool,
}

/// Runs a parsed command line against `client`; returns the exit code. Errors are reported
/// on `io.err` as `portless: <message>`.
pub async fn run(cli: &Cli, client: &Client, io: &mut Io<'_>) -> u8 {
    let json = cli.json;
    let result = match &cli.verb {
        Verb::Vms => vms(client, json, io).await,
        Verb::Commands { vm } => commands(client, vm, json, io).await,
        Verb::Exec(args) => exec(client, args, json, io).await,
        Verb::Status { id } => status(client, *id, json, io).await,
        Verb::Output { id, stream } => output(client, *id, (*stream).into(), json, io).await,
        Verb::Cancel { id } => cancel(client, *id, json, io).await,
        Verb::Push(args) => push(client, args, json, io).await,
        Verb::Ping { vm, count } => ping(client, vm, *count, json, io).await,
        Verb::Metrics { vm } => metrics(client, vm, json, io).await,
        Verb::Audit(args) => audit(client, args, json, io).await,
        Verb::Serve { .. } => {
            let _ = writeln!(
                io.err,
                "portless: `serve` must be the first argument: portless serve --config PATH"
            );
            return EXIT_USAGE;
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(io.err, "portless: {}", printable(&e.to_string()));
            EXIT_ERROR
        }
    }
}

/// Why a verb failed (exit code 1).
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Message(String),
}

type VerbResult = Result<u8, CliError>;

fn print_json<T: Serialize>(io: &mut Io<'_>, value: &T) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Message(format!("cannot encode JSON: {e}")))?;
    writeln!(io.out, "{text}")?;
    Ok(())
}

async fn vms(client: &Client, json: bool, io: &mut Io<'_>) -> VerbResult {
    let vms = client.vms().await?;
    if json {
        print_json(io, &serde_json::json!({ "vms": vms }))?;
    } else {
        io.out.write_all(vms_table(&vms).as_bytes())?;
    }
    Ok(0)
}

async fn commands(client: &Client, vm: &str, json: bool, io: &mut Io<'_>) -> VerbResult {
    let list = client.commands(vm).await?;
    if json {
        print_json(io, &list)?;
    } else {
        io.out.write_all(commands_table(&list).as_bytes())?;
    }
    Ok(0)
}

async fn exec(client: &Client, args: &ExecArgs, json: bool, io: &mut Io<'_>) -> VerbResult {
    let plan = args.plan().map_err(CliError::Message)?;
    let request = ExecRequest {
        target: plan.target.clone(),
        command: plan.command.clone(),
        args: plan.args.clone(),
        timeout_ms: args.timeout,
        max_concurrency: args.max_concurrency,
        max_errors: args.max_errors,
    };
    let mut progress = Progress::new(io.progress);
    let fan_out = plan.target.contains([',', '=', '*']);
    if fan_out {
        progress.show(
            io,
            &format!("exec {}: dispatching to {}...", plan.command, plan.target),
        );
    }
    let answer = client.exec(&request).await;
    progress.clear(io);
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) if e.status() == Some(403) => {
            writeln!(io.err, "portless: {}", printable(&e.to_string()))?;
            return Ok(EXIT_NOT_RUN);
        }
        Err(e) => return Err(e.into()),
    };
    if args.follow {
        follow_all(client, &answer, args.max_errors, io).await
    } else if args.wait {
        wait_all(client, &answer, args.max_errors, json, io).await
    } else {
        dispatched(&answer, args.max_errors, json, io)
    }
}

/// `exec` without `--wait`: what was dispatched.
fn dispatched(
    answer: &ExecResponse,
    max_errors: Option<usize>,
    json: bool,
    io: &mut Io<'_>,
) -> VerbResult {
    if json {
        print_json(io, answer)?;
    } else {
        io.out.write_all(dispatch_table(answer).as_bytes())?;
    }
    let mut code = 0;
    for d in answer.executions.iter().filter(|d| d.refused()) {
        let result = VmResult::refused(d);
        write_reason(io, &result)?;
        code = EXIT_NOT_RUN;
    }
    for vm in &answer.skipped {
        write_reason(io, &VmResult::skipped(vm, max_errors))?;
        code = EXIT_NOT_RUN;
    }
    Ok(code)
}

/// `exec --wait`: waits for every execution, prints the summary, exits as documented.
async fn wait_all(
    client: &Client,
    answer: &ExecResponse,
    max_errors: Option<usize>,
    json: bool,
    io: &mut Io<'_>,
) -> VerbResult {
    let mut results: Vec<Option<VmResult>> = Vec::new();
    let mut tasks = JoinSet::new();
    for (index, d) in answer.executions.iter().enumerate() {
        match d.id {
            Some(id) if !d.refused() => {
                results.push(None);
                let client = client.clone();
                tasks.spawn(async move { (index, id, wait_with_retry(&client, id).await) });
            }
            _ => results.push(Some(VmResult::refused(d))),
        }
    }
    let total = answer.executions.len() + answer.skipped.len();
    let mut progress = Progress::new(io.progress && total > 1);
    let mut done = results.iter().filter(|r| r.is_some()).count();
    let mut failed = done;
    let show = |progress: &mut Progress, io: &mut Io<'_>, done: usize, failed: usize| {
        progress.show(
            io,
            &format!(
                "exec: {done}/{} finished, {failed} not successful",
                results_len(answer)
            ),
        );
    };
    show(&mut progress, io, done, failed);
    while let Some(joined) = tasks.join_next().await {
        let (index, id, outcome) =
            joined.map_err(|e| CliError::Message(format!("a wait task failed: {e}")))?;
        let vm = answer
            .executions
            .get(index)
            .map_or_else(String::new, |d| d.vm.clone());
        let result = match outcome {
            Ok(record) => VmResult::from_record(&record),
            Err(e) => VmResult::lost(&vm, id, &e),
        };
        done += 1;
        failed += usize::from(result.exit_code != 0);
        if let Some(slot) = results.get_mut(index) {
            *slot = Some(result);
        }
        show(&mut progress, io, done, failed);
    }
    progress.clear(io);
    let mut results: Vec<VmResult> = results.into_iter().flatten().collect();
    results.extend(
        answer
            .skipped
            .iter()
            .map(|vm| VmResult::skipped(vm, max_errors)),
    );
    let code = first_failure(results.iter().map(|r| r.exit_code));
    if json {
        print_json(
            io,
            &WaitSummary {
                exit_code: code,
                results: &results,
            },
        )?;
    } else {
        io.out.write_all(summary_table(&results).as_bytes())?;
    }
    for r in results.iter().filter(|r| r.exit_code != 0) {
        write_reason(io, r)?;
    }
    Ok(code)
}

/// `exec --wait --json`: the exit code and every VM's result, in VM order.
#[derive(Serialize)]
struct WaitSummary<'r> {
    exit_code: u8,
    results: &'r [VmResult],
}

fn results_len(answer: &ExecResponse) -> usize {
    answer.executions.len() + answer.skipped.len()
}

/// Waits until the execution ends, riding out a restart of the daemon.
async fn wait_with_retry(client: &Client, id: ExecutionId) -> Result<ExecutionRecord, ClientError> {
    let mut failures = 0;
    loop {
        match client.wait_final(id).await {
            Ok(record) => return Ok(record),
            Err(e) if e.is_transport() && failures < RETRY_ATTEMPTS => {
                failures += 1;
                tokio::time::sleep(RETRY_DELAY).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What a follow task tells the printer.
enum FollowMsg {
    Output {
        index: usize,
        stream: Stream,
        data: Vec<u8>,
    },
    Done {
        index: usize,
        id: ExecutionId,
        outcome: Box<Result<ExecutionRecord, ClientError>>,
    },
}

/// `exec --follow`: prints the output as it arrives, then exits as `--wait` does.
async fn follow_all(
    client: &Client,
    answer: &ExecResponse,
    max_errors: Option<usize>,
    io: &mut Io<'_>,
) -> VerbResult {
    let several = results_len(answer) > 1;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut results: Vec<Option<VmResult>> = Vec::new();
    let mut tasks = JoinSet::new();
    for (index, d) in answer.executions.iter().enumerate() {
        match d.id {
            Some(id) if !d.refused() => {
                results.push(None);
                let (client, tx) = (client.clone(), tx.clone());
                tasks.spawn(async move { follow_with_retry(&client, index, id, &tx).await });
            }
            _ => results.push(Some(VmResult::refused(d))),
        }
    }
    drop(tx);
    let mut prefixers: HashMap<(usize, Stream), LinePrefixer> = HashMap::new();
    while let Some(msg) = rx.recv().await {
        match msg {
            FollowMsg::Output {
                index,
                stream,
                data,
            } => {
                let sink: &mut dyn Write = match stream {
                    Stream::Stdout => &mut *io.out,
                    Stream::Stderr => &mut *io.err,
                };
                if several {
                    let vm = answer.executions.get(index).map_or("?", |d| d.vm.as_str());
                    let prefixer = prefixers
                        .entry((index, stream))
                        .or_insert_with(|| LinePrefixer::new(format!("{vm}: ")));
                    sink.write_all(&prefixer.feed(&data))?;
                } else {
                    sink.write_all(&data)?;
                }
                sink.flush()?;
            }
            FollowMsg::Done { index, id, outcome } => {
                for stream in [Stream::Stdout, Stream::Stderr] {
                    if let Some(mut prefixer) = prefixers.remove(&(index, stream)) {
                        let sink: &mut dyn Write = match stream {
                            Stream::Stdout => &mut *io.out,
                            Stream::Stderr => &mut *io.err,
                        };
                        sink.write_all(&prefixer.finish())?;
                        sink.flush()?;
                    }
                }
                let vm = answer
                    .executions
                    .get(index)
                    .map_or_else(String::new, |d| d.vm.clone());
                let result = match *outcome {
                    Ok(record) => {
                        for stream in [Stream::Stdout, Stream::Stderr] {
                            let totals = record.totals(stream);
                            if totals.truncated {
                                writeln!(
                                    io.err,
                                    "portless: {vm}: execution {id}: {stream} truncated: \
                                     {} of {} bytes kept",
                                    totals.stored_len, totals.total_len
                                )?;
                            }
                        }
                        VmResult::from_record(&record)
                    }
                    Err(e) => VmResult::lost(&vm, id, &e),
                };
                if let Some(slot) = results.get_mut(index) {
                    *slot = Some(result);
                }
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let mut results: Vec<VmResult> = results.into_iter().flatten().collect();
    results.extend(
        answer
            .skipped
            .iter()
            .map(|vm| VmResult::skipped(vm, max_errors)),
    );
    io.out.flush()?;
    if several {
        // stdout carries the programs' output; the summary goes with the other notes.
        io.err.write_all(summary_table(&results).as_bytes())?;
    }
    for r in results.iter().filter(|r| r.exit_code != 0) {
        write_reason(io, r)?;
    }
    Ok(first_failure(results.iter().map(|r| r.exit_code)))
}

/// Follows one execution to its end, reconnecting (and skipping what was already printed)
/// when the daemon goes away.
async fn follow_with_retry(
    client: &Client,
    index: usize,
    id: ExecutionId,
    tx: &mpsc::UnboundedSender<FollowMsg>,
) {
    let mut next = [0u64; 2];
    let mut failures = 0;
    let outcome = loop {
        let mut progressed = false;
        let attempt = async {
            let mut follow = client.follow(id).await?;
            while let Some(event) = follow.next().await? {
                progressed = true;
                match event {
                    FollowEvent::Output {
                        stream,
                        offset,
                        data,
                    } => {
                        let at = match stream {
                            Stream::Stdout => &mut next[0],
                            Stream::Stderr => &mut next[1],
                        };
                        let fresh = fresh_bytes(at, offset, &data);
                        if !fresh.is_empty() {
                            let _ = tx.send(FollowMsg::Output {
                                index,
                                stream,
                                data: fresh.to_vec(),
                            });
                        }
                    }
                    FollowEvent::End(record) => return Ok(*record),
                }
            }
            Err(ClientError::StreamEnded {
                request: format!("GET /v1/executions/{id}/follow"),
            })
        }
        .await;
        match attempt {
            Ok(record) => break Ok(record),
            Err(e) if e.is_transport() && failures < RETRY_ATTEMPTS => {
                failures = if progressed { 1 } else { failures + 1 };
                tokio::time::sleep(RETRY_DELAY).await;
            }
            Err(e) => break Err(e),
        }
    };
    let _ = tx.send(FollowMsg::Done {
        index,
        id,
        outcome: Box::new(outcome),
    });
}

/// The part of `data` (at `offset` of its stream) not seen yet, given that everything
/// before `*next` was; advances `*next` past it. Output replayed after a reconnection is
/// dropped; a gap (bytes the daemon did not keep) is skipped over.
pub fn fresh_bytes<'d>(next: &mut u64, offset: u64, data: &'d [u8]) -> &'d [u8] {
    let end = offset.saturating_add(data.len() as u64);
    if end <= *next {
        return &[];
    }
    let skip = usize::try_from(next.saturating_sub(offset)).unwrap_or(data.len());
    *next = end;
    data.get(skip..).unwrap_or(&[])
}

/// Prefixes each line of a byte stream (`vm: `), holding back an unfinished line.
#[derive(Debug, Clone)]
pub struct LinePrefixer {
    prefix: String,
    partial: Vec<u8>,
}

impl LinePrefixer {
    /// A prefixer that puts `prefix` before every line.
    pub fn new(prefix: String) -> Self {
        Self {
            prefix,
            partial: Vec::new(),
        }
    }

    /// The complete lines that `data` finishes, prefixed; the rest waits for more.
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in data {
            self.partial.push(b);
            if b == b'\n' {
                out.extend_from_slice(self.prefix.as_bytes());
                out.append(&mut self.partial);
            }
        }
        out
    }

    /// The unfinished line, prefixed and ended with a newline; empty if there is none.
    pub fn finish(&mut self) -> Vec<u8> {
        if self.partial.is_empty() {
            return Vec::new();
        }
        let mut out = self.prefix.as_bytes().to_vec();
        out.append(&mut self.partial);
        out.push(b'\n');
        out
    }
}

async fn status(client: &Client, id: ExecutionId, json: bool, io: &mut Io<'_>) -> VerbResult {
    let record = client.execution(id).await?;
    if json {
        print_json(io, &record)?;
    } else {
        io.out.write_all(record_details(&record).as_bytes())?;
    }
    Ok(0)
}

async fn output(
    client: &Client,
    id: ExecutionId,
    stream: Stream,
    json: bool,
    io: &mut Io<'_>,
) -> VerbResult {
    let mut offset = 0u64;
    let mut all = Vec::new();
    let last = loop {
        let chunk = client.output(id, stream, offset, Some(OUTPUT_PAGE)).await?;
        offset += chunk.data.len() as u64;
        if json {
            all.extend_from_slice(&chunk.data);
        } else {
            io.out.write_all(&chunk.data)?;
        }
        if chunk.data.is_empty() || offset >= chunk.stored_len {
            break chunk;
        }
    };
    if json {
        print_json(
            io,
            &serde_json::json!({
                "id": id,
                "stream": stream,
                "stored_len": last.stored_len,
                "total_len": last.total_len,
                "truncated": last.truncated,
                "data": base64::engine::general_purpose::STANDARD.encode(&all),
            }),
        )?;
    } else {
        io.out.flush()?;
        if last.truncated {
            writeln!(
                io.err,
                "portless: execution {id}: {stream} truncated: {} of {} bytes kept",
                last.stored_len, last.total_len
            )?;
        }
    }
    Ok(0)
}

async fn cancel(client: &Client, id: ExecutionId, json: bool, io: &mut Io<'_>) -> VerbResult {
    let answer = client.cancel(id).await?;
    if json {
        print_json(io, &answer)?;
    } else {
        if answer.state.is_final() {
            writeln!(io.out, "execution {}: {}", answer.id, answer.state)?;
        } else {
            writeln!(
                io.out,
                "execution {}: cancel requested (state {})",
                answer.id, answer.state
            )?;
        }
    }
    Ok(0)
}

async fn push(client: &Client, args: &PushArgs, json: bool, io: &mut Io<'_>) -> VerbResult {
    let program = std::fs::read(&args.file)
        .map_err(|e| CliError::Message(format!("cannot read {}: {e}", args.file.display())))?;
    let name = match &args.name {
        Some(name) => name.clone(),
        None => args
            .file
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                CliError::Message(format!(
                    "{} has no usable file name; give one with --name",
                    args.file.display()
                ))
            })?,
    };
    let size = program.len();
    let mut progress = Progress::new(io.progress);
    progress.show(
        io,
        &format!("push: sending {name} ({size} bytes) to {}...", args.vm),
    );
    let answer = client
        .push(PushRequest {
            vm: &args.vm,
            name: &name,
            run: args.run,
            timeout_ms: args.timeout,
            program,
        })
        .await;
    progress.clear(io);
    let answer = answer?;
    if json {
        print_json(io, &answer)?;
    } else {
        writeln!(
            io.out,
            "{}: {} {} ({} bytes, sha256 {})",
            answer.vm,
            answer.outcome.as_str(),
            answer.name,
            answer.size,
            answer.sha256
        )?;
        if let Some(id) = answer.execution {
            writeln!(
                io.out,
                "execution {id} (portless status {id}, portless output {id})"
            )?;
        }
    }
    match answer.outcome {
        PushOutcome::Stored | PushOutcome::Started => Ok(0),
        PushOutcome::Failed | PushOutcome::Unknown => {
            let why = answer.error.as_deref().unwrap_or("no reason given");
            writeln!(
                io.err,
                "portless: {}: push of {} {}: {}",
                answer.vm,
                printable(&answer.name),
                answer.outcome.as_str(),
                printable(why)
            )?;
            Ok(EXIT_ERROR)
        }
    }
}

async fn ping(client: &Client, vm: &str, count: u32, json: bool, io: &mut Io<'_>) -> VerbResult {
    let mut rtts = Vec::new();
    for _ in 0..count {
        let answer = client.ping(vm).await?;
        if !json {
            writeln!(io.out, "{}: rtt {} us", answer.vm, answer.rtt_us)?;
            io.out.flush()?;
        }
        rtts.push(answer.rtt_us);
    }
    if json {
        print_json(io, &serde_json::json!({ "vm": vm, "rtt_us": rtts }))?;
    } else if let Some(summary) = ping_summary(&rtts).filter(|_| rtts.len() > 1) {
        writeln!(io.out, "{summary}")?;
    }
    Ok(0)
}

async fn metrics(client: &Client, vm: &str, json: bool, io: &mut Io<'_>) -> VerbResult {
    let answer = client.metrics(vm).await?;
    if json {
        print_json(io, &answer)?;
    } else {
        io.out.write_all(metrics_details(&answer).as_bytes())?;
    }
    Ok(0)
}

async fn audit(client: &Client, args: &AuditArgs, json: bool, io: &mut Io<'_>) -> VerbResult {
    let mut entries = client
        .audit(&AuditQuery {
            principal: args.principal.clone(),
            action: args.action.clone(),
            allowed: args.denied.then_some(false),
            since_ms: None,
            limit: Some(args.limit),
            order: AuditOrder::Newest,
        })
        .await?;
    entries.reverse();
    if json {
        print_json(io, &serde_json::json!({ "entries": entries }))?;
    } else {
        io.out.write_all(audit_table(&entries).as_bytes())?;
    }
    Ok(0)
}

/// A progress line on a terminal's stderr, redrawn in place and erased when done.
struct Progress {
    enabled: bool,
    shown: bool,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            shown: false,
        }
    }

    fn show(&mut self, io: &mut Io<'_>, line: &str) {
        if self.enabled {
            let _ = write!(io.err, "\r\x1b[2K{line}");
            let _ = io.err.flush();
            self.shown = true;
        }
    }

    fn clear(&mut self, io: &mut Io<'_>) {
        if self.shown {
            let _ = write!(io.err, "\r\x1b[2K");
            let _ = io.err.flush();
            self.shown = false;
        }
    }
}

/// The exit code an execution's outcome maps to, and why it is not 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The exit code.
    pub code: u8,
    /// The one-line reason, when the code is not 0.
    pub reason: Option<String>,
}

/// The exit code of a finished execution (see the module's documentation).
pub fn verdict(record: &ExecutionRecord) -> Verdict {
    let detail = record.detail.as_deref();
    let with_detail = |what: &str| explain(what, detail);
    let (code, reason) = match record.state {
        ExecState::Succeeded => {
            return Verdict {
                code: 0,
                reason: None,
            };
        }
        ExecState::Failed => match (record.exit_code, record.signal) {
            (Some(code), _) => (
                remote_exit_code(code),
                with_detail(&format!("exited with code {code}")),
            ),
            (None, Some(signal)) => (signal_exit_code(signal), with_detail(&killed_by(signal))),
            (None, None) => (EXIT_ERROR, with_detail("failed")),
        },
        ExecState::TimedOut => (EXIT_TIMED_OUT, with_detail("timed out")),
        ExecState::Cancelled => {
            let signal = record.signal.unwrap_or(SIGTERM);
            (signal_exit_code(signal), with_detail("cancelled"))
        }
        ExecState::AgentLost => (EXIT_NOT_RUN, with_detail("agent lost")),
        ExecState::Undeliverable => (EXIT_NOT_RUN, with_detail("undeliverable")),
        ExecState::Rejected => (EXIT_NOT_RUN, with_detail("rejected")),
        ExecState::FailedToStart => (EXIT_NOT_RUN, with_detail("failed to start")),
        state @ (ExecState::Pending | ExecState::Running | ExecState::Unknown) => (
            EXIT_NOT_RUN,
            with_detail(&format!("ended in state {state}")),
        ),
    };
    Verdict {
        code,
        reason: Some(reason),
    }
}

/// A remote exit code as this process's: its low 8 bits, as a shell sees it, but never 0
/// for a failure.
fn remote_exit_code(code: i32) -> u8 {
    match (code & 0xff) as u8 {
        0 => EXIT_ERROR,
        c => c,
    }
}

/// `128 + signal`, capped at 255.
fn signal_exit_code(signal: i32) -> u8 {
    u8::try_from(signal)
        .ok()
        .and_then(|s| EXIT_SIGNAL_BASE.checked_add(s))
        .unwrap_or(u8::MAX)
}

fn killed_by(signal: i32) -> String {
    match signal_name(signal) {
        Some(name) => format!("killed by signal {signal} ({name})"),
        None => format!("killed by signal {signal}"),
    }
}

/// The name of a Linux signal number.
pub fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        31 => "SIGSYS",
        _ => return None,
    })
}

/// The exit code of several outcomes in VM order: the first that is not 0, else 0.
pub fn first_failure(codes: impl IntoIterator<Item = u8>) -> u8 {
    codes.into_iter().find(|&c| c != 0).unwrap_or(0)
}

/// One VM's result of an `exec --wait`: a row of the summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmResult {
    /// The VM.
    pub vm: String,
    /// The execution, when there is one.
    pub id: Option<ExecutionId>,
    /// Its final state, `skipped`, or `unknown` when it could not be waited for.
    pub state: String,
    /// The exit code it maps to.
    pub exit_code: u8,
    /// The program's own exit code, when it exited.
    pub remote_exit_code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// How long it ran.
    pub duration_ms: Option<u64>,
    /// Why the exit code is not 0.
    pub reason: Option<String>,
}

impl VmResult {
    /// The result of a finished execution.
    pub fn from_record(record: &ExecutionRecord) -> Self {
        let verdict = verdict(record);
        Self {
            vm: record.vm.clone(),
            id: Some(record.id),
            state: record.state.to_string(),
            exit_code: verdict.code,
            remote_exit_code: record.exit_code,
            signal: record.signal,
            duration_ms: record.duration_ms,
            reason: verdict.reason,
        }
    }

    /// The result of an execution refused at dispatch.
    pub fn refused(dispatched: &Dispatched) -> Self {
        let state = dispatched.state;
        let reason = explain(state_words(state), dispatched.error.as_deref());
        Self::not_run(&dispatched.vm, dispatched.id, state.as_str(), reason)
    }

    /// A VM not dispatched to because `--max-errors` was exceeded.
    pub fn skipped(vm: &str, max_errors: Option<usize>) -> Self {
        let reason = match max_errors {
            Some(n) => format!("not dispatched: more than {n} executions failed (--max-errors)"),
            None => "not dispatched: too many executions failed".to_owned(),
        };
        Self::not_run(vm, None, "skipped", reason)
    }

    /// An execution whose end could not be learnt.
    pub fn lost(vm: &str, id: ExecutionId, error: &ClientError) -> Self {
        Self {
            vm: vm.to_owned(),
            id: Some(id),
            state: "unknown".into(),
            exit_code: EXIT_ERROR,
            remote_exit_code: None,
            signal: None,
            duration_ms: None,
            reason: Some(format!("cannot learn how it ended: {error}")),
        }
    }

    fn not_run(vm: &str, id: Option<ExecutionId>, state: &str, reason: String) -> Self {
        Self {
            vm: vm.to_owned(),
            id,
            state: state.to_owned(),
            exit_code: EXIT_NOT_RUN,
            remote_exit_code: None,
            signal: None,
            duration_ms: None,
            reason: Some(reason),
        }
    }

    /// The one-line reason as written on stderr (without `portless: `).
    pub fn reason_line(&self) -> Option<String> {
        let reason = self.reason.as_deref()?;
        Some(match self.id {
            Some(id) => format!("{}: execution {id}: {reason}", self.vm),
            None => format!("{}: {reason}", self.vm),
        })
    }
}

/// `what: detail`, or just the detail when it already starts with `what` (the daemon's
/// "rejected by the agent: ..."), or just `what`.
fn explain(what: &str, detail: Option<&str>) -> String {
    match detail.map(str::trim).filter(|d| !d.is_empty()) {
        Some(d) if d.to_lowercase().starts_with(what) => d.to_owned(),
        Some(d) => format!("{what}: {d}"),
        None => what.to_owned(),
    }
}

fn state_words(state: ExecState) -> &'static str {
    match state {
        ExecState::TimedOut => "timed out",
        ExecState::AgentLost => "agent lost",
        ExecState::FailedToStart => "failed to start",
        other => other.as_str(),
    }
}

fn write_reason(io: &mut Io<'_>, result: &VmResult) -> io::Result<()> {
    match result.reason_line() {
        Some(line) => writeln!(io.err, "portless: {}", printable(&line)),
        None => Ok(()),
    }
}

/// Renders rows under a header, columns left-aligned and two spaces apart; no trailing
/// spaces.
pub fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(width) => *width = (*width).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths.get(i).copied().unwrap_or(0) - cell.chars().count();
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `s` with its control characters shown as escapes (`\x1b`, `\n`, `\u{9b}`): text from a
/// guest (a command's description, the agent's name) or from another caller (a command
/// name, arguments) must not move the cursor, rewrite the screen or recolour the terminal
/// of whoever reads it. Everything the CLI prints for people goes through it; output bytes
/// (`portless output`, `--follow`) are printed as they are, as `cat` would.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The `vms` table.
pub fn vms_table(vms: &[VmInfo]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            let labels: Vec<String> = vm.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                vm.name.clone(),
                vm.state.to_string(),
                vm.channel.clone(),
                or_dash(vm.agent_software.as_deref()),
                or_dash(vm.agent_generation.map(|g| format!("{g:08x}"))),
                or_dash(vm.config_revision),
                or_dash(vm.heartbeat_age_ms.map(format_duration_ms)),
                vm.agent_restarts.to_string(),
                vm.running.to_string(),
                match &vm.last_cutoff {
                    Some(c) => format!("{} ({})", vm.cutoffs, c.budget),
                    None => vm.cutoffs.to_string(),
                },
                vm.violations.to_string(),
                if labels.is_empty() {
                    "-".to_owned()
                } else {
                    labels.join(",")
                },
            ]
        })
        .collect();
    render_table(
        &[
            "NAME",
            "STATE",
            "CHANNEL",
            "AGENT",
            "GENERATION",
            "REVISION",
            "HEARTBEAT",
            "RESTARTS",
            "RUNNING",
            "CUTOFFS",
            "VIOLATIONS",
            "LABELS",
        ],
        &rows,
    )
}

/// A command's parameters in one short cell: `seconds:int[1..3600] mode:{fast|slow}
/// name:str[1..32,alnum]`.
pub fn format_params(params: &[Param]) -> String {
    if params.is_empty() {
        return "-".to_owned();
    }
    let parts: Vec<String> = params
        .iter()
        .map(|p| match p {
            Param::Integer { name, min, max } => format!("{name}:int[{min}..{max}]"),
            Param::Choice { name, choices } => format!("{name}:{{{}}}", choices.join("|")),
            Param::String {
                name,
                charset,
                min_len,
                max_len,
            } => format!("{name}:str[{min_len}..{max_len},{charset}]"),
            Param::Other => "?".to_owned(),
        })
        .collect();
    parts.join(" ")
}

/// The `commands` listing: a line about the list, then a table.
pub fn commands_table(list: &CommandList) -> String {
    let rows: Vec<Vec<String>> = list
        .commands
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                format_params(&c.params),
                if c.timeout_ms == 0 {
                    "none".to_owned()
                } else {
                    format_duration_ms(u64::from(c.timeout_ms))
                },
                format_bytes(c.max_output),
                c.description.clone(),
            ]
        })
        .collect();
    format!(
        "{}: {} command{}, revision {}, listed {} ago\n{}",
        list.vm,
        list.commands.len(),
        if list.commands.len() == 1 { "" } else { "s" },
        list.config_revision,
        format_duration_ms(list.age_ms),
        render_table(
            &["COMMAND", "PARAMS", "TIMEOUT", "MAX OUTPUT", "DESCRIPTION"],
            &rows
        )
    )
}

/// The table of `exec` without `--wait`: what was dispatched where.
pub fn dispatch_table(answer: &ExecResponse) -> String {
    let mut rows: Vec<Vec<String>> = answer
        .executions
        .iter()
        .map(|d| {
            vec![
                d.vm.clone(),
                or_dash(d.id),
                d.state.to_string(),
                or_dash(d.error.as_deref()),
            ]
        })
        .collect();
    rows.extend(answer.skipped.iter().map(|vm| {
        vec![
            vm.clone(),
            "-".into(),
            "skipped".into(),
            "not dispatched (--max-errors)".into(),
        ]
    }));
    render_table(&["VM", "ID", "STATE", "ERROR"], &rows)
}

/// The summary table of `exec --wait`.
pub fn summary_table(results: &[VmResult]) -> String {
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.vm.clone(),
                or_dash(r.id),
                r.state.clone(),
                r.exit_code.to_string(),
                or_dash(r.duration_ms.map(format_duration_ms)),
                or_dash(r.reason.as_deref()),
            ]
        })
        .collect();
    render_table(&["VM", "ID", "STATE", "EXIT", "DURATION", "REASON"], &rows)
}

/// Renders `key: value` lines with the values aligned.
fn render_details(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let value = printable(value);
        let _ = writeln!(out, "{:<width$}  {value}", format!("{key}:"));
    }
    out
}

fn stream_summary(totals: portless_api::StreamTotals) -> String {
    if totals.truncated {
        format!(
            "{} bytes, {} kept (truncated)",
            totals.total_len, totals.stored_len
        )
    } else {
        format!("{} bytes", totals.total_len)
    }
}

/// The `status` listing of an execution's record.
pub fn record_details(r: &ExecutionRecord) -> String {
    let mut command = r.command.clone();
    for arg in &r.args {
        command.push(' ');
        command.push_str(arg);
    }
    let agent_id = match (r.agent_generation, r.agent_counter) {
        (Some(g), Some(c)) => format!("{g:08x}-{c:08x}"),
        _ => "-".to_owned(),
    };
    render_details(&[
        ("id", r.id.to_string()),
        ("vm", r.vm.clone()),
        ("command", command),
        ("principal", r.principal.clone()),
        ("state", r.state.to_string()),
        ("exit code", or_dash(r.exit_code)),
        (
            "signal",
            or_dash(r.signal.map(|s| match signal_name(s) {
                Some(name) => format!("{s} ({name})"),
                None => s.to_string(),
            })),
        ),
        ("detail", or_dash(r.detail.as_deref())),
        ("requested", format_utc_ms(r.requested_at_ms)),
        ("started", or_dash(r.started_at_ms.map(format_utc_ms))),
        ("finished", or_dash(r.finished_at_ms.map(format_utc_ms))),
        ("duration", or_dash(r.duration_ms.map(format_duration_ms))),
        ("agent id", agent_id),
        ("stdout", stream_summary(r.stdout)),
        ("stderr", stream_summary(r.stderr)),
    ])
}

/// The `metrics` listing.
pub fn metrics_details(answer: &MetricsResponse) -> String {
    let m = &answer.metrics;
    let load: Vec<String> = m
        .load_milli
        .iter()
        .map(|l| format!("{}.{:02}", l / 1000, (l % 1000) / 10))
        .collect();
    let a = &m.agent;
    render_details(&[
        ("vm", answer.vm.clone()),
        ("uptime", format_duration_ms(m.uptime_ms)),
        (
            "load",
            if load.is_empty() {
                "-".to_owned()
            } else {
                load.join(" ")
            },
        ),
        (
            "memory",
            format!(
                "{} KiB available of {} KiB",
                m.mem_available_kib, m.mem_total_kib
            ),
        ),
        ("processes", m.processes.to_string()),
        ("agent rss", format!("{} KiB", m.agent_rss_kib)),
        (
            "agent frames",
            format!("{} in, {} out", a.frames_in, a.frames_out),
        ),
        ("agent output", format!("{} bytes", a.output_bytes)),
        (
            "agent executions",
            format!(
                "{} started, {} running, {} rejected",
                a.executions, a.running, a.rejections
            ),
        ),
        ("agent resets", a.resets.to_string()),
    ])
}

/// The `audit` table.
pub fn audit_table(entries: &[AuditRecord]) -> String {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|record| {
            let e = &record.entry;
            vec![
                format_utc_ms(e.at_ms),
                record.id.to_string(),
                or_dash(e.principal.as_deref()),
                e.caller.clone(),
                e.action.clone(),
                or_dash(e.target.as_deref()),
                match (e.allowed, e.count) {
                    (true, _) => "allowed".to_owned(),
                    (false, 0 | 1) => "denied".to_owned(),
                    (false, n) => format!("denied x{n}"),
                },
                or_dash(e.reason.as_deref()),
            ]
        })
        .collect();
    render_table(
        &[
            "TIME (UTC)",
            "ID",
            "PRINCIPAL",
            "CALLER",
            "ACTION",
            "TARGET",
            "RESULT",
            "REASON",
        ],
        &rows,
    )
}

/// `min/avg/max` of ping round trips; `None` for none.
pub fn ping_summary(rtts: &[u64]) -> Option<String> {
    let min = rtts.iter().min()?;
    let max = rtts.iter().max()?;
    let sum: u128 = rtts.iter().map(|&r| u128::from(r)).sum();
    let avg = sum / rtts.len() as u128;
    Some(format!(
        "{} round trips: min {min} us, avg {avg} us, max {max} us",
        rtts.len()
    ))
}

/// A duration for people: `350ms`, `1.2s`, `3m05s`, `2h07m`, `3d04h`.
pub fn format_duration_ms(ms: u64) -> String {
    const S: u64 = 1000;
    const M: u64 = 60 * S;
    const H: u64 = 60 * M;
    const D: u64 = 24 * H;
    if ms < S {
        format!("{ms}ms")
    } else if ms < M {
        format!("{}.{}s", ms / S, (ms % S) / 100)
    } else if ms < H {
        format!("{}m{:02}s", ms / M, (ms % M) / S)
    } else if ms < D {
        format!("{}h{:02}m", ms / H, (ms % H) / M)
    } else {
        format!("{}d{:02}h", ms / D, (ms % D) / H)
    }
}

/// A byte count for people: `512 B`, `64 KiB`, `16 MiB` (whole units only when exact).
pub fn format_bytes(n: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    const GIB: u64 = 1024 * MIB;
    match n {
        0 => "0".to_owned(),
        n if n % GIB == 0 => format!("{} GiB", n / GIB),
        n if n % MIB == 0 => format!("{} MiB", n / MIB),
        n if n % KIB == 0 => format!("{} KiB", n / KIB),
        n => format!("{n} B"),
    }
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` in UTC.
pub fn format_utc_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests;
