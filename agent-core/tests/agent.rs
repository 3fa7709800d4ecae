//! The agent state machine (`agent_core::Agent`) against a fake platform and a fake clock,
//! with the test playing the host over a channel in ordinary memory. Every test asserts the
//! exact messages the agent sends (PROTOCOL.md sections 5.6 and 7): the hello handshake and
//! version negotiation, ping and metrics, command listings and their pages, exec acceptance
//! and every rejection, output streaming, truncation and the drain grace, flow control
//! against a full ring, timeouts, cancellation, status, program pushes, undecodable frames
//! and configuration reloads.

mod common;

use agent_core::agent::{
    DRAIN_GRACE_MS, LEFTOVER_WAIT_MS, MAX_FINISHED, OUTPUT_CHUNK, REPLY_RESERVE, SOFTWARE,
};
use agent_core::platform::{ExitStatus, Limits, Signal};
use common::{
    CONFIG, FakeProcess, GENERATION, Logged, METRICS, PushOp, Rig, Spawned, T0, Who, config,
    config_without_push, exec_request, id,
};
use ring_protocol::message::{
    AgentCounters, AgentToHost, ArgProblem, Capabilities, CommandInfo, ErrorCode, ExecState,
    ExecutionId, Finished, Hello, HostToAgent, Metrics, Outcome, ParamKind, ParamSpec,
    ProtocolError, PushOutcome, Rejection, Stream,
};
use sha2::{Digest, Sha256};

// --- Helpers ---

fn host_hello(min_version: u16, max_version: u16, reply: bool) -> HostToAgent<'static> {
    HostToAgent::Hello(Hello {
        min_version,
        max_version,
        capabilities: Capabilities::default(),
        generation: 7,
        config_revision: 0,
        software: "test-host/0",
        reply,
    })
}

fn agent_hello(capabilities: u32, config_revision: u32, reply: bool) -> AgentToHost<'static> {
    AgentToHost::Hello(Hello {
        min_version: 1,
        max_version: 1,
        capabilities: Capabilities(capabilities),
        generation: GENERATION,
        config_revision,
        software: SOFTWARE,
        reply,
    })
}

/// PUSH | METRICS | CANCEL, as bits on the wire.
const CAPS_WITH_PUSH: u32 = 0b1011;
/// METRICS | CANCEL.
const CAPS_WITHOUT_PUSH: u32 = 0b1010;

const UNSUPPORTED: AgentToHost<'static> = AgentToHost::Error(ProtocolError {
    code: ErrorCode::UnsupportedVersion,
    detail: "no protocol version in common",
});

const UNDECODABLE: AgentToHost<'static> = AgentToHost::Error(ProtocolError {
    code: ErrorCode::Undecodable,
    detail: "frame is not a valid message",
});

fn rejected(request_id: u64, reason: Rejection) -> AgentToHost<'static> {
    AgentToHost::Rejected { request_id, reason }
}

fn invalid(request_id: u64, index: u8, problem: ArgProblem) -> AgentToHost<'static> {
    rejected(request_id, Rejection::InvalidArgument { index, problem })
}

fn output(
    execution: ExecutionId,
    stream: Stream,
    offset: u64,
    data: &[u8],
) -> AgentToHost<'static> {
    AgentToHost::Output {
        execution,
        stream,
        offset,
        data: Box::leak(data.to_vec().into_boxed_slice()),
    }
}

fn finished(outcome: Outcome, duration_ms: u64, stdout: u64, stderr: u64) -> Finished {
    Finished {
        outcome,
        duration_ms,
        stdout_bytes: stdout,
        stderr_bytes: stderr,
        truncated: false,
    }
}

fn exit(execution: ExecutionId, finished: Finished) -> AgentToHost<'static> {
    AgentToHost::Exit {
        execution,
        finished,
    }
}

fn status(request_id: u64, execution: ExecutionId) -> HostToAgent<'static> {
    HostToAgent::Status {
        request_id,
        execution,
    }
}

fn cancel(request_id: u64, execution: ExecutionId) -> HostToAgent<'static> {
    HostToAgent::Cancel {
        request_id,
        execution,
    }
}

fn list(request_id: u64, start: u16, limit: u16) -> HostToAgent<'static> {
    HostToAgent::ListCommands {
        request_id,
        start,
        limit,
    }
}

/// `len` bytes of a pattern that does not repeat within a chunk, so that misplaced data
/// shows.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// The Command messages of indices `range` and the CommandsEnd of a listing of `CONFIG`.
fn listing(
    request_id: u64,
    range: std::ops::Range<u16>,
    next: Option<u16>,
) -> Vec<AgentToHost<'static>> {
    let config: &'static _ = Box::leak(Box::new(config(CONFIG)));
    let mut msgs: Vec<_> = range
        .map(|index| AgentToHost::Command {
            request_id,
            index,
            info: config
                .commands()
                .get(usize::from(index))
                .expect("index in the allow-list")
                .info(),
        })
        .collect();
    msgs.push(AgentToHost::CommandsEnd {
        request_id,
        total: 5,
        next,
    });
    msgs
}

/// Receives from the host side and pumps the agent until execution `execution` has exited;
/// returns the stdout it sent (checking that offsets are contiguous), how many rounds that
/// took, and the Exit.
fn drain_execution(rig: &mut Rig, execution: ExecutionId) -> (Vec<u8>, usize, Finished) {
    let mut stdout = Vec::new();
    for round in 0..1_000 {
        rig.pump();
        for msg in rig.recv_all() {
            match msg {
                AgentToHost::Output {
                    execution: e,
                    stream: Stream::Stdout,
                    offset,
                    data,
                } if e == execution => {
                    assert_eq!(offset, stdout.len() as u64, "output is contiguous");
                    stdout.extend_from_slice(data);
                }
                AgentToHost::Exit {
                    execution: e,
                    finished,
                } if e == execution => {
                    rig.pump();
                    rig.expect_nothing();
                    return (stdout, round, finished);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    panic!("execution {execution} never exited");
}

// --- Hello ---

#[test]
fn greets_on_attach_with_capabilities_generation_and_revision() {
    let mut rig = Rig::with_greeting(CONFIG);
    rig.expect(&[agent_hello(CAPS_WITH_PUSH, 1, false)]);
    rig.pump();
    rig.expect_nothing();

    let mut rig = Rig::with_greeting(&config_without_push());
    rig.expect(&[agent_hello(CAPS_WITHOUT_PUSH, 1, false)]);
}

#[test]
fn answers_a_greeting_but_never_a_reply() {
    let mut rig = Rig::standard();
    rig.request(&host_hello(1, 1, false));
    rig.expect(&[agent_hello(CAPS_WITH_PUSH, 1, true)]);
    rig.request(&host_hello(1, 1, true));
    rig.expect_nothing();
    // A wider range that includes version 1 agrees too.
    rig.request(&host_hello(0, 9, false));
    rig.expect(&[agent_hello(CAPS_WITH_PUSH, 1, true)]);
}

#[test]
fn incompatible_versions_refuse_every_request_until_a_compatible_hello() {
    let mut rig = Rig::standard();
    // The hello is answered (so the host sees the agent's range), then refused.
    rig.request(&host_hello(2, 3, false));
    rig.expect(&[agent_hello(CAPS_WITH_PUSH, 1, true), UNSUPPORTED]);

    let sha = [0; 32];
    let requests = [
        HostToAgent::Ping { nonce: 1 },
        list(2, 0, 10),
        exec_request(3, "hello", &[], None),
        status(4, id(1)),
        cancel(5, id(1)),
        HostToAgent::PushBegin {
            push_id: 6,
            name: "tool",
            size: 1,
            sha256: sha,
        },
        HostToAgent::PushChunk {
            push_id: 6,
            offset: 0,
            data: b"x",
        },
        HostToAgent::PushCommit {
            push_id: 6,
            run: true,
            timeout_ms: None,
        },
        HostToAgent::Metrics { request_id: 7 },
    ];
    for request in &requests {
        rig.request(request);
        rig.expect(&[UNSUPPORTED]);
    }
    assert!(rig.fake.spawns.is_empty());
    assert!(rig.fake.push_ops.is_empty());

    // An Error from the host is never answered; a reply Hello that does not agree either
    // gets the error; an older host (version 0 only) does not agree.
    rig.request(&HostToAgent::Error(ProtocolError {
        code: ErrorCode::Unexpected,
        detail: "host complains",
    }));
    rig.expect_nothing();
    rig.request(&host_hello(2, 2, true));
    rig.expect(&[UNSUPPORTED]);
    rig.request(&host_hello(0, 0, false));
    rig.expect(&[agent_hello(CAPS_WITH_PUSH, 1, true), UNSUPPORTED]);
    rig.request(&HostToAgent::Ping { nonce: 8 });
    rig.expect(&[UNSUPPORTED]);

    // A compatible hello ends it.
    rig.request(&host_hello(1, 2, false));
    rig.expect(&[agent_hello(CAPS_WITH_PUSH, 1, true)]);
    rig.request(&HostToAgent::Ping { nonce: 9 });
    rig.expect(&[AgentToHost::Pong { nonce: 9 }]);

    // So does a compatible reply Hello, which is itself not answered.
    rig.request(&host_hello(5, 6, false));
    rig.expect(&[agent_hello(CAPS_WITH_PUSH, 1, true), UNSUPPORTED]);
    rig.request(&host_hello(1, 1, true));
    rig.expect_nothing();
    rig.request(&HostToAgent::Ping { nonce: 10 });
    rig.expect(&[AgentToHost::Pong { nonce: 10 }]);
    assert_eq!(
        rig.fake.log,
        [Logged::Protocol("host complains".to_string())]
    );
}

// --- Ping, metrics ---

#[test]
fn ping_is_answered_with_its_nonce_without_a_hello() {
    let mut rig = Rig::standard();
    for nonce in [0, 1, u64::MAX] {
        rig.request(&HostToAgent::Ping { nonce });
        rig.expect(&[AgentToHost::Pong { nonce }]);
    }
}

#[test]
fn a_kept_request_buffer_with_stale_bytes_serves_like_a_fresh_one() {
    let mut rig = Rig::standard();
    rig.kept = Some(Box::new([0xa5; ring_protocol::MAX_PAYLOAD_LEN]));
    rig.request(&HostToAgent::Ping { nonce: 7 });
    rig.expect(&[AgentToHost::Pong { nonce: 7 }]);
    // A long request, then a short one over what it left in the buffer.
    let long = "x".repeat(2000);
    rig.request(&exec_request(1, "greet", &[&long, "3", "loud"], None));
    assert!(
        matches!(
            rig.recv_all().as_slice(),
            [AgentToHost::Rejected { request_id: 1, .. }]
        ),
        "an over-long name is refused"
    );
    rig.exec(2, "greet", &["bob", "3", "loud"]);
    assert_eq!(
        rig.fake.spawns.last().map(|s| s.args.clone()),
        Some(
            ["--mode", "loud", "--", "bob", "3"]
                .map(String::from)
                .to_vec()
        )
    );
    rig.request(&HostToAgent::Ping { nonce: 8 });
    rig.expect(&[AgentToHost::Pong { nonce: 8 }]);
}

#[test]
fn metrics_report_platform_figures_and_counters() {
    let mut rig = Rig::standard(); // frames out: the greeting
    rig.request(&HostToAgent::Ping { nonce: 1 }); // in 1, out 2
    rig.expect(&[AgentToHost::Pong { nonce: 1 }]);
    rig.request(&exec_request(2, "nope", &[], None)); // in 2, out 3, rejections 1
    rig.expect(&[rejected(2, Rejection::UnknownCommand)]);
    let e = rig.exec(3, "hello", &[]); // in 3, out 4, executions 1
    rig.process(0).stdout.write(b"12345");
    rig.pump(); // out 5, output bytes 5
    rig.expect(&[output(e, Stream::Stdout, 0, b"12345")]);
    rig.agent.note_reset();

    rig.request(&HostToAgent::Metrics { request_id: 4 }); // in 4
    rig.expect(&[AgentToHost::Metrics {
        request_id: 4,
        metrics: Metrics {
            uptime_ms: METRICS.uptime_ms,
            load_milli: METRICS.load_milli,
            mem_total_kib: METRICS.mem_total_kib,
            mem_available_kib: METRICS.mem_available_kib,
            processes: METRICS.processes,
            agent_rss_kib: METRICS.agent_rss_kib,
            agent: AgentCounters {
                frames_in: 4,
                frames_out: 5,
                output_bytes: 5,
                executions: 1,
                rejections: 1,
                running: 1,
                resets: 1,
            },
        },
    }]);
    assert_eq!(rig.agent.counters().frames_out, 6);
}

// --- Listing ---

#[test]
fn lists_every_command_in_order() {
    let mut rig = Rig::standard();
    rig.request(&list(11, 0, 100));
    let got = rig.recv_all();
    assert_eq!(got, listing(11, 0..5, None));

    // Two entries spelled out: the listing carries what the allow-list says.
    assert_eq!(
        got[0],
        AgentToHost::Command {
            request_id: 11,
            index: 0,
            info: CommandInfo {
                name: "hello",
                description: "Say hello",
                params: heapless::Vec::new(),
                timeout_ms: 60_000,
                max_output: 1 << 20,
            },
        }
    );
    let params = [
        ParamSpec {
            name: "name",
            kind: ParamKind::Text {
                class: "a-z",
                min_len: 1,
                max_len: 8,
            },
        },
        ParamSpec {
            name: "count",
            kind: ParamKind::Integer { min: 1, max: 5 },
        },
        ParamSpec {
            name: "mode",
            kind: ParamKind::OneOf {
                choices: "loud|quiet",
            },
        },
    ];
    assert_eq!(
        got[1],
        AgentToHost::Command {
            request_id: 11,
            index: 1,
            info: CommandInfo {
                name: "greet",
                description: "Greet someone, a number of times",
                params: heapless::Vec::from_slice(&params).expect("fits"),
                timeout_ms: 5000,
                max_output: 4096,
            },
        }
    );
}

#[test]
fn lists_in_pages_and_answers_count_queries() {
    let mut rig = Rig::standard();
    rig.request(&list(1, 0, 2));
    rig.expect(&listing(1, 0..2, Some(2)));
    rig.request(&list(2, 2, 2));
    rig.expect(&listing(2, 2..4, Some(4)));
    rig.request(&list(3, 4, 2));
    rig.expect(&listing(3, 4..5, None));
    // A page that ends exactly at the end of the list.
    rig.request(&list(4, 3, 2));
    rig.expect(&listing(4, 3..5, None));
    rig.request(&list(5, 0, 5));
    rig.expect(&listing(5, 0..5, None));
    // Count queries.
    rig.request(&list(6, 0, 0));
    rig.expect(&listing(6, 0..0, Some(0)));
    rig.request(&list(7, 3, 0));
    rig.expect(&listing(7, 0..0, Some(3)));
    rig.request(&list(8, 5, 0));
    rig.expect(&listing(8, 0..0, None));
    // At or beyond the end.
    rig.request(&list(9, 5, 3));
    rig.expect(&listing(9, 0..0, None));
    rig.request(&list(10, 9, 3));
    rig.expect(&listing(10, 0..0, None));
    rig.request(&list(11, u16::MAX, u16::MAX));
    rig.expect(&listing(11, 0..0, None));
    rig.request(&list(12, 1, u16::MAX));
    rig.expect(&listing(12, 1..5, None));
}

#[test]
fn requests_after_a_listing_are_answered_after_it() {
    let mut rig = Rig::standard();
    rig.send(&list(1, 0, 3));
    rig.send(&HostToAgent::Ping { nonce: 2 });
    rig.send(&list(3, 3, 9));
    rig.pump();
    let mut want = listing(1, 0..3, Some(3));
    want.push(AgentToHost::Pong { nonce: 2 });
    want.extend(listing(3, 3..5, None));
    rig.expect(&want);
}

// --- Exec ---

#[test]
fn exec_is_accepted_with_sequential_ids_and_spawns_the_substituted_command() {
    let mut rig = Rig::standard();
    rig.request(&exec_request(41, "greet", &["bob", "3", "loud"], None));
    rig.expect(&[AgentToHost::Accepted {
        request_id: 41,
        execution: id(1),
    }]);
    rig.request(&exec_request(42, "hello", &[], None));
    rig.expect(&[AgentToHost::Accepted {
        request_id: 42,
        execution: id(2),
    }]);
    assert_eq!(
        rig.fake.spawns,
        [
            Spawned {
                program: "/usr/bin/greet".into(),
                args: ["--mode", "loud", "--", "bob", "3"]
                    .map(String::from)
                    .into(),
                env: ["LANG=C", "GREETING=hi"].map(String::from).into(),
                cwd: Some("/tmp".into()),
                user: Some(Who::Name("nobody".into())),
                group: Some(Who::Id(65534)),
                limits: Limits::NONE,
            },
            Spawned {
                program: "/bin/hello".into(),
                args: vec![],
                env: vec![],
                cwd: None,
                user: None,
                group: None,
                limits: Limits::NONE,
            },
        ]
    );
    assert_eq!(
        rig.fake.log,
        [
            Logged::Started {
                execution: id(1),
                command: "greet".into()
            },
            Logged::Started {
                execution: id(2),
                command: "hello".into()
            },
        ]
    );
    // The third, after the first has finished, is still the next number.
    rig.process(0).end(ExitStatus::Exited(0));
    rig.pump();
    rig.expect(&[exit(id(1), finished(Outcome::Exited(0), 0, 0, 0))]);
    rig.request(&exec_request(43, "hello", &[], None));
    rig.expect(&[AgentToHost::Accepted {
        request_id: 43,
        execution: id(3),
    }]);
    assert_eq!(rig.agent.counters().executions, 3);
}

#[test]
fn exec_rejects_unknown_commands_and_every_argument_problem() {
    let mut rig = Rig::standard();
    rig.request(&exec_request(1, "rm", &["-rf", "/"], None));
    rig.expect(&[rejected(1, Rejection::UnknownCommand)]);
    // Names are exact.
    rig.request(&exec_request(2, "Hello", &[], None));
    rig.expect(&[rejected(2, Rejection::UnknownCommand)]);

    use ArgProblem::*;
    let cases: &[(&[&str], u8, ArgProblem)] = &[
        (&[], 0, Missing),
        (&["bob", "3"], 2, Missing),
        (&["bob", "3", "loud", "x"], 3, Unexpected),
        (&["bob", "three", "loud"], 1, NotInteger),
        (&["bob", "03", "loud"], 1, NotInteger),
        (&["bob", "+3", "loud"], 1, NotInteger),
        (&["bob", "6", "loud"], 1, OutOfRange),
        (&["bob", "0", "loud"], 1, OutOfRange),
        (&["bob", "99999999999999999999", "loud"], 1, OutOfRange),
        (&["bob", "3", "shout"], 2, NotAChoice),
        (&["bob", "3", "loud|quiet"], 2, NotAChoice),
        (&["Bob", "3", "loud"], 0, BadCharacter),
        (&["bo b", "3", "loud"], 0, BadCharacter),
        (&["bobbybobby", "3", "loud"], 0, BadLength),
        (&["", "3", "loud"], 0, BadLength),
    ];
    for (n, (args, index, problem)) in cases.iter().enumerate() {
        let rid = 100 + n as u64;
        rig.request(&exec_request(rid, "greet", args, None));
        rig.expect(&[invalid(rid, *index, *problem)]);
    }
    rig.request(&exec_request(3, "hello", &["x"], None));
    rig.expect(&[invalid(3, 0, Unexpected)]);

    assert!(rig.fake.spawns.is_empty());
    let counters = rig.agent.counters();
    assert_eq!(counters.executions, 0);
    assert_eq!(counters.rejections, 3 + cases.len() as u64);
    assert_eq!(
        rig.fake.log[0],
        Logged::Rejected {
            what: "rm".into(),
            reason: Rejection::UnknownCommand
        }
    );
    assert_eq!(
        rig.fake.log[2],
        Logged::Rejected {
            what: "greet".into(),
            reason: Rejection::InvalidArgument {
                index: 0,
                problem: Missing
            }
        }
    );
}

#[test]
fn exec_is_busy_while_max_running_executions_run() {
    let mut rig = Rig::standard(); // max_running = 3
    let first = rig.exec(1, "forever", &[]);
    rig.exec(2, "forever", &[]);
    rig.exec(3, "hello", &[]);
    rig.request(&exec_request(4, "forever", &[], None));
    rig.expect(&[rejected(4, Rejection::Busy)]);
    // Unknown commands and bad arguments are still told apart.
    rig.request(&exec_request(5, "nope", &[], None));
    rig.expect(&[rejected(5, Rejection::UnknownCommand)]);
    rig.request(&exec_request(6, "greet", &["bob"], None));
    rig.expect(&[invalid(6, 1, ArgProblem::Missing)]);
    assert_eq!(rig.fake.spawns.len(), 3);

    // An execution that has exited but still has output to drain still counts.
    rig.process(0).exit = Some(ExitStatus::Exited(0));
    rig.pump();
    rig.request(&exec_request(7, "forever", &[], None));
    rig.expect(&[rejected(7, Rejection::Busy)]);

    rig.process(0).end(ExitStatus::Exited(0));
    rig.pump();
    rig.expect(&[exit(first, finished(Outcome::Exited(0), 0, 0, 0))]);
    rig.request(&exec_request(8, "forever", &[], None));
    rig.expect(&[AgentToHost::Accepted {
        request_id: 8,
        execution: id(4),
    }]);
    assert_eq!(rig.pump().running, 3);
}

#[test]
fn spawn_failure_is_accepted_then_exits_failed_to_start() {
    let mut rig = Rig::standard();
    rig.fake.spawn_error = Some(2); // ENOENT
    rig.request(&exec_request(5, "greet", &["ann", "1", "quiet"], None));
    let failed = Finished {
        outcome: Outcome::FailedToStart(2),
        duration_ms: 0,
        stdout_bytes: 0,
        stderr_bytes: 0,
        truncated: false,
    };
    rig.expect(&[
        AgentToHost::Accepted {
            request_id: 5,
            execution: id(1),
        },
        exit(id(1), failed),
    ]);
    assert_eq!(rig.fake.spawns.len(), 1);
    assert_eq!(rig.fake.spawns[0].program, "/usr/bin/greet");
    assert!(rig.fake.processes.is_empty());
    assert_eq!(rig.pump().running, 0);
    rig.request(&status(6, id(1)));
    rig.expect(&[AgentToHost::Status {
        request_id: 6,
        execution: id(1),
        state: ExecState::Finished(failed),
    }]);
    assert_eq!(
        rig.fake.log,
        [
            Logged::Started {
                execution: id(1),
                command: "greet".into()
            },
            Logged::Finished {
                execution: id(1),
                finished: failed,
                leftovers: 0,
            },
        ]
    );
}

// --- Output ---

#[test]
fn output_is_contiguous_per_stream_then_one_exit() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "hello", &[]);
    let p = rig.process(0);
    p.stdout.write(b"hello ");
    p.stdout.write(b"world\n");
    p.stderr.write(b"oops\n");
    rig.advance(5);
    rig.expect(&[
        output(e, Stream::Stdout, 0, b"hello "),
        output(e, Stream::Stdout, 6, b"world\n"),
        output(e, Stream::Stderr, 0, b"oops\n"),
    ]);

    // A large piece is sent in chunks of at most OUTPUT_CHUNK.
    let big = pattern(2 * OUTPUT_CHUNK + 100);
    rig.process(0).stdout.write(&big);
    rig.pump();
    rig.expect(&[
        output(e, Stream::Stdout, 12, &big[..OUTPUT_CHUNK]),
        output(
            e,
            Stream::Stdout,
            12 + OUTPUT_CHUNK as u64,
            &big[OUTPUT_CHUNK..2 * OUTPUT_CHUNK],
        ),
        output(
            e,
            Stream::Stdout,
            12 + 2 * OUTPUT_CHUNK as u64,
            &big[2 * OUTPUT_CHUNK..],
        ),
    ]);
    let stdout_total = 12 + big.len() as u64;

    // Stdout closes: no exit while the process runs and stderr is open.
    rig.process(0).stdout.close();
    rig.advance(5);
    rig.expect_nothing();
    // The process exits (reaped at T0 + 15): stderr is still open, so no exit yet.
    rig.process(0).exit = Some(ExitStatus::Exited(0));
    let act = rig.advance(5);
    rig.expect_nothing();
    assert_eq!(act.next_deadline, Some(T0 + 15 + DRAIN_GRACE_MS));
    assert_eq!(act.running, 1);
    // Stderr's last words, then it closes: output first, then the exit.
    rig.process(0).stderr.write(b"bye\n");
    rig.process(0).stderr.close();
    let act = rig.advance(5);
    rig.expect(&[
        output(e, Stream::Stderr, 5, b"bye\n"),
        exit(e, finished(Outcome::Exited(0), 15, stdout_total, 9)),
    ]);
    assert_eq!(act.running, 0);
    assert_eq!(act.next_deadline, None);
    assert!(rig.process(0).released);
    rig.advance(DRAIN_GRACE_MS * 2);
    rig.expect_nothing();
    assert_eq!(rig.agent.counters().output_bytes, stdout_total + 9);
}

// --- Leftovers ---

/// A host Hello that announces it reads `Ended`.
fn host_hello_reading_ended() -> HostToAgent<'static> {
    HostToAgent::Hello(Hello {
        min_version: 1,
        max_version: 1,
        capabilities: Capabilities::ENDED,
        generation: 7,
        config_revision: 0,
        software: "test-host/0",
        reply: true,
    })
}

#[test]
fn what_an_execution_leaves_running_is_killed_and_its_end_waits_until_it_is_gone() {
    let mut rig = Rig::standard();
    rig.request(&host_hello_reading_ended());
    rig.expect_nothing();
    let e = rig.exec(1, "hello", &[]);
    rig.process(0).leftovers = 2;
    rig.process(0).dying_checks = u32::MAX;
    rig.process(0).end(ExitStatus::Exited(0));
    // Reaped and drained: the leftovers are killed, and the end waits for them.
    let act = rig.advance(5);
    rig.expect_nothing();
    assert_eq!(rig.process(0).leftover_kills, 1);
    assert_eq!(act.running, 1);
    assert_eq!(act.next_deadline, Some(T0 + 5 + 10));
    rig.advance(10);
    rig.advance(10);
    rig.expect_nothing();
    // They die.
    rig.process(0).dying_checks = 0;
    rig.advance(10);
    rig.expect(&[AgentToHost::Ended {
        execution: e,
        finished: finished(Outcome::Exited(0), 5, 0, 0),
        leftovers: 2,
    }]);
    assert_eq!(rig.process(0).leftover_kills, 1, "killed once");
    assert!(rig.process(0).released);
    assert!(matches!(
        rig.fake.log.last(),
        Some(Logged::Finished { leftovers: 2, .. })
    ));
}

#[test]
fn leftovers_that_do_not_die_hold_the_end_for_a_bounded_time() {
    let mut rig = Rig::standard();
    rig.request(&host_hello_reading_ended());
    let e = rig.exec(1, "hello", &[]);
    rig.process(0).leftovers = 1;
    rig.process(0).dying_checks = u32::MAX;
    rig.process(0).end(ExitStatus::Exited(3));
    rig.advance(5);
    rig.expect_nothing();
    rig.advance(LEFTOVER_WAIT_MS - 10);
    rig.expect_nothing();
    rig.advance(10);
    rig.expect(&[AgentToHost::Ended {
        execution: e,
        finished: finished(Outcome::Exited(3), 5, 0, 0),
        leftovers: 1,
    }]);
}

#[test]
fn a_host_that_does_not_read_ended_gets_exit_and_nothing_is_waited_for_without_leftovers() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "hello", &[]);
    rig.process(0).leftovers = 1;
    rig.process(0).end(ExitStatus::Exited(0));
    rig.advance(5);
    rig.expect(&[exit(e, finished(Outcome::Exited(0), 5, 0, 0))]);
    // Without leftovers the end is not held: no check at all.
    rig.request(&host_hello_reading_ended());
    let e = rig.exec(2, "hello", &[]);
    rig.process(1).dying_checks = u32::MAX;
    rig.process(1).end(ExitStatus::Exited(0));
    rig.advance(5);
    rig.expect(&[AgentToHost::Ended {
        execution: e,
        finished: finished(Outcome::Exited(0), 5, 0, 0),
        leftovers: 0,
    }]);
    assert_eq!(rig.process(1).leftover_kills, 1);
}

#[test]
fn command_limits_are_passed_to_the_platform() {
    let mut rig = Rig::new(
        "[[command]]\nname = \"boxed\"\nprogram = \"/bin/boxed\"\n\
         memory_max = 67108864\npids_max = 16\ncpu_max_percent = 50\n",
    );
    rig.exec(1, "boxed", &[]);
    assert_eq!(
        rig.fake.spawns[0].limits,
        Limits {
            memory_max: Some(64 << 20),
            pids_max: Some(16),
            cpu_max_percent: Some(50),
        }
    );
}

#[test]
fn streams_closed_wait_for_the_process_to_be_reaped() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "hello", &[]);
    rig.process(0).stdout.close();
    rig.process(0).stderr.close();
    rig.advance(100);
    rig.expect_nothing();
    rig.process(0).exit = Some(ExitStatus::Signaled(11));
    rig.advance(100);
    rig.expect(&[exit(e, finished(Outcome::Signaled(11), 200, 0, 0))]);
}

#[test]
fn output_beyond_max_output_is_counted_but_not_sent() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "small", &[]); // max_output = 10 per stream
    let p = rig.process(0);
    p.stdout.write(b"012345");
    p.stdout.write(b"6789abcdef");
    p.stderr.write(b"ABCDEFGHIJKL");
    rig.pump();
    rig.expect(&[
        output(e, Stream::Stdout, 0, b"012345"),
        output(e, Stream::Stdout, 6, b"6789"),
        output(e, Stream::Stderr, 0, b"ABCDEFGHIJ"),
    ]);
    rig.process(0).stdout.write(b"more");
    rig.pump();
    rig.expect_nothing();
    rig.process(0).end(ExitStatus::Exited(1));
    rig.pump();
    rig.expect(&[exit(
        e,
        Finished {
            outcome: Outcome::Exited(1),
            duration_ms: 0,
            stdout_bytes: 20,
            stderr_bytes: 12,
            truncated: true,
        },
    )]);
    assert_eq!(rig.agent.counters().output_bytes, 20);

    // Exactly the limit is not truncation.
    let e = rig.exec(2, "small", &[]);
    rig.process(1).stdout.write(b"0123456789");
    rig.process(1).end(ExitStatus::Exited(0));
    rig.pump();
    rig.expect(&[
        output(e, Stream::Stdout, 0, b"0123456789"),
        exit(e, finished(Outcome::Exited(0), 0, 10, 0)),
    ]);
}

#[test]
fn drain_grace_ends_an_execution_whose_pipe_stays_open() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "hello", &[]);
    // The process exits, but something it left behind keeps its stdout open.
    rig.process(0).stdout.write(b"left behind");
    rig.process(0).exit = Some(ExitStatus::Exited(0));
    let act = rig.pump();
    rig.expect(&[output(e, Stream::Stdout, 0, b"left behind")]);
    assert_eq!(act.next_deadline, Some(T0 + DRAIN_GRACE_MS));
    assert_eq!(act.running, 1);

    // Output during the grace still arrives.
    rig.process(0).stdout.write(b"late");
    let act = rig.advance(DRAIN_GRACE_MS - 1);
    rig.expect(&[output(e, Stream::Stdout, 11, b"late")]);
    assert_eq!(act.next_deadline, Some(T0 + DRAIN_GRACE_MS));

    let act = rig.advance(1);
    rig.expect(&[exit(e, finished(Outcome::Exited(0), 0, 15, 0))]);
    assert_eq!(act.running, 0);
    assert!(rig.process(0).released);
}

// --- Flow control ---

#[test]
fn full_ring_stops_reading_output_until_the_host_drains_and_loses_nothing() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "hello", &[]);
    let data = pattern(200_000);
    rig.process(0).stdout.write(&data);
    rig.process(0).stdout.close();
    rig.process(0).stderr.close();

    let act = rig.pump();
    let needed = act.tx_needed.expect("the agent waits for room");
    assert!(needed > rig.tx_free(), "{needed} > {}", rig.tx_free());
    assert!(!act.worked);
    let reads = rig.process(0).reads();
    let pending = rig.process(0).stdout.pending();
    assert!(pending > 150_000, "only a ring's worth was read");
    // However long the host takes, the agent reads no more.
    for _ in 0..5 {
        let act = rig.advance(1000);
        assert_eq!(act.tx_needed, Some(needed));
        assert_eq!(rig.process(0).reads(), reads);
    }

    rig.process(0).exit = Some(ExitStatus::Exited(0));
    let (stdout, rounds, fin) = drain_execution(&mut rig, e);
    assert_eq!(stdout, data, "every byte, in order");
    assert!(
        rounds >= 6,
        "the ring filled again and again ({rounds} rounds)"
    );
    assert_eq!(fin, finished(Outcome::Exited(0), 5000, 200_000, 0));
}

#[test]
fn exit_while_output_is_held_back_by_a_full_ring_loses_nothing() {
    let mut rig = Rig::standard();
    // The process writes 60 000 bytes into its pipe and exits; the host does not read for
    // longer than the drain grace.
    let e = rig.exec(1, "hello", &[]);
    let data = pattern(60_000);
    rig.process(0).stdout.write(&data);
    rig.process(0).end(ExitStatus::Exited(0));
    rig.pump();
    assert!(rig.process(0).reaped);
    assert!(rig.process(0).stdout.pending() > 0);
    rig.advance(3 * DRAIN_GRACE_MS);
    let (stdout, _, fin) = drain_execution(&mut rig, e);
    assert_eq!(stdout.len(), data.len());
    assert_eq!(stdout, data, "every byte, in order");
    assert_eq!(fin, finished(Outcome::Exited(0), 0, 60_000, 0));

    // The same with a pipe that something left behind keeps open: once the host has made
    // room and the pipe is empty, the grace (long expired) ends the execution.
    let e = rig.exec(2, "hello", &[]);
    rig.process(1).stdout.write(&data);
    rig.process(1).stderr.close();
    rig.process(1).exit = Some(ExitStatus::Exited(0));
    rig.pump();
    rig.advance(3 * DRAIN_GRACE_MS);
    let (stdout, _, fin) = drain_execution(&mut rig, e);
    assert_eq!(stdout, data, "every byte, in order");
    assert_eq!(fin, finished(Outcome::Exited(0), 0, 60_000, 0));
    assert!(rig.process(1).released);
}

#[test]
fn request_arriving_while_the_ring_is_full_is_answered_once_there_is_room() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "forever", &[]);
    // Nine chunks of 4000 bytes: eight fill the ring to less than REPLY_RESERVE free.
    let chunks: Vec<Vec<u8>> = (0..9).map(|i| vec![b'a' + i as u8; 4000]).collect();
    for chunk in &chunks {
        rig.process(0).stdout.write(chunk);
    }
    rig.pump();
    assert!(rig.tx_free() < REPLY_RESERVE, "free: {}", rig.tx_free());
    assert_eq!(rig.process(0).stdout.pending(), 4000);

    rig.send(&HostToAgent::Ping { nonce: 7 });
    let act = rig.pump();
    assert_eq!(act.tx_needed, Some(REPLY_RESERVE));
    assert!(rig.guest.has_incoming(&rig.region), "the request waits");

    // The host takes one frame: the agent answers, then reads on.
    assert_eq!(rig.recv(), Some(output(e, Stream::Stdout, 0, &chunks[0])));
    rig.pump();
    assert!(!rig.guest.has_incoming(&rig.region));
    let mut want: Vec<_> = (1..8)
        .map(|i| output(e, Stream::Stdout, 4000 * i as u64, &chunks[i]))
        .collect();
    want.push(AgentToHost::Pong { nonce: 7 });
    want.push(output(e, Stream::Stdout, 32_000, &chunks[8]));
    rig.expect(&want);
}

#[test]
fn request_flood_pauses_at_the_reply_reserve_and_loses_nothing() {
    let mut rig = Rig::standard();
    let mut sent = 0u64;
    for _ in 0..2 {
        for _ in 0..1000 {
            rig.send(&HostToAgent::Ping { nonce: sent });
            sent += 1;
        }
        rig.pump();
    }
    let act = rig.pump();
    assert_eq!(act.tx_needed, Some(REPLY_RESERVE));
    assert!(rig.tx_free() < REPLY_RESERVE);
    assert!(rig.guest.has_incoming(&rig.region));

    let mut nonces = Vec::new();
    for _ in 0..10 {
        for msg in rig.recv_all() {
            match msg {
                AgentToHost::Pong { nonce } => nonces.push(nonce),
                other => panic!("unexpected {other:?}"),
            }
        }
        rig.pump();
    }
    assert_eq!(nonces, (0..sent).collect::<Vec<_>>());
}

// --- Timeouts ---

#[test]
fn timeout_terminates_then_kills_a_stubborn_process() {
    let mut rig = Rig::standard(); // kill_grace_ms = 500
    let e = rig.exec(1, "timed", &[]); // timeout_ms = 1000
    rig.process(0).stubborn = true;
    assert_eq!(rig.pump().next_deadline, Some(T0 + 1000));
    rig.advance(999);
    rig.expect_nothing();
    assert!(rig.process(0).signals.is_empty());

    let act = rig.advance(1);
    assert_eq!(rig.process(0).signals, [Signal::Terminate]);
    assert_eq!(act.next_deadline, Some(T0 + 1500));
    rig.advance(499);
    rig.expect_nothing();
    assert_eq!(rig.process(0).signals, [Signal::Terminate]);

    let act = rig.advance(1);
    assert_eq!(rig.process(0).signals, [Signal::Terminate, Signal::Kill]);
    rig.expect(&[exit(e, finished(Outcome::TimedOut, 1500, 0, 0))]);
    assert_eq!(act.next_deadline, None);
}

#[test]
fn timeout_ends_a_process_that_obeys_terminate() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "timed", &[]);
    rig.process(0).stdout.write(b"working");
    rig.advance(1000);
    assert_eq!(rig.process(0).signals, [Signal::Terminate]);
    rig.expect(&[
        output(e, Stream::Stdout, 0, b"working"),
        exit(e, finished(Outcome::TimedOut, 1000, 7, 0)),
    ]);
}

#[test]
fn request_timeout_can_only_shorten_the_commands() {
    let mut rig = Rig::standard();
    // Shorter than the command's 1000 ms: it counts.
    rig.request(&exec_request(1, "timed", &[], Some(300)));
    rig.expect(&[AgentToHost::Accepted {
        request_id: 1,
        execution: id(1),
    }]);
    assert_eq!(rig.pump().next_deadline, Some(T0 + 300));
    rig.advance(300);
    rig.expect(&[exit(id(1), finished(Outcome::TimedOut, 300, 0, 0))]);

    // Longer: the command's stands.
    let start = rig.now;
    rig.request(&exec_request(2, "timed", &[], Some(5000)));
    rig.expect(&[AgentToHost::Accepted {
        request_id: 2,
        execution: id(2),
    }]);
    assert_eq!(rig.pump().next_deadline, Some(start + 1000));
    rig.advance(1000);
    rig.expect(&[exit(id(2), finished(Outcome::TimedOut, 1000, 0, 0))]);

    // The default timeout (60 s) is a command timeout too.
    let start = rig.now;
    rig.request(&exec_request(3, "hello", &[], None));
    rig.recv_all();
    assert_eq!(rig.pump().next_deadline, Some(start + 60_000));
    rig.process(2).end(ExitStatus::Exited(0));
    rig.pump();
    rig.expect(&[exit(id(3), finished(Outcome::Exited(0), 0, 0, 0))]);
    rig.request(&exec_request(4, "hello", &[], Some(70_000)));
    rig.recv_all();
    assert_eq!(rig.pump().next_deadline, Some(start + 60_000));
    rig.process(3).end(ExitStatus::Exited(0));
    rig.pump();
    rig.expect(&[exit(id(4), finished(Outcome::Exited(0), 0, 0, 0))]);

    // A command without a timeout takes the request's, or runs without one.
    let start = rig.now;
    rig.request(&exec_request(5, "forever", &[], None));
    rig.recv_all();
    assert_eq!(rig.pump().next_deadline, None);
    rig.request(&exec_request(6, "forever", &[], Some(200)));
    rig.recv_all();
    assert_eq!(rig.pump().next_deadline, Some(start + 200));
    rig.advance(200);
    rig.expect(&[exit(id(6), finished(Outcome::TimedOut, 200, 0, 0))]);
    assert!(rig.process(4).signals.is_empty());
}

// --- Cancel ---

#[test]
fn cancel_terminates_and_reports_cancelled() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "forever", &[]);
    rig.now += 100;
    rig.request(&cancel(2, e));
    assert_eq!(rig.process(0).signals, [Signal::Terminate]);
    rig.expect(&[exit(e, finished(Outcome::Cancelled, 100, 0, 0))]);
}

#[test]
fn cancel_kills_a_stubborn_process_after_the_grace() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "timed", &[]);
    rig.process(0).stubborn = true;
    rig.now += 100;
    let act = rig.request(&cancel(2, e));
    rig.expect_nothing();
    assert_eq!(rig.process(0).signals, [Signal::Terminate]);
    assert_eq!(act.next_deadline, Some(T0 + 600));
    // A second cancel changes nothing.
    rig.request(&cancel(3, e));
    rig.expect_nothing();
    rig.advance(499);
    rig.expect_nothing();
    assert_eq!(rig.process(0).signals, [Signal::Terminate]);
    rig.advance(1);
    assert_eq!(rig.process(0).signals, [Signal::Terminate, Signal::Kill]);
    rig.expect(&[exit(e, finished(Outcome::Cancelled, 600, 0, 0))]);
}

#[test]
fn cancel_of_a_finished_execution_is_silent_and_of_an_unknown_one_rejected() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "hello", &[]);
    rig.process(0).end(ExitStatus::Exited(0));
    rig.pump();
    rig.expect(&[exit(e, finished(Outcome::Exited(0), 0, 0, 0))]);
    rig.request(&cancel(2, e));
    rig.expect_nothing();
    assert!(rig.process(0).signals.is_empty());

    // Exited but not yet drained: nothing to signal, no reply, and it is not "cancelled".
    let e = rig.exec(3, "hello", &[]);
    rig.process(1).exit = Some(ExitStatus::Exited(4));
    rig.pump();
    rig.request(&cancel(4, e));
    rig.expect_nothing();
    assert!(rig.process(1).signals.is_empty());
    rig.advance(DRAIN_GRACE_MS);
    rig.expect(&[exit(e, finished(Outcome::Exited(4), 0, 0, 0))]);

    rig.request(&cancel(5, id(99)));
    rig.expect(&[rejected(5, Rejection::UnknownExecution)]);
    let other_generation = ExecutionId {
        generation: GENERATION + 1,
        counter: 1,
    };
    rig.request(&cancel(6, other_generation));
    rig.expect(&[rejected(6, Rejection::UnknownExecution)]);
}

// --- Status ---

#[test]
fn status_of_running_finished_and_unknown_executions() {
    let mut rig = Rig::standard();
    let e = rig.exec(1, "hello", &[]);
    rig.process(0).stdout.write(b"12345");
    rig.process(0).stderr.write(b"abc");
    rig.advance(250);
    rig.recv_all();
    rig.request(&status(2, e));
    rig.expect(&[AgentToHost::Status {
        request_id: 2,
        execution: e,
        state: ExecState::Running {
            elapsed_ms: 250,
            stdout_bytes: 5,
            stderr_bytes: 3,
        },
    }]);

    rig.process(0).end(ExitStatus::Exited(4));
    rig.advance(50);
    let fin = finished(Outcome::Exited(4), 300, 5, 3);
    rig.expect(&[exit(e, fin)]);
    rig.advance(1000);
    rig.request(&status(3, e));
    rig.expect(&[AgentToHost::Status {
        request_id: 3,
        execution: e,
        state: ExecState::Finished(fin),
    }]);

    rig.request(&status(4, id(2)));
    rig.expect(&[rejected(4, Rejection::UnknownExecution)]);
}

#[test]
fn finished_executions_beyond_max_finished_are_forgotten_oldest_first() {
    let mut rig = Rig::standard();
    let total = MAX_FINISHED as u32 + 2;
    for n in 1..=total {
        let mut p = FakeProcess::default();
        p.end(ExitStatus::Exited(n as i32));
        rig.fake.scripts.push_back(p);
        rig.request(&exec_request(u64::from(n), "hello", &[], None));
        rig.expect(&[
            AgentToHost::Accepted {
                request_id: u64::from(n),
                execution: id(n),
            },
            exit(id(n), finished(Outcome::Exited(n as i32), 0, 0, 0)),
        ]);
    }
    for forgotten in [1, 2] {
        rig.request(&status(1000, id(forgotten)));
        rig.expect(&[rejected(1000, Rejection::UnknownExecution)]);
    }
    for remembered in [3, total] {
        rig.request(&status(1001, id(remembered)));
        rig.expect(&[AgentToHost::Status {
            request_id: 1001,
            execution: id(remembered),
            state: ExecState::Finished(finished(Outcome::Exited(remembered as i32), 0, 0, 0)),
        }]);
    }
    // Cancel forgets alike.
    rig.request(&cancel(1002, id(1)));
    rig.expect(&[rejected(1002, Rejection::UnknownExecution)]);
    rig.request(&cancel(1003, id(3)));
    rig.expect_nothing();
}

// --- Push ---

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn push_begin<'a>(push_id: u64, name: &'a str, data: &[u8]) -> HostToAgent<'a> {
    HostToAgent::PushBegin {
        push_id,
        name,
        size: data.len() as u64,
        sha256: sha256(data),
    }
}

fn chunk(push_id: u64, offset: usize, data: &[u8]) -> HostToAgent<'_> {
    HostToAgent::PushChunk {
        push_id,
        offset: offset as u64,
        data,
    }
}

fn commit(push_id: u64, run: bool, timeout_ms: Option<u32>) -> HostToAgent<'static> {
    HostToAgent::PushCommit {
        push_id,
        run,
        timeout_ms,
    }
}

fn push_result(push_id: u64, outcome: PushOutcome) -> AgentToHost<'static> {
    AgentToHost::PushResult { push_id, outcome }
}

fn push_failed(push_id: u64, reason: Rejection) -> AgentToHost<'static> {
    push_result(push_id, PushOutcome::Failed(reason))
}

/// Sends `data` in chunks of `size`, expecting no reply.
fn push_chunks(rig: &mut Rig, push_id: u64, data: &[u8], size: usize) {
    for (i, piece) in data.chunks(size).enumerate() {
        rig.request(&chunk(push_id, i * size, piece));
        rig.expect_nothing();
    }
}

#[test]
fn push_is_refused_when_disabled() {
    let mut rig = Rig::new(&config_without_push());
    let program = b"#!/bin/sh\necho hi\n";
    rig.request(&push_begin(1, "tool", program));
    rig.expect(&[push_failed(1, Rejection::NotAllowed)]);
    rig.request(&chunk(1, 0, program));
    rig.expect_nothing();
    rig.request(&commit(1, true, None));
    rig.expect(&[push_failed(1, Rejection::BadPush)]);
    assert!(rig.fake.push_ops.is_empty());
    assert!(rig.fake.spawns.is_empty());
    assert_eq!(rig.agent.counters().rejections, 2);
}

#[test]
fn push_is_refused_when_too_large_or_badly_named() {
    let mut rig = Rig::standard(); // max_bytes = 1000
    rig.request(&HostToAgent::PushBegin {
        push_id: 1,
        name: "tool",
        size: 1001,
        sha256: [0; 32],
    });
    rig.expect(&[push_failed(1, Rejection::TooLarge)]);
    let long = "x".repeat(65);
    for (n, name) in [
        "a/b",
        "/abs",
        ".hidden",
        "..",
        ".",
        "",
        "x y",
        "tool\n",
        "é",
        long.as_str(),
    ]
    .into_iter()
    .enumerate()
    {
        let push_id = 10 + n as u64;
        rig.request(&push_begin(push_id, name, b"x"));
        rig.expect(&[push_failed(push_id, Rejection::BadPush)]);
    }
    assert!(rig.fake.push_ops.is_empty());

    // The largest size and the longest name are fine.
    let program = vec![7; 1000];
    let name = "x".repeat(64);
    rig.request(&push_begin(30, &name, &program));
    rig.expect_nothing();
    push_chunks(&mut rig, 30, &program, 300);
    rig.request(&commit(30, false, None));
    rig.expect(&[push_result(30, PushOutcome::Stored)]);
    assert_eq!(rig.fake.files[&format!("/srv/push/{name}")], program);
}

#[test]
fn push_in_chunks_is_stored() {
    let mut rig = Rig::standard();
    let program = pattern(250);
    rig.request(&push_begin(5, "tool-1.sh", &program));
    rig.expect_nothing();
    push_chunks(&mut rig, 5, &program, 100);
    rig.request(&commit(5, false, None));
    rig.expect(&[push_result(5, PushOutcome::Stored)]);
    assert_eq!(
        rig.fake.files.keys().collect::<Vec<_>>(),
        ["/srv/push/tool-1.sh"]
    );
    assert_eq!(rig.fake.files["/srv/push/tool-1.sh"], program);
    assert_eq!(
        rig.fake.push_ops,
        [
            PushOp::Create {
                dir: "/srv/push".into(),
                name: "tool-1.sh".into()
            },
            PushOp::Write(100),
            PushOp::Write(100),
            PushOp::Write(50),
            PushOp::Finish { keep: true },
        ]
    );
    assert_eq!(
        rig.fake.log,
        [Logged::Pushed {
            name: "tool-1.sh".into(),
            size: 250
        }]
    );
    assert!(rig.fake.spawns.is_empty());
    // Once committed, the push is unknown.
    rig.request(&commit(5, false, None));
    rig.expect(&[push_failed(5, Rejection::BadPush)]);
    rig.request(&chunk(5, 250, b"x"));
    rig.expect_nothing();

    // An empty program needs no chunk.
    rig.request(&push_begin(6, "empty", b""));
    rig.request(&commit(6, false, None));
    rig.expect(&[push_result(6, PushOutcome::Stored)]);
    assert_eq!(rig.fake.files["/srv/push/empty"], b"");
}

#[test]
fn push_with_the_wrong_hash_is_deleted() {
    let mut rig = Rig::standard();
    let program = pattern(100);
    let mut begin = push_begin(1, "tool", &program);
    if let HostToAgent::PushBegin { sha256, .. } = &mut begin {
        sha256[0] ^= 1;
    }
    rig.request(&begin);
    push_chunks(&mut rig, 1, &program, 64);
    rig.request(&commit(1, true, None));
    rig.expect(&[push_failed(1, Rejection::HashMismatch)]);
    assert_eq!(
        rig.fake.push_ops.last(),
        Some(&PushOp::Finish { keep: false })
    );
    assert_eq!(rig.fake.staging, None);
    assert!(rig.fake.files.is_empty());
    assert!(rig.fake.spawns.is_empty());
}

#[test]
fn push_chunk_out_of_order_fails_the_push_once() {
    let mut rig = Rig::standard();
    let program = pattern(300);
    rig.request(&push_begin(1, "tool", &program));
    rig.request(&chunk(1, 0, &program[..100]));
    rig.expect_nothing();
    rig.request(&chunk(1, 200, &program[200..]));
    rig.expect(&[push_failed(1, Rejection::BadPush)]);
    // Later chunks are dropped without a word; the commit is refused.
    rig.request(&chunk(1, 100, &program[100..200]));
    rig.expect_nothing();
    rig.request(&commit(1, false, None));
    rig.expect(&[push_failed(1, Rejection::BadPush)]);
    assert_eq!(
        rig.fake.push_ops,
        [
            PushOp::Create {
                dir: "/srv/push".into(),
                name: "tool".into()
            },
            PushOp::Write(100),
            PushOp::Finish { keep: false },
        ]
    );
    assert!(rig.fake.files.is_empty());

    // A repeated chunk is out of order too.
    rig.request(&push_begin(2, "tool", &program));
    rig.request(&chunk(2, 0, &program[..100]));
    rig.request(&chunk(2, 0, &program[..100]));
    rig.expect(&[push_failed(2, Rejection::BadPush)]);
}

#[test]
fn push_beyond_its_size_or_committed_early_fails() {
    let mut rig = Rig::standard();
    let program = pattern(100);
    rig.request(&push_begin(1, "tool", &program));
    rig.request(&chunk(1, 0, &pattern(101)));
    rig.expect(&[push_failed(1, Rejection::TooLarge)]);
    rig.request(&commit(1, false, None));
    rig.expect(&[push_failed(1, Rejection::BadPush)]);

    rig.request(&push_begin(2, "tool", &program));
    rig.request(&chunk(2, 0, &program[..50]));
    rig.request(&commit(2, false, None));
    rig.expect(&[push_failed(2, Rejection::BadPush)]);
    assert_eq!(
        rig.fake.push_ops.last(),
        Some(&PushOp::Finish { keep: false })
    );
    assert!(rig.fake.files.is_empty());

    // The staging file cannot be created.
    rig.fake.push_create_error = Some(28); // ENOSPC
    rig.request(&push_begin(3, "tool", &program));
    rig.expect(&[push_failed(3, Rejection::Failed)]);
    rig.request(&chunk(3, 0, &program));
    rig.expect_nothing();
    rig.request(&commit(3, false, None));
    rig.expect(&[push_failed(3, Rejection::BadPush)]);
}

#[test]
fn push_commit_with_run_starts_the_program() {
    let mut rig = Rig::standard();
    let program = b"#!/bin/sh\necho pushed\n";
    rig.exec(1, "forever", &[]); // execution 1
    rig.request(&push_begin(9, "tool", program));
    push_chunks(&mut rig, 9, program, 10);
    let act = rig.request(&commit(9, true, Some(500)));
    rig.expect(&[push_result(9, PushOutcome::Started(id(2)))]);
    assert_eq!(rig.fake.files["/srv/push/tool"], program);
    assert_eq!(
        rig.fake.spawns[1],
        Spawned {
            program: "/srv/push/tool".into(),
            args: vec![],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            cwd: Some("/srv/push".into()),
            user: Some(Who::Name("runner".into())),
            group: Some(Who::Id(100)),
            limits: Limits::NONE,
        }
    );
    // The run's timeout is the shorter of [push] timeout_ms (10 s) and the commit's.
    assert_eq!(act.next_deadline, Some(T0 + 500));
    rig.process(1).stdout.write(b"pushed\n");
    rig.process(1).end(ExitStatus::Exited(0));
    rig.advance(20);
    rig.expect(&[
        output(id(2), Stream::Stdout, 0, b"pushed\n"),
        exit(id(2), finished(Outcome::Exited(0), 20, 7, 0)),
    ]);
    assert!(rig.fake.log.contains(&Logged::Started {
        execution: id(2),
        command: "tool".into()
    }));

    // Without a timeout in the commit, [push] timeout_ms applies.
    let start = rig.now;
    rig.request(&push_begin(10, "tool", program));
    rig.request(&chunk(10, 0, program));
    let act = rig.request(&commit(10, true, None));
    rig.expect(&[push_result(10, PushOutcome::Started(id(3)))]);
    assert_eq!(act.next_deadline, Some(start + 10_000));
}

#[test]
fn push_run_that_cannot_start_reports_started_then_failed_to_start() {
    let mut rig = Rig::standard();
    let program = b"\x7fELF";
    rig.request(&push_begin(1, "tool", program));
    rig.request(&chunk(1, 0, program));
    rig.fake.spawn_error = Some(13); // EACCES
    rig.request(&commit(1, true, None));
    rig.expect(&[
        push_result(1, PushOutcome::Started(id(1))),
        exit(id(1), finished(Outcome::FailedToStart(13), 0, 0, 0)),
    ]);
    assert_eq!(rig.fake.files["/srv/push/tool"], program);
    assert_eq!(rig.fake.spawns.len(), 1);
}

#[test]
fn push_run_is_busy_at_max_running_but_stored() {
    let mut rig = Rig::standard(); // max_running = 3
    for n in 1..=3 {
        rig.exec(n, "forever", &[]);
    }
    let program = b"#!/bin/sh\n";
    rig.request(&push_begin(1, "tool", program));
    rig.request(&chunk(1, 0, program));
    rig.request(&commit(1, true, None));
    rig.expect(&[push_failed(1, Rejection::Busy)]);
    assert_eq!(rig.fake.files["/srv/push/tool"], program);
    assert_eq!(rig.fake.spawns.len(), 3);
}

#[test]
fn push_begun_under_an_earlier_config_is_not_committed_under_the_new_one() {
    // Same [push] table but another directory: the staged file is in the old one.
    let moved = CONFIG.replace("dir = \"/srv/push\"", "dir = \"/srv/other\"");
    let program = b"#!/bin/sh\necho v1\n";
    for new_config in [moved, config_without_push()] {
        let mut rig = Rig::standard();
        rig.request(&push_begin(1, "tool", program));
        rig.request(&chunk(1, 0, &program[..5]));
        rig.agent.swap_config(&mut config(&new_config));
        rig.request(&chunk(1, 5, &program[5..]));
        rig.request(&commit(1, true, None));
        rig.expect(&[push_failed(1, Rejection::Failed)]);
        assert!(rig.fake.spawns.is_empty(), "nothing runs");
        assert!(rig.fake.files.is_empty(), "nothing is stored");
        assert_eq!(
            rig.fake.push_ops.last(),
            Some(&PushOp::Finish { keep: false })
        );
    }
}

#[test]
fn second_push_while_one_is_in_progress_is_busy() {
    let mut rig = Rig::standard();
    let first = pattern(200);
    let second = pattern(10);
    rig.request(&push_begin(1, "first", &first));
    rig.request(&chunk(1, 0, &first[..100]));
    rig.request(&push_begin(2, "second", &second));
    rig.expect(&[push_failed(2, Rejection::Busy)]);
    rig.request(&chunk(2, 0, &second));
    rig.expect_nothing();
    // Committing the refused push says so and leaves the one in progress alone.
    rig.request(&commit(2, false, None));
    rig.expect(&[push_failed(2, Rejection::BadPush)]);
    // So does committing a push that never began.
    rig.request(&commit(3, false, None));
    rig.expect(&[push_failed(3, Rejection::BadPush)]);
    rig.request(&chunk(1, 100, &first[100..]));
    rig.expect_nothing();
    rig.request(&commit(1, false, None));
    rig.expect(&[push_result(1, PushOutcome::Stored)]);
    assert_eq!(rig.fake.files["/srv/push/first"], first);
    assert!(!rig.fake.files.contains_key("/srv/push/second"));

    // A new push may begin once the last one has failed.
    rig.request(&push_begin(4, "third", &first));
    rig.request(&chunk(4, 5, &first[..10]));
    rig.expect(&[push_failed(4, Rejection::BadPush)]);
    rig.request(&push_begin(5, "third", &second));
    rig.request(&chunk(5, 0, &second));
    rig.request(&commit(5, false, None));
    rig.expect(&[push_result(5, PushOutcome::Stored)]);
    assert_eq!(rig.fake.files["/srv/push/third"], second);
}

// --- Undecodable frames ---

#[test]
fn undecodable_frames_get_an_error_and_the_agent_carries_on() {
    let mut rig = Rig::standard();
    let mut ping = [0u8; 16];
    let ping = ring_protocol::message::encode(&HostToAgent::Ping { nonce: 3 }, &mut ping)
        .expect("encodes")
        .to_vec();
    let mut trailing = ping.clone();
    trailing.push(0);
    let garbage: [&[u8]; 5] = [&[0xff, 0xff, 0xff], &[], &[99], &trailing, &ping[..1]];
    for garbage in garbage {
        rig.send_frame(garbage);
        rig.pump();
        rig.expect(&[UNDECODABLE]);
    }
    rig.send_frame(&ping);
    rig.pump();
    rig.expect(&[AgentToHost::Pong { nonce: 3 }]);
    assert_eq!(rig.agent.counters().frames_in, 6);
    assert_eq!(
        rig.fake.log[0],
        Logged::Protocol("undecodable frame from the host".into())
    );
}

// --- Configuration reload ---

const NEW_CONFIG: &str = r#"
[agent]
max_running = 2
kill_grace_ms = 100

[[command]]
name = "small"
description = "Now 1000 bytes of output"
program = "/bin/small2"
max_output = 1000

[[command]]
name = "new"
program = "/bin/new"
"#;

#[test]
fn config_reload_is_announced_and_applies_to_new_executions_only() {
    let mut rig = Rig::standard();
    let small = rig.exec(1, "small", &[]); // max_output 10
    let timed = rig.exec(2, "timed", &[]); // timeout 1000, kill grace 500
    rig.process(1).stubborn = true;

    let mut swapped = config(NEW_CONFIG);
    rig.agent.swap_config(&mut swapped);
    assert_eq!(swapped.command_count(), 5, "the old config is handed back");
    assert_eq!(rig.agent.config_revision(), 2);
    rig.agent
        .announce_config(&mut rig.guest, &rig.region)
        .expect("sent");
    rig.expect(&[AgentToHost::CommandsChanged { config_revision: 2 }]);

    // The hello says so too, without PUSH now.
    rig.request(&host_hello(1, 1, false));
    rig.expect(&[agent_hello(CAPS_WITHOUT_PUSH, 2, true)]);
    rig.request(&list(3, 0, 10));
    let got = rig.recv_all();
    assert_eq!(got.len(), 3);
    assert!(matches!(
        got[0],
        AgentToHost::Command {
            index: 0,
            info: CommandInfo {
                name: "small",
                max_output: 1000,
                ..
            },
            ..
        }
    ));
    assert!(matches!(
        got[1],
        AgentToHost::Command {
            index: 1,
            info: CommandInfo { name: "new", .. },
            ..
        }
    ));
    assert_eq!(
        got[2],
        AgentToHost::CommandsEnd {
            request_id: 3,
            total: 2,
            next: None
        }
    );
    rig.request(&exec_request(4, "greet", &["bob", "3", "loud"], None));
    rig.expect(&[rejected(4, Rejection::UnknownCommand)]);
    rig.request(&push_begin(5, "tool", b"x"));
    rig.expect(&[push_failed(5, Rejection::NotAllowed)]);
    // max_running is now 2, and two run.
    rig.request(&exec_request(6, "new", &[], None));
    rig.expect(&[rejected(6, Rejection::Busy)]);

    // The running executions keep the rules they started with.
    rig.process(0).stdout.write(&pattern(20));
    rig.pump();
    rig.expect(&[output(small, Stream::Stdout, 0, &pattern(10))]);
    rig.advance(1000);
    assert_eq!(rig.process(1).signals, [Signal::Terminate]);
    rig.advance(499);
    assert_eq!(rig.process(1).signals, [Signal::Terminate]);
    rig.advance(1);
    assert_eq!(rig.process(1).signals, [Signal::Terminate, Signal::Kill]);
    rig.expect(&[exit(timed, finished(Outcome::TimedOut, 1500, 0, 0))]);
    rig.process(0).end(ExitStatus::Exited(0));
    rig.pump();
    rig.expect(&[exit(
        small,
        Finished {
            outcome: Outcome::Exited(0),
            duration_ms: 1500,
            stdout_bytes: 20,
            stderr_bytes: 0,
            truncated: true,
        },
    )]);

    // New executions follow the new rules.
    let e = rig.exec(7, "small", &[]);
    assert_eq!(e, id(3));
    assert_eq!(rig.fake.spawns[2].program, "/bin/small2");
    rig.process(2).stdout.write(&pattern(20));
    rig.process(2).end(ExitStatus::Exited(0));
    rig.pump();
    rig.expect(&[
        output(e, Stream::Stdout, 0, &pattern(20)),
        exit(e, finished(Outcome::Exited(0), 0, 20, 0)),
    ]);
    rig.exec(8, "new", &[]);
    assert_eq!(rig.fake.spawns[3].program, "/bin/new");
}
