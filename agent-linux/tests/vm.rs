//! The agent in a real VM (QEMU, TCG): found on its ivshmem device, polling or woken by
//! VFIO interrupts. Needs a kernel and initramfs in `PORTLESS_VM_DIR`.

mod common;

use std::time::{Duration, Instant};

use common::{Event, Harness};
use ring_protocol::message::{HostToAgent, Outcome};

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
