//! How an execution's end becomes the CLI's exit code and its one-line reason.

use super::*;

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
        ExecState::DeliveryTimedOut => (EXIT_NOT_RUN, with_detail("delivery timed out")),
        ExecState::HostLost => (EXIT_ERROR, with_detail("host lost")),
        state @ (ExecState::Pending
        | ExecState::Running
        | ExecState::Delayed
        | ExecState::InProgress
        | ExecState::Unknown) => (
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
pub fn remote_exit_code(code: i32) -> u8 {
    match (code & 0xff) as u8 {
        0 => EXIT_ERROR,
        c => c,
    }
}

/// `128 + signal`, capped at 255.
pub fn signal_exit_code(signal: i32) -> u8 {
    u8::try_from(signal)
        .ok()
        .and_then(|s| EXIT_SIGNAL_BASE.checked_add(s))
        .unwrap_or(u8::MAX)
}

pub fn killed_by(signal: i32) -> String {
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
    pub fn skipped(vm: &str, max_errors: Option<Limit>) -> Self {
        let reason = match max_errors {
            Some(Limit::Count(n)) => {
                format!("not dispatched: more than {n} executions failed (--max-errors)")
            }
            Some(p) => {
                format!("not dispatched: more than {p} of the executions failed (--max-errors)")
            }
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
pub fn explain(what: &str, detail: Option<&str>) -> String {
    match detail.map(str::trim).filter(|d| !d.is_empty()) {
        Some(d) if d.to_lowercase().starts_with(what) => d.to_owned(),
        Some(d) => format!("{what}: {d}"),
        None => what.to_owned(),
    }
}

pub fn state_words(state: ExecState) -> &'static str {
    match state {
        ExecState::TimedOut => "timed out",
        ExecState::AgentLost => "agent lost",
        ExecState::FailedToStart => "failed to start",
        other => other.as_str(),
    }
}

pub fn write_reason(io: &mut Io<'_>, result: &VmResult) -> io::Result<()> {
    match result.reason_line() {
        Some(line) => writeln!(io.err, "portless: {}", printable(&line)),
        None => Ok(()),
    }
}
