//! What the hostile-region targets do with an endpoint that attached to a region the fuzzer
//! filled: every operation of the channel, each one bounded, and the one promise that must
//! hold whatever the peer wrote: a host that forces a reset gets a working channel back.

use ring_protocol::layout::{self, Layout};
use ring_protocol::message::{AgentToHost, HostToAgent};
use ring_protocol::{
    Endpoint, GuestEndpoint, HostEndpoint, RecvError, Role, SendError, SharedMemory, Start,
    frame_buf,
};

/// Most frames one receive loop takes, so that a run stays short whatever the ring holds.
pub const MAX_RECV: usize = 64;

/// Receives up to `limit` frames, stopping at an empty ring or a channel error (an
/// undecodable frame is consumed, so the loop goes on past it). Returns the first error that
/// stopped it.
pub fn drain<R: Role>(
    ep: &mut Endpoint<R>,
    mem: &(impl SharedMemory + ?Sized),
    limit: usize,
) -> Option<RecvError> {
    let mut buf = frame_buf();
    for _ in 0..limit {
        match ep.recv(mem, &mut buf) {
            Ok(Some(_)) | Err(RecvError::Undecodable(_)) => {}
            Ok(None) => return None,
            Err(e) => return Some(e),
        }
    }
    None
}

/// The operations both ends have, in the order an event loop makes them.
pub fn poll<R: Role>(ep: &mut Endpoint<R>, mem: &(impl SharedMemory + ?Sized)) {
    let _ = ep.has_incoming(mem);
    let _ = ep.tx_free(mem);
    let _ = ep.doorbell(mem);
    let _ = ep.peer_heartbeat(mem);
    let _ = ep.peer_generation(mem);
    ep.beat(mem);
    let _ = ep.send_frame(mem, b"not a message");
    for tx_needed in [None, Some(64), Some(u32::MAX)] {
        let _ = ep.prepare_wait(mem, tx_needed);
        ep.end_wait(mem);
    }
    let _ = ep.take_kick(mem);
}

/// Everything a guest does with an attached endpoint, ending with a reset request.
pub fn guest(mem: &(impl SharedMemory + ?Sized), mut ep: GuestEndpoint) {
    let _ = drain(&mut ep, mem, MAX_RECV);
    let _ = ep.send(mem, &AgentToHost::Pong { nonce: 1 });
    poll(&mut ep, mem);
    let _ = ep.check_session(mem);
    let _ = ep.request_reset(mem);
}

/// Everything a host does with an endpoint on a hostile region, ending with a forced reset
/// after which the channel must work (see [`assert_recovers`]).
pub fn host(mem: &(impl SharedMemory + ?Sized), mut ep: HostEndpoint) {
    let _ = drain(&mut ep, mem, MAX_RECV);
    let _ = ep.send(mem, &HostToAgent::Ping { nonce: 1 });
    poll(&mut ep, mem);
    let _ = ep.guest_attached(mem);
    let _ = ep.reset_requested(mem);
    ep.begin_reset(mem);
    assert_eq!(
        ep.send(mem, &HostToAgent::Ping { nonce: 2 }),
        Err(SendError::Detached)
    );
    assert!(matches!(
        ep.recv(mem, &mut frame_buf()),
        Err(RecvError::Channel(ring_protocol::ChannelError::Detached))
    ));
    let _ = ep.try_finish_reset(mem, false);
    let _ = ep.take_kick(mem);
    assert_recovers(mem, &mut ep);
}

/// Whether the region's identity words (magic and layout) still say what `host` set up, so
/// that a guest can attach to it.
pub fn identity_intact(mem: &(impl SharedMemory + ?Sized), host: &HostEndpoint) -> bool {
    layout::read_magic(mem) && Layout::read(mem).as_ref() == Ok(host.layout())
}

/// Forces a reset and checks that the channel then works both ways, whatever state the
/// region was in: with no peer running, a forced reset always finishes, a guest attaches to
/// the new epoch and a ping and its pong go through. Returns the attached guest.
///
/// Does nothing if the region's identity words no longer match `host` (no guest could
/// attach; the host would [`create`](HostEndpoint::create) the region again).
///
/// # Panics
///
/// If the channel does not recover: that is a bug in ring-protocol.
pub fn assert_recovers(
    mem: &(impl SharedMemory + ?Sized),
    host: &mut HostEndpoint,
) -> Option<GuestEndpoint> {
    if !identity_intact(mem, host) {
        return None;
    }
    host.begin_reset(mem);
    assert!(
        host.try_finish_reset(mem, true),
        "a forced reset with no peer running finishes"
    );
    assert!(host.take_kick(mem), "a finished reset wakes the guest");
    let nonce = u64::from(host.epoch());
    host.send(mem, &HostToAgent::Ping { nonce })
        .expect("an empty ring after a reset takes a ping");
    let mut guest = GuestEndpoint::attach(mem, 2, Start::Resume, None)
        .expect("a guest attaches to the epoch a reset made ready");
    assert_eq!(guest.epoch(), host.epoch());
    assert!(host.guest_attached(mem));
    let mut buf = frame_buf();
    assert_eq!(
        guest.recv(mem, &mut buf),
        Ok(Some(HostToAgent::Ping { nonce }))
    );
    assert_eq!(guest.recv(mem, &mut buf), Ok(None));
    guest
        .send(mem, &AgentToHost::Pong { nonce })
        .expect("an empty ring after a reset takes a pong");
    assert_eq!(
        host.recv(mem, &mut buf),
        Ok(Some(AgentToHost::Pong { nonce }))
    );
    assert_eq!(host.recv(mem, &mut buf), Ok(None));
    Some(guest)
}
