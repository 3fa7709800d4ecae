//! Pins the wire format to PROTOCOL.md: every byte string here appears in the spec, and every
//! constant checked here is a number the spec gives. If one of these tests fails, either the
//! code changed the wire format (fix the code) or the spec is out of date (fix both).

use core::sync::atomic::Ordering::Relaxed;

use ring_protocol::frame::{FRAME_ALIGN, FRAME_HEADER_LEN, MAX_FRAME_LEN, MAX_PAYLOAD_LEN};
use ring_protocol::layout::{self, Layout, RingArea, offsets};
use ring_protocol::message::{
    self, AgentToHost, ArgProblem, Capabilities, ErrorCode, ExecRequest, ExecutionId, Finished,
    Hello, HostToAgent, Outcome, ProtocolError, Rejection, Stream,
};
use ring_protocol::{GuestEndpoint, HeapRegion, HostEndpoint, SharedMemory, Start};

const EXEC_1_2: ExecutionId = ExecutionId {
    generation: 1,
    counter: 2,
};

/// Encodes `msg`, compares with `expected`, decodes `expected` and compares with `msg`.
fn check_h2a(msg: &HostToAgent<'_>, expected: &[u8]) {
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    let got = message::encode(msg, &mut buf).expect("encodes");
    assert_eq!(&got[..], expected, "encoding of {msg:?}");
    let back: HostToAgent<'_> = message::decode(expected).expect("decodes");
    assert_eq!(&back, msg);
}

/// As [`check_h2a`], for the other direction.
fn check_a2h(msg: &AgentToHost<'_>, expected: &[u8]) {
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    let got = message::encode(msg, &mut buf).expect("encodes");
    assert_eq!(&got[..], expected, "encoding of {msg:?}");
    let back: AgentToHost<'_> = message::decode(expected).expect("decodes");
    assert_eq!(&back, msg);
}

// PROTOCOL.md section 8, example 1.
#[test]
fn ping() {
    check_h2a(&HostToAgent::Ping { nonce: 1 }, &[0x01, 0x01]);
}

// Example 2.
#[test]
fn exec_uname() {
    let msg = HostToAgent::Exec(ExecRequest {
        request_id: 7,
        command: "uname",
        args: heapless::Vec::new(),
        timeout_ms: None,
    });
    check_h2a(
        &msg,
        &[0x03, 0x07, 0x05, 0x75, 0x6e, 0x61, 0x6d, 0x65, 0x00, 0x00],
    );
}

// Example 3.
#[test]
fn accepted() {
    let msg = AgentToHost::Accepted {
        request_id: 7,
        execution: EXEC_1_2,
    };
    check_a2h(&msg, &[0x04, 0x07, 0x01, 0x02]);
}

// Example 4.
#[test]
fn output() {
    let msg = AgentToHost::Output {
        execution: EXEC_1_2,
        stream: Stream::Stdout,
        offset: 0,
        data: b"hi\n",
    };
    check_a2h(
        &msg,
        &[0x06, 0x01, 0x02, 0x00, 0x00, 0x03, 0x68, 0x69, 0x0a],
    );
}

// Example 6: multi-byte varints, a newtype struct, a string.
#[test]
fn host_hello() {
    let msg = HostToAgent::Hello(Hello {
        min_version: 1,
        max_version: 1,
        capabilities: Capabilities::INTERRUPTS,
        generation: 300,
        config_revision: 0,
        software: "host",
        reply: false,
    });
    check_h2a(
        &msg,
        &[
            0x00, 0x01, 0x01, 0x04, 0xac, 0x02, 0x00, 0x04, 0x68, 0x6f, 0x73, 0x74, 0x00,
        ],
    );
}

// Example 15: the agent's answer to a hello; the reply flag is the last byte.
#[test]
fn agent_hello_reply() {
    let msg = AgentToHost::Hello(Hello {
        min_version: 1,
        max_version: 1,
        capabilities: Capabilities::PUSH
            .union(Capabilities::METRICS)
            .union(Capabilities::CANCEL),
        generation: 7,
        config_revision: 2,
        software: "agent",
        reply: true,
    });
    check_a2h(
        &msg,
        &[
            0x00, 0x01, 0x01, 0x0b, 0x07, 0x02, 0x05, 0x61, 0x67, 0x65, 0x6e, 0x74, 0x01,
        ],
    );
}

// Example 7: exec with arguments and a timeout.
#[test]
fn exec_with_args() {
    let mut args = heapless::Vec::new();
    args.push("nginx").expect("room");
    args.push("5").expect("room");
    let msg = HostToAgent::Exec(ExecRequest {
        request_id: 8,
        command: "restart",
        args,
        timeout_ms: Some(30_000),
    });
    check_h2a(
        &msg,
        &[
            0x03, 0x08, 0x07, 0x72, 0x65, 0x73, 0x74, 0x61, 0x72, 0x74, 0x02, 0x05, 0x6e, 0x67,
            0x69, 0x6e, 0x78, 0x01, 0x35, 0x01, 0xb0, 0xea, 0x01,
        ],
    );
}

// Example 8: zigzag i32 inside a nested enum, a bool.
#[test]
fn exit() {
    let msg = AgentToHost::Exit {
        execution: EXEC_1_2,
        finished: Finished {
            outcome: Outcome::Exited(-1),
            duration_ms: 1500,
            stdout_bytes: 3,
            stderr_bytes: 0,
            truncated: false,
        },
    };
    check_a2h(
        &msg,
        &[0x07, 0x01, 0x02, 0x00, 0x01, 0xdc, 0x0b, 0x03, 0x00, 0x00],
    );
}

// Example 8b: `Ended` is `Exit` with a varint after it, under index 13.
#[test]
fn ended() {
    let msg = AgentToHost::Ended {
        execution: EXEC_1_2,
        finished: Finished {
            outcome: Outcome::Exited(0),
            duration_ms: 1500,
            stdout_bytes: 3,
            stderr_bytes: 0,
            truncated: false,
        },
        leftovers: 300,
    };
    check_a2h(
        &msg,
        &[
            0x0d, 0x01, 0x02, 0x00, 0x00, 0xdc, 0x0b, 0x03, 0x00, 0x00, 0xac, 0x02,
        ],
    );
}

// Example 9: a u8 field is one raw byte.
#[test]
fn rejected_invalid_argument() {
    let msg = AgentToHost::Rejected {
        request_id: 9,
        reason: Rejection::InvalidArgument {
            index: 2,
            problem: ArgProblem::OutOfRange,
        },
    };
    check_a2h(&msg, &[0x05, 0x09, 0x01, 0x02, 0x03]);
}

// Example 10: a fixed-size array has no length prefix.
#[test]
fn push_begin() {
    let msg = HostToAgent::PushBegin {
        push_id: 5,
        name: "a",
        size: 300,
        sha256: [0xaa; 32],
    };
    let mut expected = vec![0x06, 0x05, 0x01, 0x61, 0xac, 0x02];
    expected.extend_from_slice(&[0xaa; 32]);
    assert_eq!(expected.len(), 38);
    check_h2a(&msg, &expected);
}

// Example 11: Option::Some.
#[test]
fn commands_end() {
    let msg = AgentToHost::CommandsEnd {
        request_id: 1,
        total: 3,
        next: Some(2),
    };
    check_a2h(&msg, &[0x03, 0x01, 0x03, 0x01, 0x02]);
}

// Example 12: the same error kind has a different variant index in each direction.
#[test]
fn errors() {
    let err = ProtocolError {
        code: ErrorCode::Undecodable,
        detail: "",
    };
    check_h2a(&HostToAgent::Error(err), &[0x0a, 0x00, 0x00]);
    check_a2h(&AgentToHost::Error(err), &[0x0c, 0x00, 0x00]);
}

// Section 6: what a decoder refuses.
#[test]
fn malformed_payloads_are_refused() {
    // Trailing byte after a valid Ping.
    assert!(message::decode::<HostToAgent<'_>>(&[0x01, 0x01, 0x00]).is_err());
    // Truncated message.
    assert!(message::decode::<HostToAgent<'_>>(&[0x01]).is_err());
    // Empty payload.
    assert!(message::decode::<HostToAgent<'_>>(&[]).is_err());
    // Unknown variant index.
    assert!(message::decode::<HostToAgent<'_>>(&[0x0b]).is_err());
    assert!(message::decode::<AgentToHost<'_>>(&[0x0d]).is_err());
    // A bool that is neither 0 nor 1 (PushCommit.run = 2).
    assert!(message::decode::<HostToAgent<'_>>(&[0x08, 0x01, 0x02, 0x00]).is_err());
    assert!(message::decode::<HostToAgent<'_>>(&[0x08, 0x01, 0x01, 0x00]).is_ok());
    // An Option tag that is neither 0 nor 1 (PushCommit.timeout_ms = tag 2).
    assert!(message::decode::<HostToAgent<'_>>(&[0x08, 0x01, 0x00, 0x02, 0x05]).is_err());
    // A string that is not UTF-8 (Exec.command = [0xff]).
    assert!(message::decode::<HostToAgent<'_>>(&[0x03, 0x07, 0x01, 0xff, 0x00, 0x00]).is_err());
    // A varint that is not in its shortest form is accepted (Ping.nonce = 1 in two bytes).
    assert_eq!(
        message::decode::<HostToAgent<'_>>(&[0x01, 0x81, 0x00]),
        Ok(HostToAgent::Ping { nonce: 1 })
    );
    // A varint longer than its type allows (Ping.nonce with 11 bytes).
    let mut long = vec![0x01];
    long.extend_from_slice(&[0x80; 10]);
    long.push(0x00);
    assert!(message::decode::<HostToAgent<'_>>(&long).is_err());
}

#[test]
fn list_limits_are_enforced_by_the_decoder() {
    // Exec "x" with 16 empty arguments decodes; with 17 it does not.
    let exec = |n: u8| {
        let mut v = vec![0x03, 0x07, 0x01, b'x', n];
        v.extend(core::iter::repeat_n(0x00, usize::from(n)));
        v.push(0x00);
        v
    };
    assert_eq!(message::MAX_ARGS, 16);
    assert!(message::decode::<HostToAgent<'_>>(&exec(16)).is_ok());
    assert!(message::decode::<HostToAgent<'_>>(&exec(17)).is_err());
}

#[test]
fn version_negotiation() {
    let hello = |min_version, max_version| Hello {
        min_version,
        max_version,
        capabilities: Capabilities::default(),
        generation: 1,
        config_revision: 0,
        software: "",
        reply: false,
    };
    assert_eq!(hello(1, 3).negotiate(&hello(2, 5)), Some(3));
    assert_eq!(hello(2, 5).negotiate(&hello(1, 3)), Some(3));
    assert_eq!(hello(1, 1).negotiate(&hello(1, 1)), Some(1));
    assert_eq!(hello(1, 1).negotiate(&hello(2, 2)), None);
    assert_eq!(message::PROTOCOL_VERSION, 1);
    assert_eq!(message::MIN_PROTOCOL_VERSION, 1);
}

// Section 2 and 3: the header table and the constants.
#[test]
fn header_offsets_and_constants() {
    let table = [
        (offsets::MAGIC0, 0x000),
        (offsets::MAGIC1, 0x004),
        (offsets::VERSION, 0x008),
        (offsets::REGION_SIZE, 0x00c),
        (offsets::H2G_OFFSET, 0x010),
        (offsets::H2G_SIZE, 0x014),
        (offsets::G2H_OFFSET, 0x018),
        (offsets::G2H_SIZE, 0x01c),
        (offsets::MAX_FRAME, 0x020),
        (offsets::HOST_READY, 0x040),
        (offsets::EPOCH, 0x044),
        (offsets::HOST_GENERATION, 0x048),
        (offsets::HOST_HEARTBEAT, 0x04c),
        (offsets::HOST_RESET_ACK, 0x050),
        (offsets::GUEST_EPOCH, 0x080),
        (offsets::GUEST_GENERATION, 0x084),
        (offsets::GUEST_HEARTBEAT, 0x088),
        (offsets::GUEST_RESET_REQUEST, 0x08c),
        (offsets::H2G_PROD, 0x0c0),
        (offsets::H2G_CONS, 0x100),
        (offsets::G2H_PROD, 0x140),
        (offsets::G2H_CONS, 0x180),
        (offsets::H2G_SPACE_WANTED, 0x1c0),
        (offsets::G2H_DATA_WANTED, 0x1c4),
        (offsets::GUEST_DOORBELL, 0x1c8),
        (offsets::H2G_DATA_WANTED, 0x200),
        (offsets::G2H_SPACE_WANTED, 0x204),
        (offsets::HOST_DOORBELL, 0x208),
        (offsets::END, 0x240),
    ];
    for (code, spec) in table {
        assert_eq!(code, spec, "offset {spec:#x}");
    }

    assert_eq!(layout::MAGIC0, u32::from_le_bytes(*b"PORT"));
    assert_eq!(layout::MAGIC0, 0x5452_4f50);
    assert_eq!(layout::MAGIC1, u32::from_le_bytes(*b"LESS"));
    assert_eq!(layout::MAGIC1, 0x5353_454c);
    assert_eq!(layout::LAYOUT_VERSION, 1);
    assert_eq!(layout::CACHE_LINE, 64);
    assert_eq!(layout::HEADER_SIZE, 4096);
    assert_eq!(layout::MIN_REGION_SIZE, 64 * 1024);
    assert_eq!(layout::MAX_REGION_SIZE, 64 * 1024 * 1024);
    assert_eq!(layout::MIN_RING_SIZE, 16 * 1024);

    assert_eq!(FRAME_HEADER_LEN, 8);
    assert_eq!(FRAME_ALIGN, 8);
    assert_eq!(MAX_FRAME_LEN, 8192);
    assert_eq!(MAX_PAYLOAD_LEN, 8184);

    assert_eq!(message::MAX_ARGS, 16);
    assert_eq!(message::MAX_PARAMS, 8);
    assert_eq!(Capabilities::PUSH.0, 1);
    assert_eq!(Capabilities::METRICS.0, 2);
    assert_eq!(Capabilities::INTERRUPTS.0, 4);
    assert_eq!(Capabilities::CANCEL.0, 8);

    assert_eq!(
        Layout::for_region(64 * 1024),
        Ok(Layout {
            region_size: 0x1_0000,
            h2g: RingArea {
                offset: 0x4000,
                size: 0x4000
            },
            g2h: RingArea {
                offset: 0x8000,
                size: 0x8000
            },
        })
    );
}

// Section 8, examples 5 and 13: the header line 0 of a fresh 64 KiB region and the Ping frame.
#[test]
fn ping_frame_in_a_fresh_region() {
    let region = HeapRegion::new(64 * 1024);
    let mut host = HostEndpoint::create(&*region, 1).expect("valid region");

    let mut line0 = [0u8; 36];
    region.read(0, &mut line0);
    assert_eq!(
        line0,
        [
            0x50, 0x4f, 0x52, 0x54, 0x4c, 0x45, 0x53, 0x53, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x01, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00,
            0x00, 0x80, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00,
        ]
    );
    assert_eq!(region.load(offsets::HOST_READY, Relaxed), 1);
    assert_eq!(region.load(offsets::EPOCH, Relaxed), 1);
    assert_eq!(region.load(offsets::HOST_GENERATION, Relaxed), 1);
    assert_eq!(region.load(offsets::GUEST_EPOCH, Relaxed), 0);
    assert_eq!(region.load(offsets::HOST_RESET_ACK, Relaxed), 0);
    assert!(!host.is_resetting(), "no guest attached: ready at once");
    // Creating the region is a reset: its end rings the guest once.
    assert!(host.take_kick(&*region));
    assert_eq!(region.load(offsets::GUEST_DOORBELL, Relaxed), 1);

    host.send(&*region, &HostToAgent::Ping { nonce: 1 })
        .expect("room");
    let h2g = host.layout().h2g.offset as usize;
    assert_eq!(h2g, 0x4000);
    let mut frame = [0u8; 16];
    region.read(h2g, &mut frame);
    assert_eq!(
        frame,
        [
            0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00,
        ]
    );
    assert_eq!(region.load(offsets::H2G_PROD, Relaxed), 16);
    assert_eq!(region.load(offsets::H2G_CONS, Relaxed), 0);
    // No guest is waiting: the frame rings nobody.
    assert!(!host.take_kick(&*region));
    assert_eq!(region.load(offsets::GUEST_DOORBELL, Relaxed), 1);

    // A guest attaches, publishes its epoch and reads the frame back.
    let mut guest = GuestEndpoint::attach(&*region, 7, Start::Resume, None).expect("host is ready");
    assert_eq!(region.load(offsets::GUEST_EPOCH, Relaxed), 1);
    assert_eq!(region.load(offsets::GUEST_GENERATION, Relaxed), 7);
    let mut buf = ring_protocol::frame_buf();
    let got = guest.recv(&*region, &mut buf).expect("valid ring");
    assert_eq!(got, Some(HostToAgent::Ping { nonce: 1 }));
    assert_eq!(region.load(offsets::H2G_CONS, Relaxed), 16);
}

// Section 4: a consumer that waits is rung once, and the doorbell counter moves.
#[test]
fn doorbell_counter_moves_when_a_waiting_guest_is_rung() {
    let region = HeapRegion::new(64 * 1024);
    let mut host = HostEndpoint::create(&*region, 1).expect("valid region");
    assert!(
        host.take_kick(&*region),
        "the reset that creates the region rings"
    );
    let mut guest = GuestEndpoint::attach(&*region, 7, Start::Resume, None).expect("ready");
    assert_eq!(guest.prepare_wait(&*region, None), Ok(true));
    assert_eq!(region.load(offsets::H2G_DATA_WANTED, Relaxed), 1);

    host.send(&*region, &HostToAgent::Ping { nonce: 1 })
        .expect("room");
    host.send(&*region, &HostToAgent::Ping { nonce: 2 })
        .expect("room");
    assert!(host.take_kick(&*region), "first frame after the wait rings");
    assert!(!host.take_kick(&*region), "nothing new to ring for");
    assert_eq!(region.load(offsets::GUEST_DOORBELL, Relaxed), 2);
    assert_eq!(guest.doorbell(&*region), 2);

    guest.end_wait(&*region);
    assert_eq!(region.load(offsets::H2G_DATA_WANTED, Relaxed), 0);
    let mut buf = ring_protocol::frame_buf();
    assert!(matches!(
        guest.recv(&*region, &mut buf),
        Ok(Some(HostToAgent::Ping { nonce: 1 }))
    ));
}

// Sections 5.1 and 5.5: how the host picks epochs. Creating the region over an attached guest
// keeps the guest's epoch until it detaches; the next epoch skips 0 and the epoch the guest
// word names.
#[test]
fn epochs_chosen_by_create_and_reset() {
    use ring_protocol::ChannelError;

    // EPOCH is read whatever the region holds; next_epoch(0xFFFF_FFFF) = 1.
    let region = HeapRegion::new(64 * 1024);
    region.store(offsets::EPOCH, u32::MAX, Relaxed);
    let _host = HostEndpoint::create(&*region, 1).expect("valid region");
    assert_eq!(region.load(offsets::EPOCH, Relaxed), 1);
    assert_eq!(region.load(offsets::HOST_READY, Relaxed), 1);

    let guest = GuestEndpoint::attach(&*region, 7, Start::Resume, None).expect("ready");
    // A new host process creates the region while the guest is attached to epoch 1.
    let mut host = HostEndpoint::create(&*region, 2).expect("valid region");
    assert!(host.is_resetting(), "waits for the guest");
    assert_eq!(region.load(offsets::MAGIC0, Relaxed), layout::MAGIC0);
    assert_eq!(region.load(offsets::HOST_READY, Relaxed), 0);
    assert_eq!(
        region.load(offsets::EPOCH, Relaxed),
        1,
        "the guest's epoch, kept"
    );
    assert_eq!(region.load(offsets::GUEST_EPOCH, Relaxed), 1, "not zeroed");
    assert!(!host.try_finish_reset(&*region, false));
    assert_eq!(guest.check_session(&*region), Err(ChannelError::Detached));
    assert_eq!(region.load(offsets::GUEST_EPOCH, Relaxed), 0);
    assert!(host.try_finish_reset(&*region, false));
    assert_eq!(region.load(offsets::HOST_READY, Relaxed), 1);
    assert_eq!(region.load(offsets::EPOCH, Relaxed), 2);

    // A GUEST_EPOCH that is not the current epoch does not hold the reset up, and the new
    // epoch is never the one it names.
    host.begin_reset(&*region);
    region.store(offsets::GUEST_EPOCH, 3, Relaxed);
    assert!(host.try_finish_reset(&*region, false));
    assert_eq!(region.load(offsets::EPOCH, Relaxed), 4);
}

// Section 5.5: a reset request rings the host and stays pending, across host restarts, until
// a reset acknowledges it in HOST_RESET_ACK.
#[test]
fn reset_request_and_acknowledgement_words() {
    let region = HeapRegion::new(64 * 1024);
    let _old_host = HostEndpoint::create(&*region, 1).expect("valid region");
    let guest = GuestEndpoint::attach(&*region, 7, Start::Resume, None).expect("ready");
    assert_eq!(guest.request_reset(&*region), 1, "the epoch to refuse");
    assert_eq!(region.load(offsets::GUEST_EPOCH, Relaxed), 0);
    assert_eq!(region.load(offsets::GUEST_RESET_REQUEST, Relaxed), 1);
    assert_eq!(region.load(offsets::HOST_DOORBELL, Relaxed), 1);
    assert_eq!(region.load(offsets::HOST_RESET_ACK, Relaxed), 0);

    // The host that was running dies; the next one resumes and finds the request pending.
    let mut host = HostEndpoint::resume(&*region, 2).expect("header intact");
    assert!(host.reset_requested(&*region));
    host.begin_reset(&*region);
    assert_eq!(region.load(offsets::HOST_RESET_ACK, Relaxed), 1);
    assert_eq!(region.load(offsets::HOST_READY, Relaxed), 0);
    assert!(host.try_finish_reset(&*region, false));
    assert!(!host.reset_requested(&*region));
    assert_eq!(region.load(offsets::EPOCH, Relaxed), 2);
}

// Sections 1.4 and 5.2: at attach, every index must be a multiple of 8; the error names the
// epoch to refuse, and the guest has not attached.
#[test]
fn misaligned_indices_are_corruption_at_attach() {
    use ring_protocol::{AttachError, RingError};

    let region = HeapRegion::new(64 * 1024);
    let _host = HostEndpoint::create(&*region, 1).expect("valid region");
    // The fill level (0) is valid; the indices are not.
    region.store(offsets::G2H_PROD, 4, Relaxed);
    region.store(offsets::G2H_CONS, 4, Relaxed);
    assert_eq!(
        GuestEndpoint::attach(&*region, 7, Start::Resume, None).err(),
        Some(AttachError::Corrupt {
            error: RingError::BadIndices { prod: 4, cons: 4 },
            epoch: 1,
        })
    );
    assert_eq!(region.load(offsets::GUEST_EPOCH, Relaxed), 0);
    assert!(matches!(
        HostEndpoint::resume(&*region, 2),
        Err(AttachError::Corrupt { epoch: 1, .. })
    ));
}

// Section 3 and example 14: a header never wraps, a payload may; padding keeps the next frame
// 8-aligned.
#[test]
fn payload_wraps_around_the_end_of_the_data_area() {
    use ring_protocol::Direction;
    use ring_protocol::ring::{Consumer, Producer};

    let region = HeapRegion::new(64 * 1024);
    let layout = Layout::for_region(64 * 1024).expect("valid size");
    // Both indices at 0x3ff0: 16 bytes before the end of the 16 KiB h2g data area.
    region.store(offsets::H2G_PROD, 0x3ff0, Relaxed);
    region.store(offsets::H2G_CONS, 0x3ff0, Relaxed);
    let mut p = Producer::attach(&*region, &layout, Direction::HostToGuest).expect("valid");
    let payload: Vec<u8> = (1..=20).collect();
    let ring = p.try_send(&*region, &payload).expect("room");
    assert!(!ring, "nobody waits");
    assert_eq!(region.load(offsets::H2G_PROD, Relaxed), 0x4010);

    let area = layout.h2g.offset as usize;
    let mut tail = [0u8; 16];
    region.read(area + 0x3ff0, &mut tail);
    assert_eq!(
        tail,
        [
            0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06,
            0x07, 0x08,
        ]
    );
    let mut head = [0xffu8; 16];
    region.read(area, &mut head);
    assert_eq!(
        head,
        [
            0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x00, 0x00,
            0x00, 0x00,
        ]
    );

    let mut c =
        Consumer::attach(&*region, &layout, Direction::HostToGuest, Start::Resume).expect("valid");
    let mut buf = ring_protocol::frame_buf();
    let (got, _) = c
        .try_recv(&*region, &mut buf)
        .expect("valid")
        .expect("a frame");
    assert_eq!(got, &payload[..]);
    assert_eq!(region.load(offsets::H2G_CONS, Relaxed), 0x4010);
}

// Section 1 and 3: what counts as corruption.
#[test]
fn corrupt_rings_are_errors() {
    use ring_protocol::{ChannelError, RecvError, RingError};

    let region = HeapRegion::new(64 * 1024);
    let _host = HostEndpoint::create(&*region, 1).expect("valid region");
    let mut guest = GuestEndpoint::attach(&*region, 7, Start::Resume, None).expect("ready");
    let area = 0x4000;
    let mut buf = ring_protocol::frame_buf();
    let mut recv = |prod: u32, header: [u8; 8]| {
        region.write(area, &header);
        region.store(offsets::H2G_PROD, prod, Relaxed);
        match guest.recv(&*region, &mut buf) {
            Err(RecvError::Channel(ChannelError::Ring(e))) => Some(e),
            _ => None,
        }
    };
    let ok_header = [0x02, 0, 0, 0, 0, 0, 0, 0];
    // Fill level not a multiple of 8, or larger than the data area.
    assert!(matches!(
        recv(12, ok_header),
        Some(RingError::BadIndices { .. })
    ));
    assert!(matches!(
        recv(0x4008, ok_header),
        Some(RingError::BadIndices { .. })
    ));
    // Reserved word not zero.
    assert!(matches!(
        recv(16, [0x02, 0, 0, 0, 1, 0, 0, 0]),
        Some(RingError::Frame(_))
    ));
    // Length over 8184.
    assert!(matches!(
        recv(0x4000, [0xf9, 0x1f, 0, 0, 0, 0, 0, 0]),
        Some(RingError::Frame(_))
    ));
    // A frame that needs more bytes than are published (2-byte payload: 16 bytes needed).
    assert!(matches!(
        recv(8, ok_header),
        Some(RingError::Truncated {
            needed: 16,
            available: 8
        })
    ));
}
