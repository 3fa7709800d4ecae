//! An idle daemon with fifty `doorbell` VMs uses no measurable CPU: its drivers sleep until
//! rung. A test binary of its own, so that this process's CPU time is the daemon's alone.

mod common;

use std::path::PathBuf;
use std::time::Duration;

#[test]
fn an_idle_daemon_with_fifty_doorbell_vms_uses_no_measurable_cpu() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("daemon-idle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mut text = format!(
        "[daemon]\nsocket = \"{0}/portless.sock\"\nstate_dir = \"{0}/state\"\n",
        dir.display()
    );
    for n in 0..50 {
        text.push_str(&format!(
            "\n[[vm]]\nname = \"vm{n}\"\nchannel = \"doorbell\"\nsocket = \"{}/vm{n}.sock\"\nsize = \"64K\"\n",
            dir.display()
        ));
    }
    let config = host_shim::config::HostConfig::parse(&text, "host.toml").expect("valid");
    let daemon = common::InProcessDaemon::start_on(config);
    std::thread::sleep(Duration::from_millis(500));
    let before = common::cpu_time();
    std::thread::sleep(Duration::from_secs(3));
    let used = common::cpu_time() - before;
    drop(daemon);
    println!("50 idle doorbell VMs: {used:?} of CPU in 3 s");
    assert!(
        used < Duration::from_millis(60),
        "idle daemon used {used:?} of CPU in 3 s"
    );
}
