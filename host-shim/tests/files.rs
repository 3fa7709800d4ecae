//! The daemon's files: one daemon per state directory (a second refuses to start and leaves
//! the first one's socket alone), region files created private and never through a
//! symbolic link.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::stack::{Stack, portless_binary};

#[test]
fn a_second_daemon_on_one_state_directory_refuses_to_start() {
    let mut s = Stack::new("files-lock", &["vm1"], "");
    s.start_daemon();
    let out = Command::new(portless_binary())
        .arg("serve")
        .arg("--config")
        .arg(s.dir.join("host.toml"))
        .output()
        .expect("second daemon");
    assert!(!out.status.success(), "the second daemon started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another `portless serve`")
            && err.contains(&format!("pid {}", s.daemon_pid())),
        "{err}"
    );
    // The first one still serves on its socket.
    let (status, _) = s.call("GET", "/v1/vms", None);
    assert_eq!(status, 200);
    // Once it is gone (however it ended), the next one starts.
    s.kill_daemon();
    s.start_daemon();
    let (status, _) = s.call("GET", "/v1/vms", None);
    assert_eq!(status, 200);
}

#[test]
fn region_files_are_private_and_never_reached_through_a_link() {
    let mut s = Stack::new("files-region", &["vm1"], "");
    s.start_daemon();
    let mode = std::fs::metadata(s.region("vm1"))
        .expect("region")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    s.stop_daemon();

    // A region path that is a symbolic link (to a file someone else chose) is refused.
    let target = s.dir.join("elsewhere");
    std::fs::write(&target, b"").expect("target");
    std::fs::remove_file(s.region("vm1")).expect("remove");
    std::os::unix::fs::symlink(&target, s.region("vm1")).expect("symlink");
    let out = Command::new(portless_binary())
        .arg("serve")
        .arg("--config")
        .arg(s.dir.join("host.toml"))
        .output()
        .expect("daemon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a symbolic link"), "{err}");
    assert_eq!(std::fs::metadata(&target).expect("target").len(), 0);
}
