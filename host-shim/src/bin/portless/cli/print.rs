//! What people read: tables, details, sizes, durations and times.

use super::*;

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

pub fn or_dash<T: ToString>(value: Option<T>) -> String {
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
pub fn render_details(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let value = printable(value);
        let _ = writeln!(out, "{:<width$}  {value}", format!("{key}:"));
    }
    out
}

pub fn stream_summary(totals: portless_api::StreamTotals) -> String {
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
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
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
