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
//! Here: the verbs, each a call of `portless_api`'s client and what it prints. Beside it:
//! `args.rs` (the command line), `outcome.rs` (exit codes and reasons), `print.rs` (tables
//! and formats). Pure pieces (tables, exit-code rules, line prefixing) are pinned without a
//! daemon by the tests in `cli/tests.rs`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use host_shim::config::{DEFAULT_SOCKET, Target};

mod args;
mod outcome;
mod print;

pub use args::*;
pub use outcome::*;
use portless_api::{
    AuditOrder, AuditQuery, AuditRecord, Client, ClientError, CommandList, Dispatched, Endpoint,
    ExecRequest, ExecResponse, ExecState, ExecutionId, ExecutionRecord, FollowEvent, Limit,
    MetricsResponse, Param, PushOutcome, PushRequest, Stream, VmInfo,
};
pub use print::*;

/// The environment variable that names the daemon's socket when `--socket` is not given.
pub const SOCKET_ENV: &str = "PORTLESS_SOCKET";
/// The environment variable that names a TCP listener or control plane when `--url` is not
/// given.
pub const URL_ENV: &str = "PORTLESS_URL";
/// The environment variable that holds the bearer token for `--url`.
pub const TOKEN_ENV: &str = "PORTLESS_TOKEN";
/// The environment variable that names the CA file for an `https://` `--url`.
pub const CA_ENV: &str = "PORTLESS_CA";

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
    let client = match resolve_endpoint(cli.socket.as_deref(), cli.url.as_deref(), |name| {
        std::env::var_os(name)
    }) {
        Ok((endpoint, token)) => {
            let ca = cli.ca.clone().or_else(|| {
                std::env::var_os(CA_ENV)
                    .filter(|v| !v.is_empty())
                    .map(PathBuf::from)
            });
            let https = matches!(endpoint, portless_api::Endpoint::Https(_));
            let mut client = Client::at(endpoint);
            if let Some(token) = token {
                client = client.with_token(token);
            }
            match ca {
                Some(path) if https => {
                    match std::fs::read(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|pem| client.with_ca_pem(&pem))
                    {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("portless: --ca {}: {e}", path.display());
                            return ExitCode::from(EXIT_USAGE);
                        }
                    }
                }
                _ => client,
            }
        }
        Err(e) => {
            eprintln!("portless: --url {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
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
        Verb::Console => console(client, json, io).await,
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

/// `value` as JSON with `--json`, else the text `for_people` makes of it.
fn show<T: Serialize>(
    io: &mut Io<'_>,
    json: bool,
    value: &T,
    for_people: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    if json {
        print_json(io, value)
    } else {
        Ok(io.out.write_all(for_people(value).as_bytes())?)
    }
}

async fn vms(client: &Client, json: bool, io: &mut Io<'_>) -> VerbResult {
    let vms = portless_api::VmList {
        vms: client.vms().await?,
    };
    show(io, json, &vms, |list| vms_table(&list.vms))?;
    Ok(0)
}

async fn commands(client: &Client, vm: &str, json: bool, io: &mut Io<'_>) -> VerbResult {
    show(io, json, &client.commands(vm).await?, commands_table)?;
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
        idempotency_key: args.idempotency_key.clone(),
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
    max_errors: Option<Limit>,
    json: bool,
    io: &mut Io<'_>,
) -> VerbResult {
    show(io, json, answer, dispatch_table)?;
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
    max_errors: Option<Limit>,
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
    max_errors: Option<Limit>,
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
    show(io, json, &client.execution(id).await?, record_details)?;
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
    show(io, json, &client.metrics(vm).await?, metrics_details)?;
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
    let log = portless_api::AuditLog { entries };
    show(io, json, &log, |log| audit_table(&log.entries))?;
    Ok(0)
}

async fn console(client: &Client, json: bool, io: &mut Io<'_>) -> VerbResult {
    let code = client.console_code().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    show(io, json, &code, |c| {
        format!(
            "Open the web console (the link works once, for {} s):\n\n    {}\n",
            c.expires_at_ms.saturating_sub(now).div_ceil(1000),
            c.url
        )
    })?;
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

#[cfg(test)]
mod tests;
