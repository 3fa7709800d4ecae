//! The host and guest endpoints driven together: handshakes, restarts of either side, resets,
//! hostile header contents, and two real threads streaming through a small ring.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ring_protocol::layout::offsets;
use ring_protocol::message::{
    AgentToHost, Capabilities, ExecutionId, Hello, HostToAgent, PROTOCOL_VERSION, Stream,
};
use ring_protocol::ring::SendError;
use ring_protocol::{
    AttachError, ChannelError, GuestEndpoint, HeapRegion, HostEndpoint, RecvError, SharedMemory,
    Start, frame_buf,
};

const SIZE: usize = 64 * 1024;

fn hello(generation: u32, software: &str) -> Hello<'_> {
    Hello {
        min_version: 1,
        max_version: PROTOCOL_VERSION,
        capabilities: Capabilities::PUSH.union(Capabilities::METRICS),
        generation,
        config_revision: 0,
        software,
        reply: false,
    }
}

fn ping(nonce: u64) -> HostToAgent<'static> {
    HostToAgent::Ping { nonce }
}

#[test]
fn guest_waits_for_the_host_then_both_say_hello() {
    let mem = HeapRegion::new(SIZE);
    assert_eq!(
        GuestEndpoint::attach(&*mem, 7, Start::SkipPending, None).err(),
        Some(AttachError::NotReady),
        "a zeroed region (QEMU's initial state) is not ready"
    );
    let mut host = HostEndpoint::create(&*mem, 1).expect("valid size");
    let mut guest = GuestEndpoint::attach(&*mem, 7, Start::SkipPending, None).expect("ready");
    assert!(host.guest_attached(&*mem));
    assert_eq!(host.peer_generation(&*mem), 7);
    assert_eq!(guest.peer_generation(&*mem), 1);

    guest
        .send(&*mem, &AgentToHost::Hello(hello(7, "agent")))
        .expect("room");
    let mut buf = frame_buf();
    let Some(AgentToHost::Hello(h)) = host.recv(&*mem, &mut buf).expect("valid") else {
        panic!("expected hello");
    };
    assert_eq!(h.software, "agent");
    assert_eq!(h.negotiate(&hello(1, "host")), Some(PROTOCOL_VERSION));
    host.send(&*mem, &HostToAgent::Hello(hello(1, "host")))
        .expect("room");
    let mut buf = frame_buf();
    assert!(matches!(
        guest.recv(&*mem, &mut buf),
        Ok(Some(HostToAgent::Hello(_)))
    ));
}

#[test]
fn a_restarted_host_loses_nothing_the_guest_published() {
    let mem = HeapRegion::new(SIZE);
    let mut host = HostEndpoint::create(&*mem, 1).expect("valid");
    let mut guest = GuestEndpoint::attach(&*mem, 3, Start::SkipPending, None).expect("ready");
    let mut buf = frame_buf();
    // The old host reads one reply, then dies with three unread.
    for nonce in 0..4 {
        guest
            .send(&*mem, &AgentToHost::Pong { nonce })
            .expect("room");
    }
    assert_eq!(
        host.recv(&*mem, &mut buf),
        Ok(Some(AgentToHost::Pong { nonce: 0 }))
    );
    // The old host process is gone; its endpoint is never used again.

    let mut host = HostEndpoint::open(&*mem, 2).expect("resumes");
    assert!(
        host.guest_attached(&*mem),
        "the guest stays attached across a host restart"
    );
    assert_eq!(guest.peer_generation(&*mem), 2);
    for nonce in 1..4 {
        assert_eq!(
            host.recv(&*mem, &mut buf),
            Ok(Some(AgentToHost::Pong { nonce }))
        );
    }
    assert_eq!(host.recv(&*mem, &mut buf), Ok(None));
    // And the channel keeps working both ways.
    host.send(&*mem, &ping(9)).expect("room");
    assert_eq!(guest.check_session(&*mem), Ok(()));
    assert_eq!(guest.recv(&*mem, &mut buf), Ok(Some(ping(9))));
}

#[test]
fn frames_peeked_but_not_released_are_read_again_by_a_restarted_host() {
    let mem = HeapRegion::new(SIZE);
    let mut host = HostEndpoint::create(&*mem, 1).expect("valid");
    let mut guest = GuestEndpoint::attach(&*mem, 3, Start::SkipPending, None).expect("ready");
    let mut buf = frame_buf();
    for nonce in 0..4 {
        guest
            .send(&*mem, &AgentToHost::Pong { nonce })
            .expect("room");
    }
    let free = guest.tx_free(&*mem).expect("valid");
    // The host reads all four, makes the first two durable, and dies before the others.
    let mut after = Vec::new();
    for nonce in 0..4 {
        assert_eq!(
            host.peek(&*mem, &mut buf),
            Ok(Some(AgentToHost::Pong { nonce }))
        );
        after.push(host.read_index());
    }
    assert_eq!(host.peek(&*mem, &mut buf), Ok(None));
    assert!(!host.has_incoming(&*mem), "everything published was read");
    assert_eq!(
        guest.tx_free(&*mem).expect("valid"),
        free,
        "frames read but not released still take their space"
    );
    host.release(&*mem, after[1]);
    assert!(guest.tx_free(&*mem).expect("valid") > free);
    // Out-of-range releases change nothing: behind what was released, past what was read.
    host.release(&*mem, after[0]);
    host.release(&*mem, after[3].wrapping_add(64));
    let free_now = guest.tx_free(&*mem).expect("valid");

    let mut host = HostEndpoint::open(&*mem, 2).expect("resumes");
    assert_eq!(guest.tx_free(&*mem).expect("valid"), free_now);
    for nonce in 2..4 {
        assert_eq!(
            host.recv(&*mem, &mut buf),
            Ok(Some(AgentToHost::Pong { nonce })),
            "the frames not released come again, in order"
        );
    }
    assert_eq!(host.recv(&*mem, &mut buf), Ok(None));
    assert_eq!(guest.tx_free(&*mem).expect("valid"), free + 4 * 16);
}

#[test]
fn a_restarted_guest_chooses_whether_to_see_old_requests() {
    let mem = HeapRegion::new(SIZE);
    let mut host = HostEndpoint::create(&*mem, 1).expect("valid");
    let guest = GuestEndpoint::attach(&*mem, 1, Start::SkipPending, None).expect("ready");
    host.send(&*mem, &ping(1)).expect("room");
    host.send(&*mem, &ping(2)).expect("room");
    let _old_agent_is_gone = guest;
    let mut buf = frame_buf();
    let mut resumed = GuestEndpoint::attach(&*mem, 2, Start::Resume, None).expect("ready");
    assert_eq!(resumed.recv(&*mem, &mut buf), Ok(Some(ping(1))));
    let mut fresh = GuestEndpoint::attach(&*mem, 3, Start::SkipPending, None).expect("ready");
    assert_eq!(
        fresh.recv(&*mem, &mut buf),
        Ok(None),
        "requests for a predecessor are dropped"
    );
    host.send(&*mem, &ping(3)).expect("room");
    assert_eq!(fresh.recv(&*mem, &mut buf), Ok(Some(ping(3))));
}

#[test]
fn a_guest_that_finds_corruption_gets_fresh_rings() {
    let mem = HeapRegion::new(SIZE);
    let mut host = HostEndpoint::create(&*mem, 1).expect("valid");
    let mut guest = GuestEndpoint::attach(&*mem, 1, Start::SkipPending, None).expect("ready");
    let old_epoch = guest.epoch();
    // Something scribbles over the h2g producer index.
    mem.store(offsets::H2G_PROD, 0xdead_bee8, Relaxed);
    let mut buf = frame_buf();
    assert!(matches!(
        guest.recv(&*mem, &mut buf),
        Err(RecvError::Channel(ChannelError::Ring(_)))
    ));
    let refused = guest.request_reset(&*mem);
    assert_eq!(
        GuestEndpoint::attach(&*mem, 1, Start::SkipPending, Some(refused)).err(),
        Some(AttachError::NotReady),
        "the guest does not re-attach to the epoch it asked to reset"
    );
    assert!(host.reset_requested(&*mem));
    assert!(host.reset_requested(&*mem), "pending until carried out");
    host.begin_reset(&*mem);
    assert!(!host.reset_requested(&*mem), "this reset answers it");
    assert_eq!(host.send(&*mem, &ping(0)), Err(SendError::Detached));
    assert!(
        host.try_finish_reset(&*mem, false),
        "the guest has detached already"
    );
    assert!(host.take_kick(&*mem), "the guest is woken to attach again");
    let mut guest =
        GuestEndpoint::attach(&*mem, 1, Start::SkipPending, Some(refused)).expect("new epoch");
    assert_ne!(guest.epoch(), old_epoch);
    host.send(&*mem, &ping(5)).expect("room");
    assert_eq!(guest.recv(&*mem, &mut buf), Ok(Some(ping(5))));
}

#[test]
fn a_host_reset_waits_for_the_attached_guest_to_detach() {
    let mem = HeapRegion::new(SIZE);
    let mut host = HostEndpoint::create(&*mem, 1).expect("valid");
    let guest = GuestEndpoint::attach(&*mem, 1, Start::SkipPending, None).expect("ready");
    host.begin_reset(&*mem);
    assert!(!host.try_finish_reset(&*mem, false), "guest still attached");
    assert_eq!(guest.check_session(&*mem), Err(ChannelError::Detached));
    assert!(host.try_finish_reset(&*mem, false));
    let mut guest = GuestEndpoint::attach(&*mem, 1, Start::SkipPending, None).expect("ready");
    let mut buf = frame_buf();
    host.send(&*mem, &ping(1)).expect("room");
    assert_eq!(guest.recv(&*mem, &mut buf), Ok(Some(ping(1))));
    // A guest that never answers: the host gives up waiting and forces the reset.
    host.begin_reset(&*mem);
    assert!(host.try_finish_reset(&*mem, true));
    assert!(!host.guest_attached(&*mem));
}

#[test]
fn a_reset_request_made_while_no_host_runs_is_carried_out_by_the_next() {
    let mem = HeapRegion::new(SIZE);
    let _old_host = HostEndpoint::create(&*mem, 1).expect("valid");
    let guest = GuestEndpoint::attach(&*mem, 1, Start::SkipPending, None).expect("ready");
    let before = mem.load(offsets::HOST_DOORBELL, Relaxed);
    let refused = guest.request_reset(&*mem);
    assert_eq!(
        mem.load(offsets::HOST_DOORBELL, Relaxed),
        before.wrapping_add(1),
        "host rung"
    );
    // The host process died before it saw the request; a new one resumes.
    let mut host = HostEndpoint::resume(&*mem, 2).expect("header intact");
    assert!(host.reset_requested(&*mem));
    host.begin_reset(&*mem);
    assert!(host.try_finish_reset(&*mem, false));
    let guest = GuestEndpoint::attach(&*mem, 1, Start::SkipPending, Some(refused));
    assert!(guest.is_ok_and(|g| g.epoch() != refused));
}

#[test]
fn create_over_an_attached_guest_waits_for_it_to_detach() {
    let mem = HeapRegion::new(SIZE);
    let _old_host = HostEndpoint::create(&*mem, 1).expect("valid");
    let mut guest = GuestEndpoint::attach(&*mem, 1, Start::SkipPending, None).expect("ready");
    let old_epoch = guest.epoch();
    guest
        .send(&*mem, &AgentToHost::Pong { nonce: 1 })
        .expect("room");
    // A new host that starts from scratch while the guest is busy.
    let mut host = HostEndpoint::create(&*mem, 2).expect("valid");
    assert!(host.is_resetting(), "the guest is still attached");
    // The busy guest writes once more before it notices.
    let _ = guest.send(&*mem, &AgentToHost::Pong { nonce: 2 });
    assert!(!host.try_finish_reset(&*mem, false));
    assert_eq!(guest.check_session(&*mem), Err(ChannelError::Detached));
    assert!(host.try_finish_reset(&*mem, false));
    let mut guest = GuestEndpoint::attach(&*mem, 1, Start::SkipPending, None).expect("ready");
    assert_ne!(guest.epoch(), old_epoch);
    let mut buf = frame_buf();
    assert_eq!(
        host.recv(&*mem, &mut buf),
        Ok(None),
        "nothing stale is read as new"
    );
    guest
        .send(&*mem, &AgentToHost::Pong { nonce: 3 })
        .expect("room");
    assert_eq!(
        host.recv(&*mem, &mut buf),
        Ok(Some(AgentToHost::Pong { nonce: 3 }))
    );
}

#[test]
fn a_new_agent_releases_its_dead_predecessors_epoch() {
    let mem = HeapRegion::new(SIZE);
    let mut host = HostEndpoint::create(&*mem, 1).expect("valid");
    let _dead = GuestEndpoint::attach(&*mem, 1, Start::SkipPending, None).expect("ready");
    host.begin_reset(&*mem);
    assert!(
        !host.try_finish_reset(&*mem, false),
        "waits for the attached agent"
    );
    // The agent died attached; its successor tries to attach while the host resets.
    assert_eq!(
        GuestEndpoint::attach(&*mem, 2, Start::SkipPending, None).err(),
        Some(AttachError::NotReady)
    );
    assert!(host.try_finish_reset(&*mem, false), "no need to force");
    assert!(GuestEndpoint::attach(&*mem, 2, Start::SkipPending, None).is_ok());
}

#[test]
fn misaligned_indices_are_refused_at_attach() {
    let mem = HeapRegion::new(SIZE);
    let _host = HostEndpoint::create(&*mem, 1).expect("valid");
    mem.store(offsets::H2G_PROD, 4, Relaxed);
    mem.store(offsets::H2G_CONS, 4, Relaxed);
    assert!(matches!(
        GuestEndpoint::attach(&*mem, 1, Start::Resume, None),
        Err(AttachError::Corrupt { .. })
    ));
}

#[test]
fn undecodable_frames_are_reported_and_skipped() {
    let mem = HeapRegion::new(SIZE);
    let mut host = HostEndpoint::create(&*mem, 1).expect("valid");
    let mut guest = GuestEndpoint::attach(&*mem, 1, Start::SkipPending, None).expect("ready");
    host.send_frame(&*mem, &[0xff, 0xff, 0xff]).expect("room");
    host.send(&*mem, &ping(4)).expect("room");
    let mut buf = frame_buf();
    assert!(matches!(
        guest.recv(&*mem, &mut buf),
        Err(RecvError::Undecodable(_))
    ));
    assert_eq!(guest.recv(&*mem, &mut buf), Ok(Some(ping(4))));
}

#[test]
fn bad_headers_are_refused_with_a_reason() {
    let mem = HeapRegion::new(SIZE);
    let _host = HostEndpoint::create(&*mem, 1).expect("valid");
    let cases: [(usize, u32); 6] = [
        (offsets::VERSION, 2),
        (offsets::REGION_SIZE, 128 * 1024),
        (offsets::H2G_SIZE, 3 * 4096),
        (offsets::G2H_OFFSET, 100),
        (offsets::MAX_FRAME, 4096),
        (offsets::G2H_OFFSET, 16 * 1024),
    ];
    for (off, value) in cases {
        let before = mem.load(off, Relaxed);
        mem.store(off, value, Relaxed);
        assert!(
            matches!(
                GuestEndpoint::attach(&*mem, 1, Start::Resume, None),
                Err(AttachError::Layout(_))
            ),
            "word {off:#x} = {value:#x} accepted"
        );
        mem.store(off, before, Relaxed);
    }
    assert!(GuestEndpoint::attach(&*mem, 1, Start::Resume, None).is_ok());
}

/// Every header word set to hostile values while both sides run: errors, never panics.
#[test]
fn random_header_words_never_crash_either_side() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let interesting = [
        0,
        1,
        7,
        8,
        4096,
        0x7fff_fff8,
        0x8000_0000,
        u32::MAX,
        u32::MAX - 7,
    ];
    for _ in 0..2000 {
        let mem = HeapRegion::new(SIZE);
        let mut host = HostEndpoint::create(&*mem, 1).expect("valid");
        let mut guest = GuestEndpoint::attach(&*mem, 1, Start::Resume, None).expect("ready");
        let _ = host.send(&*mem, &ping(1));
        let _ = guest.send(&*mem, &AgentToHost::Pong { nonce: 1 });
        for _ in 0..4 {
            let r = next();
            let off = (r as usize % (offsets::END / 4)) * 4;
            let value = if r & 0x100 != 0 {
                interesting[(r >> 9) as usize % interesting.len()]
            } else {
                (r >> 32) as u32
            };
            mem.store(off, value, Relaxed);
        }
        let mut buf = frame_buf();
        for _ in 0..4 {
            let _ = host.recv(&*mem, &mut buf);
            let _ = guest.recv(&*mem, &mut buf);
            let _ = host.send(&*mem, &ping(2));
            let _ = guest.send(&*mem, &AgentToHost::Pong { nonce: 2 });
            let _ = guest.prepare_wait(&*mem, Some(64));
            let _ = host.prepare_wait(&*mem, None);
            let _ = guest.check_session(&*mem);
            let _ = host.take_kick(&*mem);
        }
        let _ = GuestEndpoint::attach(&*mem, 2, Start::Resume, None);
        let _ = HostEndpoint::resume(&*mem, 2);
    }
}

/// An eventfd stand-in for the threaded test.
#[derive(Default)]
struct Doorbell {
    count: Mutex<u64>,
    cv: Condvar,
}

impl Doorbell {
    fn ring(&self) {
        *self.count.lock().expect("not poisoned") += 1;
        self.cv.notify_one();
    }
    fn wait(&self, timeout: Duration) -> bool {
        let mut n = self.count.lock().expect("not poisoned");
        let deadline = Instant::now() + timeout;
        while *n == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = self.cv.wait_timeout(n, left).expect("not poisoned").0;
        }
        *n = 0;
        true
    }
}

/// The guest streams 64 MiB of output through the smallest region while the host reads it,
/// both sleeping on doorbells whenever they must wait: every byte arrives, in order, and no
/// side ever waits for a wakeup that never comes.
#[test]
fn streaming_with_backpressure_loses_nothing() {
    const TOTAL: u64 = 64 * 1024 * 1024;
    let mem = Arc::new(HeapRegion::new(SIZE));
    let mut host = HostEndpoint::create(&**mem, 1).expect("valid");
    let mut guest = GuestEndpoint::attach(&**mem, 1, Start::Resume, None).expect("ready");
    let host_bell = Arc::new(Doorbell::default());
    let guest_bell = Arc::new(Doorbell::default());
    let limit = Duration::from_secs(10);

    let (m, hb, gb) = (mem.clone(), host_bell.clone(), guest_bell.clone());
    let producer = thread::spawn(move || {
        let mut chunk = vec![0u8; 4000];
        let mut offset = 0u64;
        let mut sleeps = 0u64;
        while offset < TOTAL {
            let len = ((offset / 4000) % 4000 + 1) as usize;
            for (i, b) in chunk[..len].iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            let msg = AgentToHost::Output {
                execution: ExecutionId {
                    generation: 1,
                    counter: 1,
                },
                stream: Stream::Stdout,
                offset,
                data: &chunk[..len],
            };
            match guest.send(&*m, &msg) {
                Ok(()) => offset += len as u64,
                Err(SendError::Full { needed }) => {
                    if guest.prepare_wait(&*m, Some(needed)).expect("valid") {
                        sleeps += 1;
                        assert!(gb.wait(limit), "producer never woken: lost wakeup");
                    }
                    guest.end_wait(&*m);
                }
                Err(e) => panic!("{e}"),
            }
            if guest.take_kick(&*m) {
                hb.ring();
            }
        }
        sleeps
    });

    let mut buf = frame_buf();
    let mut received = 0u64;
    while received < TOTAL {
        match host.recv(&**mem, &mut buf).expect("valid") {
            Some(AgentToHost::Output { offset, data, .. }) => {
                assert_eq!(offset, received, "no gap, no repeat");
                for (i, b) in data.iter().enumerate() {
                    assert_eq!(*b, ((offset + i as u64) % 251) as u8);
                }
                received += data.len() as u64;
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => {
                if host.prepare_wait(&**mem, None).expect("valid") {
                    assert!(host_bell.wait(limit), "consumer never woken: lost wakeup");
                }
                host.end_wait(&**mem);
            }
        }
        if host.take_kick(&**mem) {
            guest_bell.ring();
        }
    }
    let sleeps = producer.join().expect("producer");
    assert!(
        sleeps > 0,
        "the ring never filled: backpressure was not exercised"
    );
    assert_eq!(host.recv(&**mem, &mut buf), Ok(None));
}
