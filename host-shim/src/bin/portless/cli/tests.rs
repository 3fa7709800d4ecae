//! The `portless` CLI without a daemon: argument parsing and usage errors, the socket's
//! resolution, the exit-code rules of `exec --wait`, and the tables and helpers that shape
//! what people and scripts read.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::{
    self as cli, Cli, EXIT_ERROR, EXIT_NOT_RUN, EXIT_TIMED_OUT, ExecPlan, Io, LinePrefixer,
    StreamArg, Verb, VmResult,
};
use clap::error::ErrorKind;
use portless_api::{
    Client, CommandList, Dispatched, ExecResponse, ExecState, ExecutionId, ExecutionRecord, VmInfo,
};

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    cli::parse_args(std::iter::once("portless").chain(args.iter().copied()))
}

fn parsed(args: &[&str]) -> Cli {
    match parse(args) {
        Ok(cli) => cli,
        Err(e) => panic!("{args:?}: {e}"),
    }
}

fn usage_error(args: &[&str]) -> clap::Error {
    match parse(args) {
        Ok(cli) => panic!("{args:?} parsed as {cli:?}"),
        Err(e) => {
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
            e
        }
    }
}

fn plan(args: &[&str]) -> ExecPlan {
    match parsed(args).verb {
        Verb::Exec(exec) => exec.plan().expect("plan"),
        other => panic!("{other:?}"),
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

/// A record from the fields that matter here, the rest defaulted as the API may leave them.
fn record(
    state: &str,
    exit_code: Option<i32>,
    signal: Option<i32>,
    detail: Option<&str>,
) -> ExecutionRecord {
    serde_json::from_value(serde_json::json!({
        "id": 7, "vm": "vm1", "command": "sleep", "args": ["5"], "state": state,
        "exit_code": exit_code, "signal": signal, "detail": detail, "duration_ms": 1500,
    }))
    .expect("record")
}

#[test]
fn exec_takes_target_command_and_arguments() {
    assert_eq!(
        plan(&["exec", "vm1", "sleep", "5"]),
        ExecPlan {
            target: "vm1".into(),
            command: "sleep".into(),
            args: s(&["5"])
        }
    );
    assert_eq!(plan(&["exec", "a,b,a", "uname"]).target, "a,b");
    assert_eq!(plan(&["exec", "role=web", "uname"]).target, "role=web");
    assert_eq!(
        plan(&["exec", "--all", "service-status", "sshd.service"]),
        ExecPlan {
            target: "*".into(),
            command: "service-status".into(),
            args: s(&["sshd.service"])
        }
    );
    assert_eq!(
        plan(&["exec", "vm1", "--all", "uname"]).command,
        "vm1",
        "--all: no target"
    );
}

#[test]
fn exec_flags_go_anywhere_and_hyphen_arguments_follow_a_double_dash() {
    let cli = parsed(&[
        "exec",
        "vm1",
        "journal",
        "nginx.service",
        "100",
        "--wait",
        "--timeout",
        "2500",
        "--max-concurrency",
        "2",
        "--max-errors",
        "0",
        "--json",
        "--socket",
        "/tmp/p.sock",
    ]);
    assert!(cli.json);
    assert_eq!(cli.socket.as_deref(), Some(Path::new("/tmp/p.sock")));
    let Verb::Exec(exec) = cli.verb else {
        panic!("not exec")
    };
    assert!(exec.wait && !exec.follow && !exec.all);
    assert_eq!(exec.timeout, Some(2500));
    assert_eq!(exec.max_concurrency, Some(portless_api::Limit::Count(2)));
    assert_eq!(exec.max_errors, Some(portless_api::Limit::Count(0)));
    assert_eq!(
        exec.plan().expect("plan").args,
        s(&["nginx.service", "100"])
    );

    assert_eq!(
        plan(&["exec", "--follow", "vm1", "--", "grep", "-v", "--wait"]).args,
        s(&["-v", "--wait"])
    );
    assert_eq!(plan(&["exec", "vm1", "offset", "-5"]).args, s(&["-5"]));
}

#[test]
fn exec_usage_errors_exit_2() {
    let e = usage_error(&["exec"]);
    assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    let e = usage_error(&["exec", "vm1"]);
    assert!(e.to_string().contains("a TARGET and a COMMAND"), "{e}");
    let e = usage_error(&["exec", "Not A Vm!", "uname"]);
    assert!(e.to_string().contains("not a valid vm name"), "{e}");
    usage_error(&["exec", "role=web,x", "uname"]);
    usage_error(&["exec", "vm1", "uname", "--max-concurrency", "0"]);
    usage_error(&["exec", "vm1", "uname", "--timeout", "-1"]);
    usage_error(&["exec", "vm1", "grep", "-v"]);
}

#[test]
fn every_verb_parses() {
    assert!(matches!(parsed(&["vms"]).verb, Verb::Vms));
    assert!(matches!(parsed(&["commands", "vm1"]).verb, Verb::Commands { vm } if vm == "vm1"));
    assert!(matches!(
        parsed(&["status", "12"]).verb,
        Verb::Status {
            id: ExecutionId(12)
        }
    ));
    assert!(matches!(
        parsed(&["output", "12"]).verb,
        Verb::Output {
            id: ExecutionId(12),
            stream: StreamArg::Stdout
        }
    ));
    assert!(matches!(
        parsed(&["output", "12", "--stream", "stderr"]).verb,
        Verb::Output {
            id: ExecutionId(12),
            stream: StreamArg::Stderr
        }
    ));
    assert!(matches!(
        parsed(&["cancel", "3"]).verb,
        Verb::Cancel { id: ExecutionId(3) }
    ));
    assert!(matches!(
        parsed(&["ping", "vm1"]).verb,
        Verb::Ping { count: 1, .. }
    ));
    assert!(matches!(
        parsed(&["ping", "vm1", "--count", "5"]).verb,
        Verb::Ping { count: 5, .. }
    ));
    assert!(matches!(parsed(&["metrics", "vm2"]).verb, Verb::Metrics { vm } if vm == "vm2"));

    let Verb::Push(push) = parsed(&[
        "push",
        "vm1",
        "./tool",
        "--run",
        "--name",
        "t",
        "--timeout",
        "900",
    ])
    .verb
    else {
        panic!("not push")
    };
    assert_eq!(
        (push.vm.as_str(), push.file.as_path()),
        ("vm1", Path::new("./tool"))
    );
    assert!(push.run);
    assert_eq!((push.name.as_deref(), push.timeout), (Some("t"), Some(900)));

    let Verb::Audit(audit) = parsed(&["audit"]).verb else {
        panic!("not audit")
    };
    assert_eq!(
        (audit.principal, audit.action, audit.denied, audit.limit),
        (None, None, false, 100)
    );
    let Verb::Audit(audit) = parsed(&[
        "audit",
        "--principal",
        "ops",
        "--action",
        "exec",
        "--denied",
        "--limit",
        "3",
    ])
    .verb
    else {
        panic!("not audit")
    };
    assert_eq!(
        (
            audit.principal.as_deref(),
            audit.action.as_deref(),
            audit.denied,
            audit.limit
        ),
        (Some("ops"), Some("exec"), true, 3)
    );
}

#[test]
fn other_usage_errors_exit_2_and_help_exits_0() {
    usage_error(&[]);
    usage_error(&["frobnicate"]);
    usage_error(&["status", "twelve"]);
    usage_error(&["output", "1", "--stream", "stdin"]);
    usage_error(&["ping", "vm1", "--count", "0"]);
    usage_error(&["commands"]);
    let help = parse(&["--help"]).expect_err("help");
    assert_eq!((help.kind(), help.exit_code()), (ErrorKind::DisplayHelp, 0));
    let help = parse(&["exec", "--help"]).expect_err("help");
    assert!(help.to_string().contains("--all <COMMAND>"), "{help}");
}

#[test]
fn the_socket_is_the_flag_else_the_environment_else_the_default() {
    let flag = PathBuf::from("/tmp/flag.sock");
    let env = || Some(OsString::from("/tmp/env.sock"));
    assert_eq!(cli::resolve_socket(Some(&flag), env()), flag);
    assert_eq!(
        cli::resolve_socket(None, env()),
        PathBuf::from("/tmp/env.sock")
    );
    assert_eq!(
        cli::resolve_socket(None, None),
        PathBuf::from("/run/portless/portless.sock")
    );
    assert_eq!(
        cli::resolve_socket(None, Some(OsString::new())),
        PathBuf::from(host_shim::config::DEFAULT_SOCKET)
    );
}

#[test]
fn exit_codes_follow_the_outcome() {
    let code = |r: &ExecutionRecord| cli::verdict(r).code;
    let ok = cli::verdict(&record("succeeded", Some(0), None, None));
    assert_eq!((ok.code, ok.reason), (0, None));
    assert_eq!(code(&record("failed", Some(3), None, None)), 3);
    assert_eq!(
        code(&record("failed", Some(256), None, None)),
        EXIT_ERROR,
        "low byte 0"
    );
    assert_eq!(code(&record("failed", Some(257), None, None)), 1);
    assert_eq!(code(&record("failed", None, Some(9), None)), 137);
    assert_eq!(
        code(&record("failed", None, Some(200), None)),
        255,
        "capped"
    );
    assert_eq!(
        code(&record("timed_out", None, Some(15), None)),
        EXIT_TIMED_OUT
    );
    assert_eq!(code(&record("cancelled", None, None, None)), 143, "SIGTERM");
    assert_eq!(code(&record("cancelled", None, Some(9), None)), 137);
    for state in [
        "agent_lost",
        "undeliverable",
        "rejected",
        "failed_to_start",
        "exploded",
    ] {
        assert_eq!(
            code(&record(state, None, None, Some("why"))),
            EXIT_NOT_RUN,
            "{state}"
        );
    }

    let reason = |r: &ExecutionRecord| cli::verdict(r).reason.unwrap_or_default();
    assert_eq!(
        reason(&record("failed", Some(3), None, None)),
        "exited with code 3"
    );
    assert_eq!(
        reason(&record("failed", None, Some(9), None)),
        "killed by signal 9 (SIGKILL)"
    );
    assert_eq!(
        reason(&record(
            "undeliverable",
            None,
            None,
            Some("vm not ready within 30s")
        )),
        "undeliverable: vm not ready within 30s"
    );
    assert_eq!(
        reason(&record(
            "rejected",
            None,
            None,
            Some("rejected by the agent: Busy")
        )),
        "rejected by the agent: Busy",
        "no stutter"
    );
    assert_eq!(reason(&record("timed_out", None, None, None)), "timed out");
}

#[test]
fn several_vms_exit_with_the_first_failure_in_vm_order() {
    assert_eq!(cli::first_failure([]), 0);
    assert_eq!(cli::first_failure([0, 0, 0]), 0);
    assert_eq!(cli::first_failure([0, 124, 3, 125]), 124);
    assert_eq!(cli::first_failure([2, 0]), 2);
}

#[test]
fn refused_and_skipped_vms_count_as_not_run() {
    let refused = VmResult::refused(&Dispatched {
        vm: "db1".into(),
        id: None,
        state: ExecState::Rejected,
        error: Some("denied: ci may not run df on db1".into()),
    });
    assert_eq!(refused.exit_code, EXIT_NOT_RUN);
    assert_eq!(
        refused.reason_line().as_deref(),
        Some("db1: rejected: denied: ci may not run df on db1")
    );
    let skipped = VmResult::skipped("web3", Some(portless_api::Limit::Count(1)));
    assert_eq!(
        (skipped.exit_code, skipped.state.as_str()),
        (EXIT_NOT_RUN, "skipped")
    );
    assert_eq!(
        skipped.reason_line().as_deref(),
        Some("web3: not dispatched: more than 1 executions failed (--max-errors)")
    );
    let done = VmResult::from_record(&record("failed", Some(3), None, None));
    assert_eq!(
        done.reason_line().as_deref(),
        Some("vm1: execution 7: exited with code 3")
    );

    let accepted = Dispatched {
        vm: "a".into(),
        id: Some(ExecutionId(1)),
        state: ExecState::Pending,
        error: None,
    };
    assert!(!accepted.refused());
    let undeliverable = Dispatched {
        state: ExecState::Undeliverable,
        ..accepted.clone()
    };
    assert!(undeliverable.refused());
}

#[test]
fn tables_align_columns_without_trailing_spaces() {
    let table = cli::render_table(
        &["A", "LONG HEADER", "C"],
        &[s(&["xyz", "1", ""]), s(&["é", "22", "last"])],
    );
    assert_eq!(
        table,
        "A    LONG HEADER  C\n\
         xyz  1\n\
         é    22           last\n"
    );
    assert_eq!(cli::render_table(&["ONLY"], &[]), "ONLY\n");
}

#[test]
fn the_vms_table() {
    let vms: Vec<VmInfo> = serde_json::from_value(serde_json::json!([
        {"name": "web1", "labels": {"role": "web", "zone": "a"}, "channel": "plain",
         "state": "ready", "agent_generation": 3_428_182_704_u32,
         "agent_software": "portless-agent/0.1.0", "config_revision": 2,
         "heartbeat_age_ms": 90, "agent_restarts": 1, "running": 2},
        {"name": "db1", "channel": "doorbell", "state": "waiting_for_agent",
         "agent_generation": null, "agent_software": null, "config_revision": null,
         "heartbeat_age_ms": null},
        {"name": "bad1", "channel": "plain", "state": "cut_off",
         "agent_generation": null, "agent_software": null, "config_revision": null,
         "heartbeat_age_ms": null, "cutoffs": 3, "violations": 65,
         "last_cutoff": {"at_ms": 1, "budget": "violations_per_min", "detail": "..."}}
    ]))
    .expect("vms");
    assert_eq!(
        cli::vms_table(&vms),
        "NAME  STATE              CHANNEL   AGENT                 GENERATION  REVISION  \
         HEARTBEAT  RESTARTS  RUNNING  CUTOFFS                 VIOLATIONS  LABELS\n\
         web1  ready              plain     portless-agent/0.1.0  cc55eab0    2         \
         90ms       1         2        0                       0           role=web,zone=a\n\
         db1   waiting_for_agent  doorbell  -                     -           -         \
         -          0         0        0                       0           -\n\
         bad1  cut_off            plain     -                     -           -         \
         -          0         0        3 (violations_per_min)  65          -\n"
    );
}

#[test]
fn the_commands_listing() {
    let list: CommandList = serde_json::from_value(serde_json::json!({
        "vm": "vm1", "age_ms": 61_000, "config_revision": 4,
        "commands": [
            {"name": "sleep", "description": "Sleep", "timeout_ms": 0, "max_output": 1_048_576,
             "params": [{"kind": "integer", "name": "seconds", "min": 1, "max": 3600}]},
            {"name": "id", "description": "Who", "timeout_ms": 5000, "max_output": 1000,
             "params": [{"kind": "string", "name": "user", "charset": "a-z", "min_len": 1, "max_len": 32},
                        {"kind": "choice", "name": "fmt", "choices": ["short", "long"]}]}
        ]
    }))
    .expect("commands");
    assert_eq!(
        cli::commands_table(&list),
        "vm1: 2 commands, revision 4, listed 1m01s ago\n\
         COMMAND  PARAMS                                TIMEOUT  MAX OUTPUT  DESCRIPTION\n\
         sleep    seconds:int[1..3600]                  none     1 MiB       Sleep\n\
         id       user:str[1..32,a-z] fmt:{short|long}  5.0s     1000 B      Who\n"
    );
}

#[test]
fn the_exec_tables() {
    let answer: ExecResponse = serde_json::from_value(serde_json::json!({
        "executions": [
            {"vm": "web1", "id": 11, "state": "running", "error": null},
            {"vm": "web2", "id": null, "state": "rejected", "error": "denied"}
        ],
        "skipped": ["web3"]
    }))
    .expect("answer");
    assert_eq!(
        cli::dispatch_table(&answer),
        "VM    ID  STATE     ERROR\n\
         web1  11  running   -\n\
         web2  -   rejected  denied\n\
         web3  -   skipped   not dispatched (--max-errors)\n"
    );
    let results = [
        VmResult::from_record(&record("succeeded", Some(0), None, None)),
        VmResult::from_record(&record("timed_out", None, None, None)),
        VmResult::skipped("web3", Some(portless_api::Limit::Count(0))),
    ];
    assert_eq!(
        cli::summary_table(&results),
        "VM    ID  STATE      EXIT  DURATION  REASON\n\
         vm1   7   succeeded  0     1.5s      -\n\
         vm1   7   timed_out  124   1.5s      timed out\n\
         web3  -   skipped    125   -         not dispatched: more than 0 executions failed \
         (--max-errors)\n"
    );
}

#[test]
fn the_status_listing() {
    let mut r = record("failed", None, Some(9), None);
    r.requested_at_ms = 1_700_000_000_123;
    r.agent_generation = Some(0xcc55_eab0);
    r.agent_counter = Some(4);
    r.stdout.total_len = 100;
    r.stdout.stored_len = 64;
    r.stdout.truncated = true;
    let text = cli::record_details(&r);
    assert!(
        text.starts_with("id:         7\nvm:         vm1\ncommand:    sleep 5\n"),
        "{text}"
    );
    for line in [
        "signal:     9 (SIGKILL)\n",
        "requested:  2023-11-14 22:13:20\n",
        "started:    -\n",
        "agent id:   cc55eab0-00000004\n",
        "stdout:     100 bytes, 64 kept (truncated)\n",
        "stderr:     0 bytes\n",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
}

#[test]
fn people_formats() {
    assert_eq!(cli::format_duration_ms(0), "0ms");
    assert_eq!(cli::format_duration_ms(999), "999ms");
    assert_eq!(cli::format_duration_ms(1_250), "1.2s");
    assert_eq!(cli::format_duration_ms(185_000), "3m05s");
    assert_eq!(cli::format_duration_ms(7_620_000), "2h07m");
    assert_eq!(cli::format_duration_ms(273_600_000), "3d04h");
    assert_eq!(cli::format_utc_ms(0), "1970-01-01 00:00:00");
    assert_eq!(cli::format_utc_ms(951_782_400_000), "2000-02-29 00:00:00");
    assert_eq!(cli::format_utc_ms(4_102_444_799_999), "2099-12-31 23:59:59");
    assert_eq!(cli::format_bytes(0), "0");
    assert_eq!(cli::format_bytes(65_536), "64 KiB");
    assert_eq!(cli::format_bytes(16 * 1024 * 1024), "16 MiB");
    assert_eq!(cli::format_bytes(1_000), "1000 B");
    assert_eq!(cli::ping_summary(&[]), None);
    assert_eq!(
        cli::ping_summary(&[300, 100, 200]).as_deref(),
        Some("3 round trips: min 100 us, avg 200 us, max 300 us")
    );
    assert_eq!(cli::signal_name(15), Some("SIGTERM"));
    assert_eq!(cli::signal_name(64), None);
}

#[test]
fn followed_lines_get_their_vm_prefix() {
    let mut p = LinePrefixer::new("web1: ".into());
    assert_eq!(p.feed(b"par"), b"");
    assert_eq!(
        p.feed(b"tial\nwhole\nnext"),
        b"web1: partial\nweb1: whole\n"
    );
    assert_eq!(p.feed(b"\n"), b"web1: next\n");
    assert_eq!(p.finish(), b"");
    assert_eq!(p.feed(b"no newline"), b"");
    assert_eq!(p.finish(), b"web1: no newline\n");
}

#[test]
fn replayed_output_is_printed_once() {
    let mut next = 0;
    assert_eq!(cli::fresh_bytes(&mut next, 0, b"hello"), b"hello");
    assert_eq!(next, 5);
    // After a reconnection the daemon replays from 0.
    assert_eq!(cli::fresh_bytes(&mut next, 0, b"hel"), b"");
    assert_eq!(cli::fresh_bytes(&mut next, 3, b"lo wor"), b" wor");
    assert_eq!(next, 9);
    // A gap (bytes not kept) is skipped over.
    assert_eq!(cli::fresh_bytes(&mut next, 20, b"ld"), b"ld");
    assert_eq!(next, 22);
    assert_eq!(cli::fresh_bytes(&mut next, 22, b""), b"");
}

#[test]
fn an_unreachable_daemon_is_exit_1_naming_the_socket() {
    let socket = std::env::temp_dir().join(format!("portless-absent-{}.sock", std::process::id()));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for args in [
        &["vms"][..],
        &["exec", "vm1", "uname", "--wait"],
        &["status", "1"],
    ] {
        let cli = parsed(args);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut io = Io {
            out: &mut out,
            err: &mut err,
            progress: false,
        };
        let code = runtime.block_on(cli::run(&cli, &Client::new(&socket), &mut io));
        let err = String::from_utf8_lossy(&err);
        assert_eq!(code, EXIT_ERROR, "{args:?}: {err}");
        assert!(out.is_empty());
        assert!(
            err.starts_with(&format!(
                "portless: cannot connect to the daemon at {}",
                socket.display()
            )),
            "{err}"
        );
        assert!(err.contains("`portless serve` must be running"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn text_from_guests_and_callers_is_shown_with_its_control_characters_escaped() {
    assert_eq!(cli::printable("plain text, é"), "plain text, é");
    assert_eq!(
        cli::printable("a\x1b[2Jb\nc\td\u{9b}e"),
        "a\\u{1b}[2Jb\\nc\\td\\u{9b}e"
    );
    let list: CommandList = serde_json::from_value(serde_json::json!({
        "vm": "vm1", "age_ms": 0, "config_revision": 1,
        "commands": [
            {"name": "x", "description": "\u{1b}[2J\u{1b}[31mowned\u{7}", "timeout_ms": 0,
             "max_output": 1, "params": []}
        ]
    }))
    .expect("commands");
    let table = cli::commands_table(&list);
    assert!(
        !table.contains('\u{1b}') && !table.contains('\u{7}'),
        "{table:?}"
    );
    assert!(
        table.contains("\\u{1b}[2J\\u{1b}[31mowned\\u{7}"),
        "{table}"
    );
    let vms: Vec<VmInfo> = serde_json::from_value(serde_json::json!([
        {"name": "vm1", "channel": "plain", "state": "ready",
         "agent_software": "agent\u{1b}]0;title\u{7}", "agent_generation": 1,
         "config_revision": 1, "heartbeat_age_ms": 1}
    ]))
    .expect("vms");
    let table = cli::vms_table(&vms);
    assert!(!table.contains('\u{1b}'), "{table:?}");
    assert!(table.contains("agent\\u{1b}]0;title\\u{7}"), "{table}");
}

#[test]
fn urls_name_plain_or_tls_endpoints_and_bad_ones_are_refused() {
    let none = |_: &str| None::<OsString>;
    let token = |name: &str| (name == "PORTLESS_TOKEN").then(|| OsString::from("t"));
    assert_eq!(
        cli::resolve_endpoint(None, Some("http://127.0.0.1:7433/"), token),
        Ok((
            portless_api::Endpoint::Tcp("127.0.0.1:7433".into()),
            Some("t".into())
        ))
    );
    assert_eq!(
        cli::resolve_endpoint(None, Some("https://control.example:7440"), none),
        Ok((
            portless_api::Endpoint::Https("control.example:7440".into()),
            None
        ))
    );
    assert_eq!(
        cli::resolve_endpoint(None, Some("10.0.0.1:7433"), none),
        Ok((portless_api::Endpoint::Tcp("10.0.0.1:7433".into()), None))
    );
    for bad in ["https://", "http://host", "https://h:1/v1", "ftp"] {
        assert!(
            cli::resolve_endpoint(None, Some(bad), none).is_err(),
            "{bad}"
        );
    }
    // --socket wins over a URL in the environment.
    let url = |name: &str| (name == "PORTLESS_URL").then(|| OsString::from("https://x:1"));
    assert!(matches!(
        cli::resolve_endpoint(Some(Path::new("/s")), None, url),
        Ok((portless_api::Endpoint::Unix(_), None))
    ));
    assert_eq!(
        cli::resolve_endpoint(None, None, url).map(|r| r.0),
        Ok(portless_api::Endpoint::Https("x:1".into()))
    );
}
