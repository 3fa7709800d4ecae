//! Writes the seed corpus in `corpus/<target>/` from real encodings (messages encoded by
//! ring-protocol, regions set up and used by its endpoints, scripts encoded by
//! [`Op::encode`]), so that the fuzzer starts from inputs that get past the first checks.
//! Run it after changing the protocol or an input format:
//!
//! ```text
//! cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_seed_corpus
//! ```
//!
//! Seed names describe the seed; libFuzzer's own finds are named by a 40-digit hash and kept
//! out of git by the root `.gitignore`.

use std::path::Path;

use ring_protocol::frame;
use ring_protocol::layout::offsets;
use ring_protocol::message::{
    self, AgentCounters, ArgProblem, Capabilities, CommandInfo, ErrorCode, ExecRequest, ExecState,
    ExecutionId, Finished, Hello, Metrics, Outcome, ParamKind, ParamSpec, ProtocolError, Rejection,
    Stream,
};
use ring_protocol::{
    AgentToHost, GuestEndpoint, HeapRegion, HostEndpoint, HostToAgent, MAX_PAYLOAD_LEN,
    SharedMemory, Start, frame_buf,
};

use crate::image::{self, REGION_SIZE};
use crate::script::{Change, Op};

fn hello(software: &str, generation: u32, reply: bool) -> Hello<'_> {
    Hello {
        min_version: message::MIN_PROTOCOL_VERSION,
        max_version: message::PROTOCOL_VERSION,
        capabilities: Capabilities::PUSH.union(Capabilities::INTERRUPTS),
        generation,
        config_revision: 3,
        software,
        reply,
    }
}

fn exec_request() -> HostToAgent<'static> {
    let mut args = message::Args::new();
    for a in ["restart", "nginx"] {
        args.push(a).expect("two arguments fit");
    }
    HostToAgent::Exec(ExecRequest {
        request_id: 42,
        command: "service",
        args,
        timeout_ms: Some(5000),
    })
}

fn execution() -> ExecutionId {
    ExecutionId {
        generation: 7,
        counter: 1,
    }
}

fn host_msg(msg: &HostToAgent<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    message::encode(msg, &mut buf)
        .expect("a seed fits in a frame")
        .to_vec()
}

fn agent_msg(msg: &AgentToHost<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    message::encode(msg, &mut buf)
        .expect("a seed fits in a frame")
        .to_vec()
}

fn decode_frame_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ping = host_msg(&HostToAgent::Ping { nonce: 99 });
    let mut framed_ping = frame::encode_header(ping.len() as u32).to_vec();
    framed_ping.extend_from_slice(&ping);
    let command = AgentToHost::Command {
        request_id: 5,
        index: 0,
        info: CommandInfo {
            name: "service",
            description: "start, stop or restart a service",
            params: [
                ParamSpec {
                    name: "action",
                    kind: ParamKind::OneOf {
                        choices: "start|stop|restart",
                    },
                },
                ParamSpec {
                    name: "unit",
                    kind: ParamKind::Text {
                        class: "a-z0-9._-",
                        min_len: 1,
                        max_len: 64,
                    },
                },
                ParamSpec {
                    name: "retries",
                    kind: ParamKind::Integer { min: -1, max: 10 },
                },
            ]
            .into_iter()
            .collect(),
            timeout_ms: 30_000,
            max_output: 1 << 20,
        },
    };
    vec![
        (
            "hello-host",
            host_msg(&HostToAgent::Hello(hello("portless-host 0.1.0", 0, false))),
        ),
        (
            "hello-agent",
            agent_msg(&AgentToHost::Hello(hello("portless-agent 0.1.0", 7, true))),
        ),
        ("ping", ping),
        ("framed-ping", framed_ping),
        ("exec-request", host_msg(&exec_request())),
        (
            "list-commands",
            host_msg(&HostToAgent::ListCommands {
                request_id: 5,
                start: 0,
                limit: 16,
            }),
        ),
        ("command-listing", agent_msg(&command)),
        (
            "push-begin",
            host_msg(&HostToAgent::PushBegin {
                push_id: 3,
                name: "probe",
                size: 12,
                sha256: [0x5a; 32],
            }),
        ),
        (
            "push-chunk",
            host_msg(&HostToAgent::PushChunk {
                push_id: 3,
                offset: 0,
                data: b"#!/bin/sh\necho hi\n",
            }),
        ),
        (
            "output-stdout",
            agent_msg(&AgentToHost::Output {
                execution: execution(),
                stream: Stream::Stdout,
                offset: 0,
                data: b" 12:00:01 up 3 days\n",
            }),
        ),
        (
            "exit-code-1",
            agent_msg(&AgentToHost::Exit {
                execution: execution(),
                finished: Finished {
                    outcome: Outcome::Exited(1),
                    duration_ms: 1234,
                    stdout_bytes: 20,
                    stderr_bytes: 0,
                    truncated: false,
                },
            }),
        ),
        (
            "status-running",
            agent_msg(&AgentToHost::Status {
                request_id: 8,
                execution: execution(),
                state: ExecState::Running {
                    elapsed_ms: 500,
                    stdout_bytes: 1 << 40,
                    stderr_bytes: 0,
                },
            }),
        ),
        (
            "rejected-argument",
            agent_msg(&AgentToHost::Rejected {
                request_id: 42,
                reason: Rejection::InvalidArgument {
                    index: 1,
                    problem: ArgProblem::BadCharacter,
                },
            }),
        ),
        (
            "metrics-report",
            agent_msg(&AgentToHost::Metrics {
                request_id: 9,
                metrics: Metrics {
                    uptime_ms: 86_400_000,
                    load_milli: [120, 80, 40],
                    mem_total_kib: 2 << 20,
                    mem_available_kib: 1 << 20,
                    processes: 87,
                    agent_rss_kib: 900,
                    agent: AgentCounters {
                        frames_in: 10,
                        frames_out: 12,
                        ..AgentCounters::default()
                    },
                },
            }),
        ),
        (
            "protocol-error",
            host_msg(&HostToAgent::Error(ProtocolError {
                code: ErrorCode::Unexpected,
                detail: "exec before hello",
            })),
        ),
    ]
}

/// A region the host has created, with the guest attached.
fn attached_region() -> (HeapRegion, HostEndpoint, GuestEndpoint) {
    let region = HeapRegion::new(REGION_SIZE);
    let host = HostEndpoint::create(&*region, 1).expect("create");
    let guest = GuestEndpoint::attach(&*region, 7, Start::SkipPending, None).expect("attach");
    (region, host, guest)
}

fn hostile_region_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();

    let region = HeapRegion::new(REGION_SIZE);
    let mut host = HostEndpoint::create(&*region, 1).expect("create");
    seeds.push(("valid-region-created", image::capture(&*region)));
    host.send(
        &*region,
        &HostToAgent::Hello(hello("portless-host", 1, false)),
    )
    .expect("room");
    seeds.push(("valid-region-one-frame", image::capture(&*region)));

    let (region, mut host, mut guest) = attached_region();
    let mem = &*region;
    host.send(mem, &HostToAgent::Hello(hello("portless-host", 1, false)))
        .expect("room");
    host.send(mem, &exec_request()).expect("room");
    guest
        .send(mem, &AgentToHost::Hello(hello("portless-agent", 7, true)))
        .expect("room");
    guest
        .send(
            mem,
            &AgentToHost::Output {
                execution: execution(),
                stream: Stream::Stderr,
                offset: 0,
                data: b"restarting nginx\n",
            },
        )
        .expect("room");
    seeds.push(("valid-region-both-directions", image::capture(mem)));

    // Move the h2g indices close to the end of its data area, then send a frame that wraps.
    let (region, mut host, mut guest) = attached_region();
    let mem = &*region;
    let chunk = [0x42u8; 4000];
    let mut buf = frame_buf();
    for offset in 0..4 {
        host.send(
            mem,
            &HostToAgent::PushChunk {
                push_id: 1,
                offset: offset * 4000,
                data: &chunk,
            },
        )
        .expect("room");
        assert!(guest.recv(mem, &mut buf).expect("valid").is_some());
    }
    host.send(
        mem,
        &HostToAgent::PushChunk {
            push_id: 1,
            offset: 16000,
            data: &chunk[..1000],
        },
    )
    .expect("room");
    let wrapped = image::capture(mem);
    let cons = mem.load(offsets::H2G_CONS, core::sync::atomic::Ordering::Relaxed);
    let size = image::default_layout().h2g.size;
    assert!(cons % size + 1016 > size, "the last frame wraps");
    seeds.push(("valid-region-wrapped-frame", wrapped));

    let (region, mut host, guest) = attached_region();
    let mem = &*region;
    host.send(mem, &HostToAgent::Ping { nonce: 1 })
        .expect("room");
    let _ = guest.request_reset(mem);
    assert!(host.reset_requested(mem));
    host.begin_reset(mem);
    seeds.push(("region-resetting", image::capture(mem)));

    seeds
}

fn script(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        op.encode(&mut out);
    }
    out
}

fn hostile_region_script_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ping_pong = [
        Op::HostSend(1),
        Op::TakeKicks,
        Op::GuestRecv(8),
        Op::GuestSend(1),
        Op::TakeKicks,
        Op::HostRecv(8),
    ];
    // Output of 60 * 128 bytes: four fill the g2h ring.
    let big_output = 2 | (60 << 2);
    // A long session touching every operation once, so that libFuzzer, which starts its
    // length limit at the longest seed, tries long scripts from the start.
    let mut long_session = ping_pong.to_vec();
    for (i, word) in [
        offsets::H2G_PROD,
        offsets::G2H_CONS,
        offsets::H2G_DATA_WANTED,
        offsets::G2H_SPACE_WANTED,
        offsets::EPOCH,
    ]
    .into_iter()
    .enumerate()
    {
        let after = u8::try_from(i * 3).expect("small");
        long_session.extend([
            Op::GuestSend(big_output),
            Op::GuestSend(big_output),
            Op::GuestPrepareWait(8192),
            Op::HostSend(1 | (u8::try_from(i).expect("small") << 2)),
            Op::HostPrepareWait(0),
            Op::Interfere {
                after,
                word: Op::word(word),
                change: Change::Add(8),
            },
            Op::HostRecv(2),
            Op::GuestRecv(2),
            Op::TakeKicks,
            Op::EndWaits,
            Op::Poll,
            Op::GuestCheckSession,
            Op::HostSendFrame(vec![0x0c; 12]),
            Op::GuestRecv(8),
            Op::HostRecv(8),
        ]);
        if i % 2 == 1 {
            long_session.extend([
                Op::GuestRequestReset,
                Op::Poll,
                Op::HostFinishReset { force: false },
                Op::GuestAttach(Start::SkipPending),
            ]);
        } else {
            long_session.extend([Op::HostRestart, Op::GuestAttach(Start::Resume)]);
        }
    }
    long_session.extend([Op::HostCreate, Op::GuestAttach(Start::Resume), Op::Heal]);
    vec![
        ("long-session", script(&long_session)),
        ("ping-pong", script(&ping_pong)),
        (
            "reset-handshake",
            script(&[
                Op::HostSend(0),
                Op::GuestRequestReset,
                Op::Poll,
                Op::GuestCheckSession,
                Op::HostFinishReset { force: false },
                Op::TakeKicks,
                Op::GuestAttach(Start::SkipPending),
                Op::HostSend(0),
                Op::GuestSend(0),
                Op::GuestRecv(8),
                Op::HostRecv(8),
            ]),
        ),
        (
            "wait-and-wake",
            script(&[
                Op::GuestPrepareWait(0),
                Op::HostSend(1),
                Op::TakeKicks,
                Op::EndWaits,
                Op::GuestRecv(8),
                Op::GuestSend(big_output),
                Op::GuestSend(big_output),
                Op::GuestSend(big_output),
                Op::GuestSend(big_output),
                Op::GuestSend(big_output),
                Op::GuestPrepareWait(8192),
                Op::HostRecv(1),
                Op::TakeKicks,
                Op::EndWaits,
                Op::GuestSend(big_output),
                Op::HostRecv(64),
            ]),
        ),
        (
            "host-restart-resume",
            script(&[
                Op::GuestSend(big_output),
                Op::GuestSend(3),
                Op::HostRestart,
                Op::HostRecv(8),
                Op::HostSend(2),
                Op::GuestRecv(8),
            ]),
        ),
        (
            "corrupt-producer-index",
            script(&[
                Op::HostSend(1),
                Op::Poke {
                    word: Op::word(offsets::H2G_PROD),
                    change: Change::Add(4),
                },
                Op::GuestRecv(8),
                Op::Poll,
                Op::HostFinishReset { force: true },
                Op::GuestAttach(Start::Resume),
                Op::Heal,
            ]),
        ),
        (
            "corrupt-frame-header",
            script(&[
                Op::HostSend(1),
                Op::PokeBytes {
                    offset: u16::try_from(image::default_layout().h2g.offset)
                        .expect("in the first 64 KiB"),
                    bytes: vec![0xff; 8],
                },
                Op::GuestRecv(8),
            ]),
        ),
        (
            "interfere-during-recv",
            script(&[
                Op::HostSend(1),
                Op::HostSend(5),
                Op::Interfere {
                    after: 1,
                    word: Op::word(offsets::H2G_PROD),
                    change: Change::Set(0x10_0000),
                },
                Op::GuestRecv(8),
            ]),
        ),
        (
            "interfere-during-attach",
            script(&[
                Op::HostSend(1),
                Op::Interfere {
                    after: 5,
                    word: Op::word(offsets::HOST_READY),
                    change: Change::Set(0),
                },
                Op::GuestAttach(Start::Resume),
                Op::GuestRecv(8),
            ]),
        ),
        (
            "undecodable-frames",
            script(&[
                Op::HostSendFrame(vec![0xff; 16]),
                Op::GuestSendFrame(b"\x0c\x00garbage".to_vec()),
                Op::GuestRecv(8),
                Op::HostRecv(8),
            ]),
        ),
    ]
}

fn write(target: &str, seeds: &[(&str, Vec<u8>)]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("create the corpus directory");
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).expect("write a seed");
    }
}

#[test]
#[ignore = "writes the seed corpus into the source tree"]
fn write_seed_corpus() {
    write("decode_frame", &decode_frame_seeds());
    write("hostile_region", &hostile_region_seeds());
    write("hostile_region_script", &hostile_region_script_seeds());
    write("host_driver", &host_driver_seeds());
}

/// Scripts for `host_driver` (see `crate::driver` for the opcodes).
fn host_driver_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const ATTACH: u8 = 0;
    const ANSWER: u8 = 1;
    const SEND: u8 = 2;
    const GARBAGE: u8 = 3;
    const OUTPUT: u8 = 4;
    const BEAT: u8 = 5;
    const RESET: u8 = 6;
    const POKE: u8 = 7;
    const EXEC: u8 = 8;
    const PING: u8 = 9;
    const METRICS: u8 = 10;
    const COMMANDS: u8 = 11;
    const CANCEL: u8 = 12;
    const PUSH: u8 = 13;
    const WITHDRAW: u8 = 14;
    const WAIT: u8 = 15;
    let greet = vec![ATTACH, 3, ANSWER, 0, 31, BEAT, ANSWER, 0, 31, WAIT, 5];
    let mut honest = greet.clone();
    honest.extend([
        EXEC, 0, ANSWER, 0, 31, OUTPUT, 20, 8, SEND, 7, 0, 0, 0, PING, ANSWER, 0, 8,
    ]);
    honest.extend([
        METRICS, ANSWER, 0, 8, COMMANDS, BEAT, WAIT, 30, EXEC, 2, ANSWER, 0, 8,
    ]);
    honest.extend([
        CANCEL, 1, ANSWER, 0, 8, PUSH, 40, 1, ANSWER, 0, 31, WAIT, 100,
    ]);
    let mut hello_flood = greet.clone();
    for _ in 0..40 {
        hello_flood.extend([SEND, 0, 0, 0, 0]);
    }
    let mut mismatched = greet.clone();
    for _ in 0..8 {
        mismatched.extend([EXEC, 0, PING, ANSWER, 1, 8, BEAT]);
    }
    let mut silent = greet.clone();
    for _ in 0..12 {
        silent.extend([EXEC, 2, PING, ANSWER, 3, 8, BEAT, WAIT, 20]);
    }
    let mut reuse = greet.clone();
    for _ in 0..6 {
        reuse.extend([EXEC, 0, ANSWER, 2, 8]);
    }
    let mut output_flood = greet.clone();
    output_flood.extend([EXEC, 0, ANSWER, 0, 8]);
    for _ in 0..12 {
        output_flood.extend([OUTPUT, 255, 1, BEAT]);
    }
    output_flood.extend([OUTPUT, 40, 63, SEND, 6, 1, 0, 200]);
    let mut listing_flood = vec![ATTACH, 3, ANSWER, 0, 0];
    for _ in 0..20 {
        listing_flood.extend([SEND, 2, 0, 0, 1]);
    }
    let mut pushes = greet.clone();
    pushes.extend([
        PUSH, 255, 1, PUSH, 30, 0, WITHDRAW, 1, ANSWER, 0, 31, WAIT, 90,
    ]);
    pushes.extend([ANSWER, 0, 31, PUSH, 10, 1, WITHDRAW, 3, ANSWER, 0, 31]);
    let mut corrupt = greet.clone();
    corrupt.extend([
        EXEC, 0, POKE, 2, 0, 0, 1, 0, GARBAGE, 40, 0xff, RESET, WAIT, 60,
    ]);
    corrupt.extend([ATTACH, 5, ANSWER, 0, 31, EXEC, 0, ANSWER, 0, 31]);
    vec![
        ("honest-session", honest),
        ("hello-flood", hello_flood),
        ("mismatched-replies", mismatched),
        ("silent-guest", silent),
        ("reused-ids", reuse),
        ("output-flood", output_flood),
        ("listing-flood", listing_flood),
        ("pushes-and-withdrawals", pushes),
        ("corrupt-and-reattach", corrupt),
    ]
}

#[test]
fn host_driver_seeds_and_random_scripts_keep_the_invariants() {
    for (_, bytes) in host_driver_seeds() {
        crate::driver::run(&bytes);
    }
    // Inputs the fuzzer found, kept in the corpus as regressions.
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/host_driver");
    for entry in std::fs::read_dir(&corpus).expect("corpus") {
        let path = entry.expect("entry").path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("regression-"))
        {
            crate::driver::run(&std::fs::read(&path).expect("input"));
        }
    }
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..100 {
        let script: Vec<u8> = (0..300)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        crate::driver::run(&script);
    }
}

#[test]
fn message_seeds_decode() {
    for (name, bytes) in decode_frame_seeds() {
        let as_host = message::decode::<HostToAgent<'_>>(&bytes).is_ok();
        let as_agent = message::decode::<AgentToHost<'_>>(&bytes).is_ok();
        assert!(as_host || as_agent || name == "framed-ping", "{name}");
    }
}

#[test]
fn region_seeds_attach() {
    for (name, bytes) in hostile_region_seeds() {
        let region = HeapRegion::new(REGION_SIZE);
        image::load(&*region, &bytes);
        let attached = GuestEndpoint::attach(&*region, 9, Start::Resume, None);
        assert_eq!(attached.is_ok(), name != "region-resetting", "{name}");
    }
}

#[test]
fn script_seeds_run() {
    for (_, bytes) in hostile_region_script_seeds() {
        crate::script::World::new().run_script(&bytes);
    }
}

/// Runs the input named by `FUZZ_INPUT` through `host_driver` (with `FUZZ_TRACE=1`, step by
/// step).
#[test]
#[ignore]
fn trace_one() {
    let path = std::env::var("FUZZ_INPUT").expect("FUZZ_INPUT");
    crate::driver::run(&std::fs::read(path).expect("input"));
}
