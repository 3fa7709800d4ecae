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
    let mut h = Harness::start_vm(
        "vm-plain",
        &[
            "-append",
            "console=ttyS0 quiet agent_args=--wakeup,poll",
            "-device",
            "ivshmem-plain,memdev=m",
        ],
    );
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
