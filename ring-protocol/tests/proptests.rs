//! Property tests: every message survives an encode/decode round trip whatever its field
//! values; arbitrary bytes never crash the decoder; and a ring driven by an arbitrary
//! interleaving of sends and receives, from any starting index (u32 wrap-around included),
//! behaves exactly like a FIFO queue with the ring's capacity.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;

use proptest::prelude::*;
use ring_protocol::frame::{MAX_PAYLOAD_LEN, frame_len};
use ring_protocol::layout::{Direction, Layout};
use ring_protocol::message::*;
use ring_protocol::ring::{Consumer, Producer, SendError, Start};
use ring_protocol::{HeapRegion, SharedMemory, frame_buf};

/// Raw material that messages borrow their strings and bytes from.
#[derive(Debug, Clone)]
struct Pool {
    words: Vec<String>,
    bytes: Vec<u8>,
    n: [u64; 6],
    i: [i64; 2],
    flag: bool,
    hash: [u8; 32],
}

fn pool() -> impl Strategy<Value = Pool> {
    (
        prop::collection::vec(any::<String>(), 1..=MAX_ARGS),
        prop::collection::vec(any::<u8>(), 0..4096),
        any::<[u64; 6]>(),
        any::<[i64; 2]>(),
        any::<bool>(),
        any::<[u8; 32]>(),
    )
        .prop_map(|(words, bytes, n, i, flag, hash)| Pool {
            words,
            bytes,
            n,
            i,
            flag,
            hash,
        })
}

#[allow(clippy::cast_possible_truncation)]
impl Pool {
    fn s(&self, k: usize) -> &str {
        &self.words[k % self.words.len()]
    }
    fn exec_id(&self) -> ExecutionId {
        ExecutionId {
            generation: self.n[0] as u32,
            counter: self.n[1] as u32,
        }
    }
    fn hello(&self) -> Hello<'_> {
        Hello {
            min_version: self.n[0] as u16,
            max_version: self.n[1] as u16,
            capabilities: Capabilities(self.n[2] as u32),
            generation: self.n[3] as u32,
            config_revision: self.n[4] as u32,
            software: self.s(0),
            reply: self.flag,
        }
    }
    fn rejection(&self) -> Rejection {
        let problems = [
            ArgProblem::Missing,
            ArgProblem::Unexpected,
            ArgProblem::NotInteger,
            ArgProblem::OutOfRange,
            ArgProblem::NotAChoice,
            ArgProblem::BadCharacter,
            ArgProblem::BadLength,
        ];
        let all = [
            Rejection::UnknownCommand,
            Rejection::InvalidArgument {
                index: self.n[2] as u8,
                problem: problems[self.n[3] as usize % problems.len()],
            },
            Rejection::Busy,
            Rejection::NotAllowed,
            Rejection::TooLarge,
            Rejection::HashMismatch,
            Rejection::UnknownExecution,
            Rejection::BadPush,
            Rejection::Failed,
        ];
        all[self.n[4] as usize % all.len()]
    }
    fn outcome(&self) -> Outcome {
        let all = [
            Outcome::Exited(self.i[0] as i32),
            Outcome::Signaled(self.i[1] as i32),
            Outcome::TimedOut,
            Outcome::Cancelled,
            Outcome::FailedToStart(self.i[0] as i32),
        ];
        all[self.n[5] as usize % all.len()]
    }
    fn finished(&self) -> Finished {
        Finished {
            outcome: self.outcome(),
            duration_ms: self.n[0],
            stdout_bytes: self.n[1],
            stderr_bytes: self.n[2],
            truncated: self.flag,
        }
    }
    fn args(&self) -> Args<'_> {
        self.words
            .iter()
            .map(String::as_str)
            .take(MAX_ARGS)
            .collect()
    }
    fn params(&self) -> heapless::Vec<ParamSpec<'_>, MAX_PARAMS> {
        let kinds = [
            ParamKind::Integer {
                min: self.i[0],
                max: self.i[1],
            },
            ParamKind::OneOf { choices: self.s(1) },
            ParamKind::Text {
                class: self.s(2),
                min_len: self.n[0] as u16,
                max_len: self.n[1] as u16,
            },
        ];
        (0..self.words.len().min(MAX_PARAMS))
            .map(|k| ParamSpec {
                name: self.s(k),
                kind: kinds[k % 3],
            })
            .collect()
    }

    fn host_messages(&self) -> Vec<HostToAgent<'_>> {
        vec![
            HostToAgent::Hello(self.hello()),
            HostToAgent::Ping { nonce: self.n[0] },
            HostToAgent::ListCommands {
                request_id: self.n[1],
                start: self.n[2] as u16,
                limit: self.n[3] as u16,
            },
            HostToAgent::Exec(ExecRequest {
                request_id: self.n[0],
                command: self.s(0),
                args: self.args(),
                timeout_ms: self.flag.then_some(self.n[1] as u32),
            }),
            HostToAgent::Status {
                request_id: self.n[2],
                execution: self.exec_id(),
            },
            HostToAgent::Cancel {
                request_id: self.n[3],
                execution: self.exec_id(),
            },
            HostToAgent::PushBegin {
                push_id: self.n[0],
                name: self.s(1),
                size: self.n[1],
                sha256: self.hash,
            },
            HostToAgent::PushChunk {
                push_id: self.n[0],
                offset: self.n[2],
                data: &self.bytes,
            },
            HostToAgent::PushCommit {
                push_id: self.n[0],
                run: self.flag,
                timeout_ms: (!self.flag).then_some(self.n[4] as u32),
            },
            HostToAgent::Metrics {
                request_id: self.n[5],
            },
            HostToAgent::Error(ProtocolError {
                code: ErrorCode::Unexpected,
                detail: self.s(2),
            }),
        ]
    }

    fn agent_messages(&self) -> Vec<AgentToHost<'_>> {
        let metrics = Metrics {
            uptime_ms: self.n[0],
            load_milli: [self.n[1] as u32, self.n[2] as u32, self.n[3] as u32],
            mem_total_kib: self.n[4],
            mem_available_kib: self.n[5],
            processes: self.n[0] as u32,
            agent_rss_kib: self.n[1],
            agent: AgentCounters {
                frames_in: self.n[0],
                frames_out: self.n[1],
                output_bytes: self.n[2],
                executions: self.n[3],
                rejections: self.n[4],
                running: self.n[5] as u32,
                resets: self.n[0] as u32,
            },
        };
        let states = [
            ExecState::Unknown,
            ExecState::Running {
                elapsed_ms: self.n[0],
                stdout_bytes: self.n[1],
                stderr_bytes: self.n[2],
            },
            ExecState::Finished(self.finished()),
        ];
        let pushes = [
            PushOutcome::Stored,
            PushOutcome::Started(self.exec_id()),
            PushOutcome::Failed(self.rejection()),
        ];
        let codes = [
            ErrorCode::Undecodable,
            ErrorCode::UnsupportedVersion,
            ErrorCode::Unexpected,
            ErrorCode::Internal,
        ];
        vec![
            AgentToHost::Hello(self.hello()),
            AgentToHost::Pong { nonce: self.n[1] },
            AgentToHost::Command {
                request_id: self.n[0],
                index: self.n[1] as u16,
                info: CommandInfo {
                    name: self.s(0),
                    description: self.s(1),
                    params: self.params(),
                    timeout_ms: self.n[2] as u32,
                    max_output: self.n[3],
                },
            },
            AgentToHost::CommandsEnd {
                request_id: self.n[0],
                total: self.n[1] as u16,
                next: self.flag.then_some(self.n[2] as u16),
            },
            AgentToHost::Accepted {
                request_id: self.n[0],
                execution: self.exec_id(),
            },
            AgentToHost::Rejected {
                request_id: self.n[1],
                reason: self.rejection(),
            },
            AgentToHost::Output {
                execution: self.exec_id(),
                stream: if self.flag {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                },
                offset: self.n[2],
                data: &self.bytes,
            },
            AgentToHost::Exit {
                execution: self.exec_id(),
                finished: self.finished(),
            },
            AgentToHost::Status {
                request_id: self.n[3],
                execution: self.exec_id(),
                state: states[self.n[4] as usize % 3],
            },
            AgentToHost::PushResult {
                push_id: self.n[5],
                outcome: pushes[self.n[0] as usize % 3],
            },
            AgentToHost::Metrics {
                request_id: self.n[1],
                metrics,
            },
            AgentToHost::CommandsChanged {
                config_revision: self.n[2] as u32,
            },
            AgentToHost::Error(ProtocolError {
                code: codes[self.n[3] as usize % 4],
                detail: self.s(3),
            }),
            AgentToHost::Ended {
                execution: self.exec_id(),
                finished: self.finished(),
                leftovers: self.n[4] as u32,
            },
        ]
    }
}

fn round_trip<'a, T>(msg: &T, buf: &'a mut [u8]) -> Option<T>
where
    T: serde::Serialize + serde::Deserialize<'a> + PartialEq + std::fmt::Debug,
{
    match encode(msg, buf) {
        Ok(bytes) => Some(decode::<T>(bytes).expect("what we encode decodes")),
        // Big pools can exceed one frame; that must be reported, not truncated.
        Err(ring_protocol::SendError::TooLarge) => None,
        Err(e) => panic!("encode failed: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(p in pool()) {
        for msg in p.host_messages() {
            let mut buf = frame_buf();
            if let Some(back) = round_trip(&msg, &mut buf) {
                prop_assert_eq!(back, msg);
            }
        }
        for msg in p.agent_messages() {
            let mut buf = frame_buf();
            if let Some(back) = round_trip(&msg, &mut buf) {
                prop_assert_eq!(back, msg);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_crash_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = frame_buf();
        if let Ok(msg) = decode::<HostToAgent<'_>>(&bytes) {
            let again = encode(&msg, &mut buf).expect("re-encodes");
            prop_assert_eq!(decode::<HostToAgent<'_>>(again).expect("decodes"), msg);
        }
        let mut buf = frame_buf();
        if let Ok(msg) = decode::<AgentToHost<'_>>(&bytes) {
            let again = encode(&msg, &mut buf).expect("re-encodes");
            prop_assert_eq!(decode::<AgentToHost<'_>>(again).expect("decodes"), msg);
        }
    }
}

/// One step of a ring interleaving.
#[derive(Debug, Clone)]
enum Op {
    Send(usize),
    Recv,
    /// Read the next frame without consuming it.
    Peek,
    /// Release the first `n` frames peeked (all of them when fewer are held).
    Release(usize),
    /// The consumer restarts from what it published (a host that died and resumed).
    Restart,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            3 => (0..=MAX_PAYLOAD_LEN).prop_map(Op::Send),
            1 => (0usize..64).prop_map(Op::Send),
            3 => Just(Op::Recv),
            2 => Just(Op::Peek),
            1 => (0usize..4).prop_map(Op::Release),
            1 => Just(Op::Restart),
        ],
        1..200,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn ring_is_a_fifo_with_fixed_capacity(
        start in prop_oneof![Just(u32::MAX - 8 * 1024 + 1), any::<u32>()],
        ops in ops(),
    ) {
        let start = start & !7;
        let mem = HeapRegion::new(64 * 1024);
        let layout = Layout::for_region(64 * 1024).expect("valid");
        let words = Direction::HostToGuest.words();
        mem.store(words.prod, start, Relaxed);
        mem.store(words.cons, start, Relaxed);
        let mut p = Producer::attach(&mem, &layout, Direction::HostToGuest).expect("attach");
        let mut c = Consumer::attach(&mem, &layout, Direction::HostToGuest, Start::Resume).expect("attach");
        let capacity = layout.h2g.size as usize;
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        // Frames peeked and not released, with the read index after each.
        let mut held: VecDeque<(Vec<u8>, u32)> = VecDeque::new();
        let mut used = 0usize;
        let mut buf = frame_buf();
        for (k, op) in ops.into_iter().enumerate() {
            match op {
                Op::Send(len) => {
                    let payload: Vec<u8> = (0..len).map(|i| (i * 31 + k) as u8).collect();
                    let need = frame_len(len);
                    match p.try_send(&mem, &payload) {
                        Ok(_) => {
                            prop_assert!(used + need <= capacity);
                            used += need;
                            model.push_back(payload);
                        }
                        Err(SendError::Full { needed }) => {
                            prop_assert_eq!(needed as usize, need);
                            prop_assert!(used + need > capacity, "refused with room");
                        }
                        Err(e) => prop_assert!(false, "unexpected {e}"),
                    }
                }
                Op::Recv => match c.try_recv(&mem, &mut buf).expect("valid ring") {
                    Some((got, _)) => {
                        let want = model.pop_front().expect("model has it");
                        prop_assert_eq!(got, &want[..]);
                        // Consuming a frame releases every frame peeked before it too.
                        used -= frame_len(want.len());
                        for (h, _) in held.drain(..) {
                            used -= frame_len(h.len());
                        }
                    }
                    None => prop_assert!(model.is_empty()),
                },
                Op::Peek => match c.try_peek(&mem, &mut buf).expect("valid ring") {
                    Some(got) => {
                        let want = model.pop_front().expect("model has it");
                        prop_assert_eq!(got, &want[..]);
                        held.push_back((want, c.read_index()));
                    }
                    None => prop_assert!(model.is_empty()),
                },
                Op::Release(n) => {
                    let n = n.min(held.len());
                    if n > 0 {
                        let upto = held[n - 1].1;
                        c.release(&mem, upto);
                        for (h, _) in held.drain(..n) {
                            used -= frame_len(h.len());
                        }
                    }
                    // Releasing again, or behind what was released, changes nothing.
                    let before = c.cons();
                    c.release(&mem, before);
                    c.release(&mem, before.wrapping_sub(8));
                    prop_assert_eq!(c.cons(), before);
                }
                Op::Restart => {
                    c = Consumer::attach(&mem, &layout, Direction::HostToGuest, Start::Resume)
                        .expect("attach");
                    // What was read but not released is read again, in order.
                    for (h, _) in held.drain(..).rev() {
                        model.push_front(h);
                    }
                }
            }
            prop_assert_eq!(c.read_index().wrapping_sub(c.cons()) as usize,
                held.iter().map(|(h, _)| frame_len(h.len())).sum::<usize>());
            prop_assert_eq!(p.free(&mem).expect("valid") as usize, capacity - used);
        }
        if let Some(&(_, upto)) = held.back() {
            c.release(&mem, upto);
        }
        while let Some(want) = model.pop_front() {
            let (got, _) = c.try_recv(&mem, &mut buf).expect("valid").expect("frame");
            prop_assert_eq!(got, &want[..]);
        }
        prop_assert_eq!(c.cons(), p.prod());
    }
}
