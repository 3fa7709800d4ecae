//! A loom model of the sleep/notify race: one producer and one consumer on each ring, each
//! sleeping on an eventfd-like doorbell after arming its wait word, explored over every
//! interleaving (up to a preemption bound) and the weak-memory behaviours loom models. A lost
//! wakeup shows as a deadlock, which loom reports.
//!
//! The header words are loom atomics; the ring data is ordinary memory behind a mutex, so the
//! model checks the index and notification protocol (the subject here), not the payload
//! copies (covered by the Release/Acquire pairing on the indices and by the threaded tests).
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test --release -p ring-protocol --test loom`
//! (`cargo xtask test` does).
#![cfg(loom)]

use std::sync::atomic::Ordering;

use loom::sync::atomic::AtomicU32;
use loom::sync::{Arc, Condvar, Mutex};
use ring_protocol::layout::offsets;
use ring_protocol::message::{AgentToHost, HostToAgent};
use ring_protocol::ring::SendError;
use ring_protocol::{GuestEndpoint, HostEndpoint, SharedMemory, Start, frame_buf};

const REGION: usize = 64 * 1024;

/// Every header word the protocol uses, as a loom atomic; ring data as plain bytes.
struct LoomRegion {
    words: Vec<(usize, AtomicU32)>,
    data: std::sync::Mutex<Vec<u8>>,
}

impl LoomRegion {
    fn new() -> Self {
        let offsets = offsets::ALL;
        Self {
            words: offsets.iter().map(|&o| (o, AtomicU32::new(0))).collect(),
            data: std::sync::Mutex::new(vec![0; REGION]),
        }
    }

    fn word(&self, offset: usize) -> Option<&AtomicU32> {
        self.words
            .iter()
            .find(|(o, _)| *o == offset)
            .map(|(_, w)| w)
    }
}

impl SharedMemory for LoomRegion {
    fn len(&self) -> usize {
        REGION
    }
    fn load(&self, offset: usize, order: Ordering) -> u32 {
        // Ordering: as chosen by the code under test.
        self.word(offset).map_or(0, |w| w.load(order))
    }
    fn store(&self, offset: usize, value: u32, order: Ordering) {
        if let Some(w) = self.word(offset) {
            // Ordering: as chosen by the code under test.
            w.store(value, order);
        }
    }
    fn fence(&self, order: Ordering) {
        // Ordering: as chosen by the code under test; loom models SeqCst fences.
        loom::sync::atomic::fence(order);
    }
    fn read(&self, offset: usize, dst: &mut [u8]) {
        let data = self.data.lock().expect("not poisoned");
        dst.copy_from_slice(&data[offset..offset + dst.len()]);
    }
    fn write(&self, offset: usize, src: &[u8]) {
        let mut data = self.data.lock().expect("not poisoned");
        data[offset..offset + src.len()].copy_from_slice(src);
    }
}

/// An eventfd: a kick before the wait is not lost.
#[derive(Default)]
struct Doorbell {
    count: Mutex<u32>,
    cv: Condvar,
}

impl Doorbell {
    fn ring(&self) {
        *self.count.lock().expect("not poisoned") += 1;
        self.cv.notify_one();
    }
    fn wait(&self) {
        let mut n = self.count.lock().expect("not poisoned");
        while *n == 0 {
            n = self.cv.wait(n).expect("not poisoned");
        }
        *n = 0;
    }
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

fn connected() -> (Arc<LoomRegion>, HostEndpoint, GuestEndpoint) {
    let mem = Arc::new(LoomRegion::new());
    let host = HostEndpoint::create(&*mem, 1).expect("valid region");
    let guest = GuestEndpoint::attach(&*mem, 1, Start::Resume, None).expect("host ready");
    (mem, host, guest)
}

/// The host sends two requests; the guest drains them, sleeping whenever the ring is empty.
#[test]
fn consumer_never_misses_data() {
    model(|| {
        let (mem, mut host, mut guest) = connected();
        let guest_bell = Arc::new(Doorbell::default());
        let (m, bell) = (mem.clone(), guest_bell.clone());
        let producer = loom::thread::spawn(move || {
            for nonce in 0..2 {
                host.send(&*m, &HostToAgent::Ping { nonce }).expect("room");
                if host.take_kick(&*m) {
                    bell.ring();
                }
            }
        });
        let mut buf = frame_buf();
        let mut next = 0;
        while next < 2 {
            match guest.recv(&*mem, &mut buf).expect("valid ring") {
                Some(HostToAgent::Ping { nonce }) => {
                    assert_eq!(nonce, next);
                    next += 1;
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => {
                    if guest.prepare_wait(&*mem, None).expect("valid ring") {
                        guest_bell.wait();
                    }
                    guest.end_wait(&*mem);
                }
            }
        }
        producer.join().expect("producer");
    });
}

/// The guest fills the g2h ring and must wait for space; the host consumes slowly and sleeps
/// when the ring is empty. Neither may sleep forever.
#[test]
fn producer_never_misses_space() {
    model(|| {
        let (mem, mut host, mut guest) = connected();
        let host_bell = Arc::new(Doorbell::default());
        let guest_bell = Arc::new(Doorbell::default());
        // Frames this large fill the 32 KiB g2h ring with four.
        let payload = vec![0xA5u8; 8000];
        const FRAMES: u64 = 5;
        let (m, hb, gb) = (mem.clone(), host_bell.clone(), guest_bell.clone());
        let producer = loom::thread::spawn(move || {
            let mut sent = 0;
            while sent < FRAMES {
                let msg = AgentToHost::Output {
                    execution: ring_protocol::message::ExecutionId {
                        generation: 1,
                        counter: 1,
                    },
                    stream: ring_protocol::message::Stream::Stdout,
                    offset: sent,
                    data: &payload,
                };
                match guest.send(&*m, &msg) {
                    Ok(()) => sent += 1,
                    Err(SendError::Full { needed }) => {
                        if guest.prepare_wait(&*m, Some(needed)).expect("valid ring") {
                            // The host may have consumed already: ring for anything we owe.
                            if guest.take_kick(&*m) {
                                hb.ring();
                            }
                            gb.wait();
                        }
                        guest.end_wait(&*m);
                    }
                    Err(e) => panic!("{e}"),
                }
                if guest.take_kick(&*m) {
                    hb.ring();
                }
            }
        });
        let mut buf = frame_buf();
        let mut got = 0;
        while got < FRAMES {
            match host.recv(&*mem, &mut buf).expect("valid ring") {
                Some(AgentToHost::Output { offset, data, .. }) => {
                    assert_eq!(offset, got);
                    assert_eq!(data.len(), 8000);
                    got += 1;
                    if host.take_kick(&*mem) {
                        guest_bell.ring();
                    }
                }
                Some(other) => panic!("unexpected {other:?}"),
                None => {
                    if host.prepare_wait(&*mem, None).expect("valid ring") {
                        host_bell.wait();
                    }
                    host.end_wait(&*mem);
                }
            }
        }
        producer.join().expect("producer");
    });
}

/// A host reset racing with a guest attach: either the guest sees the host not ready, or the
/// host sees the guest attached and waits for it to detach; never both missed.
#[test]
fn reset_never_zeroes_under_an_attached_guest() {
    model(|| {
        let mem = Arc::new(LoomRegion::new());
        let mut host = HostEndpoint::create(&*mem, 1).expect("valid region");
        let m = mem.clone();
        let guest = loom::thread::spawn(move || {
            GuestEndpoint::attach(&*m, 1, Start::Resume, None)
                .ok()
                .map(|g| g.epoch())
        });
        host.begin_reset(&*mem);
        let finished = host.try_finish_reset(&*mem, false);
        let attached_epoch = guest.join().expect("guest");
        if let Some(epoch) = attached_epoch {
            // The guest attached to the old epoch: the host must not have finished the reset
            // under it, unless the guest had already attached... to the new one.
            assert!(
                !finished || epoch == host.epoch(),
                "reset finished under an attached guest"
            );
        }
    });
}
