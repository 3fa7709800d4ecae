//! The agent in a real VM (QEMU, TCG): found on its ivshmem device, polling or woken by
//! VFIO interrupts. Needs a kernel and initramfs in `PORTLESS_VM_DIR`.

mod common;

use std::time::{Duration, Instant};

use common::{Event, Harness};
use ring_protocol::message::{HostToAgent, Outcome, PushOutcome, Rejection};

#[test]
#[ignore = "boots a VM; needs PORTLESS_VM_DIR"]
fn plain_ivshmem_with_a_polling_agent() {
    let started = Instant::now();
    let mut h = Harness::start_vm_plain("vm-plain");
    let _gen = h.hello_within(Duration::from_secs(90));
    println!("hello after {:?}", started.elapsed());
    let run = h.run("uname", &[]);
    println!("uname: {}", String::from_utf8_lossy(&run.stdout));
    assert_eq!(run.outcome(), Outcome::Exited(0));
    let t = Instant::now();
    for n in 0..20 {
        h.send(&HostToAgent::Ping { nonce: n });
        h.wait_for(Duration::from_secs(10), |e| *e == Event::Pong(n));
    }
    println!("20 pings: {:?}", t.elapsed());
}

#[test]
#[ignore = "boots a VM; needs PORTLESS_VM_DIR"]
fn doorbell_ivshmem_with_vfio_interrupts() {
    let started = Instant::now();
    let mut h = Harness::start_vm_doorbell("vm-doorbell");
    let _gen = h.hello_within(Duration::from_secs(90));
    println!("hello after {:?}", started.elapsed());
    assert!(
        h.log().contains("vfio interrupts"),
        "agent log:\n{}",
        h.log()
    );
    let run = h.run("uname", &[]);
    assert_eq!(run.outcome(), Outcome::Exited(0));
    let t = Instant::now();
    for n in 0..20 {
        h.send(&HostToAgent::Ping { nonce: n });
        h.wait_for(Duration::from_secs(10), |e| *e == Event::Pong(n));
    }
    println!("20 pings: {:?}", t.elapsed());
    // Both directions by interrupt only: the agent sleeps in the kernel (its idle tick is a
    // second), the host sleeps on its eventfd until the guest rings it.
    std::thread::sleep(Duration::from_secs(2));
    for n in 100..103 {
        let t = Instant::now();
        h.send(&HostToAgent::Ping { nonce: n });
        assert!(
            h.wait_rung(Duration::from_secs(5)),
            "the guest never rang the host"
        );
        h.wait_for(Duration::from_secs(1), |e| *e == Event::Pong(n));
        let rtt = t.elapsed();
        println!("ping after idle, by interrupts both ways: {rtt:?}");
        assert!(
            rtt < Duration::from_millis(400),
            "woken by its tick, not the doorbell: {rtt:?}"
        );
        std::thread::sleep(Duration::from_millis(1500));
    }
}

/// Pushes `program` as `name` in chunks and commits it (run); the push result.
fn push(h: &mut Harness, push_id: u64, name: &str, program: &[u8], sha256: [u8; 32]) -> Event {
    h.send(&HostToAgent::PushBegin {
        push_id,
        name,
        size: program.len() as u64,
        sha256,
    });
    for (k, chunk) in program.chunks(3000).enumerate() {
        h.send(&HostToAgent::PushChunk {
            push_id,
            offset: (k * 3000) as u64,
            data: chunk,
        });
    }
    h.send(&HostToAgent::PushCommit {
        push_id,
        run: true,
        timeout_ms: Some(20_000),
    });
    h.wait_for(
        Duration::from_secs(30),
        |e| matches!(e, Event::PushResult { push_id: p, .. } if *p == push_id),
    )
}

#[test]
#[ignore = "boots a VM; needs PORTLESS_VM_DIR (cargo xtask test runs it)"]
fn a_pushed_program_with_a_bad_hash_is_refused_and_a_good_one_runs() {
    use sha2::{Digest, Sha256};
    let mut h = Harness::start_vm_doorbell("vm-push");
    let _gen = h.hello_within(Duration::from_secs(90));
    let script = format!(
        "#!/bin/sh\necho \"pushed and running on $(uname -n)\"\n# {}\nexit 0\n",
        "x".repeat(9000)
    );
    let hash: [u8; 32] = Sha256::digest(script.as_bytes()).into();

    let mut bad = hash;
    bad[0] ^= 1;
    let ev = push(&mut h, 1, "patch.sh", script.as_bytes(), bad);
    assert_eq!(
        ev,
        Event::PushResult {
            push_id: 1,
            outcome: PushOutcome::Failed(Rejection::HashMismatch)
        },
        "agent log:\n{}",
        h.log()
    );

    let ev = push(&mut h, 2, "patch.sh", script.as_bytes(), hash);
    let Event::PushResult {
        outcome: PushOutcome::Started(id),
        ..
    } = ev
    else {
        panic!("not started: {ev:?}\nagent log:\n{}", h.log());
    };
    let run = h.collect(id, Duration::from_secs(30));
    let out = String::from_utf8_lossy(&run.stdout);
    println!("pushed program: {}", out.trim_end());
    assert_eq!(
        run.outcome(),
        Outcome::Exited(0),
        "stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(out, "pushed and running on portless-guest\n");
}

/// Pushes and runs `script` (a shell script) with `timeout_ms`; the execution's id.
fn push_and_start(
    h: &mut Harness,
    push_id: u64,
    script: &str,
    timeout_ms: u32,
) -> ring_protocol::message::ExecutionId {
    use sha2::{Digest, Sha256};
    let name = format!("script-{push_id}.sh");
    let hash: [u8; 32] = Sha256::digest(script.as_bytes()).into();
    h.send(&HostToAgent::PushBegin {
        push_id,
        name: &name,
        size: script.len() as u64,
        sha256: hash,
    });
    h.send(&HostToAgent::PushChunk {
        push_id,
        offset: 0,
        data: script.as_bytes(),
    });
    h.send(&HostToAgent::PushCommit {
        push_id,
        run: true,
        timeout_ms: Some(timeout_ms),
    });
    match h.wait_for(
        Duration::from_secs(30),
        |e| matches!(e, Event::PushResult { push_id: p, .. } if *p == push_id),
    ) {
        Event::PushResult {
            outcome: PushOutcome::Started(id),
            ..
        } => id,
        other => panic!("not started: {other:?}\nagent log:\n{}", h.log()),
    }
}

#[test]
#[ignore = "boots a VM; needs PORTLESS_VM_DIR (cargo xtask test runs it)"]
fn a_real_guest_contains_executions_in_cgroups_and_runs_users_with_their_groups() {
    let mut h = Harness::start_vm_plain("vm-contain");
    let _gen = h.hello_within(Duration::from_secs(90));
    h.greet_reading_ended();
    assert!(
        h.log()
            .contains("containment: a cgroup per execution in /sys/fs/cgroup/portless-agent"),
        "agent log:\n{}",
        h.log()
    );

    // A user without a group: its primary group and its groups from /etc/group.
    let run = h.run("whoami", &[]);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "uid=65534(nobody) gid=65534(nogroup) groups=100(users),65534(nogroup)\n",
        "busybox id lists the groups as the kernel keeps them, sorted"
    );
    // The allow-list's limits are the cgroup's.
    let run = h.run("limits", &[]);
    assert_eq!(run.outcome(), Outcome::Exited(0), "{run:?}");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "memory.max 67108864\npids.max 16\ncpu.max 50000 100000\n"
    );

    // The next execution is given the same cgroup, idle since, without those limits.
    let id = push_and_start(
        &mut h,
        9,
        "#!/bin/sh\ncg=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)\n\
         cat $cg/memory.max $cg/pids.max $cg/cpu.max\n",
        20_000,
    );
    let run = h.collect(id, Duration::from_secs(30));
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "max\nmax\nmax 100000\n",
        "stderr: {}",
        String::from_utf8_lossy(&run.stderr)
    );

    // A child in a session of its own, left running and holding the output pipe: killed
    // at the end, which says so.
    let id = push_and_start(
        &mut h,
        1,
        "#!/bin/sh\nsetsid sleep 777 &\necho started\n",
        20_000,
    );
    let run = h.collect(id, Duration::from_secs(30));
    assert_eq!(run.outcome(), Outcome::Exited(0));
    assert_eq!(run.leftovers, Some(1));
    // Timed out, and cancelled: the escaped child goes with the execution.
    let id = push_and_start(
        &mut h,
        2,
        "#!/bin/sh\nsetsid sleep 778 >/dev/null 2>&1 &\nexec sleep 1000\n",
        1500,
    );
    assert_eq!(
        h.collect(id, Duration::from_secs(30)).outcome(),
        Outcome::TimedOut
    );
    let id = push_and_start(
        &mut h,
        3,
        "#!/bin/sh\nsetsid sleep 779 >/dev/null 2>&1 &\nexec sleep 1000\n",
        60_000,
    );
    std::thread::sleep(Duration::from_millis(500));
    h.send(&HostToAgent::Cancel {
        request_id: 77,
        execution: id,
    });
    assert_eq!(
        h.collect(id, Duration::from_secs(30)).outcome(),
        Outcome::Cancelled
    );
    let id = push_and_start(
        &mut h,
        4,
        "#!/bin/sh\necho \"left: $(ps | grep -c '[s]leep 77[789]')\"\n\
         grep -l 'populated 1' /sys/fs/cgroup/portless-agent/exec-*/cgroup.events | wc -l\n",
        20_000,
    );
    let run = h.collect(id, Duration::from_secs(30));
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "left: 0\n1\n",
        "only the checking script's cgroup holds processes"
    );
}
