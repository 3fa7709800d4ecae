//! Criterion benchmarks of the message codec alone: postcard encoding into a stack buffer and
//! decoding from a private copy, for one representative instance of every `HostToAgent` and
//! `AgentToHost` variant. What a message costs on the channel is this plus the ring's share,
//! which `channel.rs` measures.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use ring_protocol::message::{
    self, AgentCounters, ArgProblem, Args, Capabilities, CommandInfo, ErrorCode, ExecRequest,
    ExecState, ExecutionId, Finished, Hello, Metrics, Outcome, PROTOCOL_VERSION, ParamKind,
    ParamSpec, ProtocolError, PushOutcome, Rejection, Stream,
};
use ring_protocol::{AgentToHost, HostToAgent, MAX_PAYLOAD_LEN};
use serde::Serialize;

/// Bytes carried by the bulk messages (`PushChunk`, `Output`): a typical chunk.
const BULK_LEN: usize = 4096;

const EXECUTION: ExecutionId = ExecutionId {
    generation: 0x6a3f_09c1,
    counter: 17,
};

fn codec(c: &mut Criterion) {
    let bulk: Vec<u8> = (0..BULK_LEN).map(|i| (i * 31 % 251) as u8).collect();
    let mut group = c.benchmark_group("codec");
    for (kind, msg) in host_to_agent(&bulk) {
        let bytes = encoded(&msg);
        assert_eq!(
            message::decode::<HostToAgent<'_>>(&bytes),
            Ok(msg.clone()),
            "{kind} must round-trip"
        );
        bench_encode(&mut group, kind, &msg, bytes.len());
        bench_decode(&mut group, kind, &bytes, |b| {
            black_box(message::decode::<HostToAgent<'_>>(b)).expect("decodes");
        });
    }
    for (kind, msg) in agent_to_host(&bulk) {
        let bytes = encoded(&msg);
        assert_eq!(
            message::decode::<AgentToHost<'_>>(&bytes),
            Ok(msg.clone()),
            "{kind} must round-trip"
        );
        bench_encode(&mut group, kind, &msg, bytes.len());
        bench_decode(&mut group, kind, &bytes, |b| {
            black_box(message::decode::<AgentToHost<'_>>(b)).expect("decodes");
        });
    }
    group.finish();
}

/// `codec/encode/<kind>`: one `message::encode` into a frame-sized stack buffer.
fn bench_encode<T: Serialize>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    kind: &str,
    msg: &T,
    encoded_len: usize,
) {
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    group.throughput(Throughput::Bytes(encoded_len as u64));
    group.bench_function(BenchmarkId::new("encode", kind), |b| {
        b.iter(|| {
            let out = message::encode(black_box(msg), &mut buf).expect("fits in a frame");
            black_box(out);
        });
    });
}

/// `codec/decode/<kind>`: one `message::decode` of the encoded bytes, borrowing from them.
fn bench_decode(
    group: &mut BenchmarkGroup<'_, WallTime>,
    kind: &str,
    bytes: &[u8],
    decode: fn(&[u8]),
) {
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function(BenchmarkId::new("decode", kind), |b| {
        b.iter(|| decode(black_box(bytes)));
    });
}

fn encoded<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    message::encode(msg, &mut buf)
        .expect("every sample fits in a frame")
        .to_vec()
}

fn hello(software: &str, config_revision: u32, reply: bool) -> Hello<'_> {
    Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        capabilities: Capabilities::PUSH
            .union(Capabilities::METRICS)
            .union(Capabilities::CANCEL),
        generation: 0x6a3f_09c1,
        config_revision,
        software,
        reply,
    }
}

/// One instance of every host-to-agent variant, in wire order, with realistic sizes.
fn host_to_agent(bulk: &[u8]) -> Vec<(&'static str, HostToAgent<'_>)> {
    vec![
        (
            "h2a_hello",
            HostToAgent::Hello(hello("portless-host 0.1.0", 0, false)),
        ),
        (
            "h2a_ping",
            HostToAgent::Ping {
                nonce: 0x0123_4567_89ab_cdef,
            },
        ),
        (
            "h2a_list_commands",
            HostToAgent::ListCommands {
                request_id: 7,
                start: 0,
                limit: 32,
            },
        ),
        (
            "h2a_exec",
            HostToAgent::Exec(ExecRequest {
                request_id: 1001,
                command: "restart-service",
                args: Args::from_slice(&["nginx", "graceful", "30"]).expect("3 <= MAX_ARGS"),
                timeout_ms: Some(30_000),
            }),
        ),
        (
            "h2a_status",
            HostToAgent::Status {
                request_id: 1002,
                execution: EXECUTION,
            },
        ),
        (
            "h2a_cancel",
            HostToAgent::Cancel {
                request_id: 1003,
                execution: EXECUTION,
            },
        ),
        (
            "h2a_push_begin",
            HostToAgent::PushBegin {
                push_id: 55,
                name: "collect-diagnostics.sh",
                size: 1 << 20,
                sha256: [0x5a; 32],
            },
        ),
        (
            "h2a_push_chunk",
            HostToAgent::PushChunk {
                push_id: 55,
                offset: 64 * 1024,
                data: bulk,
            },
        ),
        (
            "h2a_push_commit",
            HostToAgent::PushCommit {
                push_id: 55,
                run: true,
                timeout_ms: Some(60_000),
            },
        ),
        ("h2a_metrics", HostToAgent::Metrics { request_id: 1004 }),
        (
            "h2a_error",
            HostToAgent::Error(ProtocolError {
                code: ErrorCode::Unexpected,
                detail: "exec request before hello",
            }),
        ),
    ]
}

/// One instance of every agent-to-host variant, in wire order, with realistic sizes.
fn agent_to_host(bulk: &[u8]) -> Vec<(&'static str, AgentToHost<'_>)> {
    let params = [
        ParamSpec {
            name: "service",
            kind: ParamKind::OneOf {
                choices: "nginx|postgres|redis",
            },
        },
        ParamSpec {
            name: "grace_seconds",
            kind: ParamKind::Integer { min: 0, max: 300 },
        },
    ];
    vec![
        (
            "a2h_hello",
            AgentToHost::Hello(hello("portless-agent 0.1.0", 42, true)),
        ),
        (
            "a2h_pong",
            AgentToHost::Pong {
                nonce: 0x0123_4567_89ab_cdef,
            },
        ),
        (
            "a2h_command",
            AgentToHost::Command {
                request_id: 7,
                index: 3,
                info: CommandInfo {
                    name: "restart-service",
                    description: "Restart one of the allowed systemd services",
                    params: params.into_iter().collect(),
                    timeout_ms: 60_000,
                    max_output: 1 << 20,
                },
            },
        ),
        (
            "a2h_commands_end",
            AgentToHost::CommandsEnd {
                request_id: 7,
                total: 12,
                next: None,
            },
        ),
        (
            "a2h_accepted",
            AgentToHost::Accepted {
                request_id: 1001,
                execution: EXECUTION,
            },
        ),
        (
            "a2h_rejected",
            AgentToHost::Rejected {
                request_id: 1001,
                reason: Rejection::InvalidArgument {
                    index: 1,
                    problem: ArgProblem::OutOfRange,
                },
            },
        ),
        (
            "a2h_output",
            AgentToHost::Output {
                execution: EXECUTION,
                stream: Stream::Stdout,
                offset: 1 << 20,
                data: bulk,
            },
        ),
        (
            "a2h_exit",
            AgentToHost::Exit {
                execution: EXECUTION,
                finished: Finished {
                    outcome: Outcome::Exited(0),
                    duration_ms: 1_234,
                    stdout_bytes: 48_213,
                    stderr_bytes: 312,
                    truncated: false,
                },
            },
        ),
        (
            "a2h_status",
            AgentToHost::Status {
                request_id: 1002,
                execution: EXECUTION,
                state: ExecState::Running {
                    elapsed_ms: 812,
                    stdout_bytes: 20_480,
                    stderr_bytes: 0,
                },
            },
        ),
        (
            "a2h_push_result",
            AgentToHost::PushResult {
                push_id: 55,
                outcome: PushOutcome::Started(EXECUTION),
            },
        ),
        (
            "a2h_metrics",
            AgentToHost::Metrics {
                request_id: 1004,
                metrics: Metrics {
                    uptime_ms: 86_400_000,
                    load_milli: [120, 340, 410],
                    mem_total_kib: 2_097_152,
                    mem_available_kib: 1_536_000,
                    processes: 97,
                    agent_rss_kib: 2_300,
                    agent: AgentCounters {
                        frames_in: 10_412,
                        frames_out: 52_977,
                        output_bytes: 201_326_592,
                        executions: 311,
                        rejections: 4,
                        running: 1,
                        resets: 0,
                    },
                },
            },
        ),
        (
            "a2h_commands_changed",
            AgentToHost::CommandsChanged {
                config_revision: 43,
            },
        ),
        (
            "a2h_error",
            AgentToHost::Error(ProtocolError {
                code: ErrorCode::Undecodable,
                detail: "frame is not a valid message",
            }),
        ),
    ]
}

criterion_group! {
    name = benches;
    // Nanosecond-scale and steady: short runs and 20 000 bootstrap resamples (instead of
    // 100 000, which makes analysis and plots the slowest part) keep the 44 benches to about
    // two minutes on a small machine.
    config = Criterion::default()
        .nresamples(20_000)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = codec
}
criterion_main!(benches);
