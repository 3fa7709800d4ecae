//! The records' disk through the daemon: a full disk refuses new executions with a 503 that
//! names the cause while reads, listings and the audit log keep working; a small VM quota
//! keeps a chatty VM within it, pruning its oldest executions.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::stack::Stack;
use serde_json::json;

/// Mounts a tmpfs of `size` at `dir` (root only); `false` when that is not possible.
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    // SAFETY: `geteuid` has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    std::fs::create_dir_all(dir).expect("dir");
    Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size},mode=0700"),
            "tmpfs",
        ])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

#[test]
fn a_full_disk_refuses_exec_and_keeps_reads_and_the_audit_log() {
    // On a small file system of its own when it can be mounted (as root): filled to below
    // the reserve by a file, as another program would. Otherwise the reserve is set above
    // what the disk has free.
    let mut s = Stack::new("disk-full", &["vm1"], "\n[records]\nmin_free = \"16M\"\n");
    let state = s.state_dir();
    let mounted = mount_tmpfs(&state, "48m");
    let _unmount = mounted.then(|| Unmount(&state));
    if !mounted {
        s.set_extra("\n[records]\nmin_free = \"1T\"\n");
    }
    s.start_daemon();
    s.start_agent("vm1");
    s.wait_ready("vm1", Duration::from_secs(15));
    let (status, body) = s.exec("vm1", "echo", &["before"]);
    if mounted {
        assert_eq!(status, 200, "{body}");
        let id = body["executions"][0]["id"].as_u64().expect("id");
        assert_eq!(s.wait(id, 10_000)["state"], "succeeded");
        // Another program fills the disk, leaving 8 MiB: less than the reserve.
        let free = free_bytes(&state);
        let filler = vec![0u8; 1 << 20];
        let mut f = std::fs::File::create(state.join("filler")).expect("filler");
        let mut left = free.saturating_sub(8 << 20);
        while left > 0 {
            let n = left.min(filler.len() as u64) as usize;
            std::io::Write::write_all(&mut f, &filler[..n]).expect("fill");
            left -= n as u64;
        }
        drop(f);
        std::thread::sleep(Duration::from_millis(300));
    }
    println!("state directory on a tmpfs of its own: {mounted}");
    let (status, body) = s.exec("vm1", "echo", &["after"]);
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().unwrap_or("");
    assert!(
        error.contains("records.min_free") && error.contains("free"),
        "{error}"
    );
    // Reading, listing and the audit log keep working (and the refusal is in the log).
    let (status, list) = s.call("GET", "/v1/executions", None);
    assert_eq!(status, 200, "{list}");
    if let Some(id) = list["executions"][0]["id"].as_u64() {
        let (status, _) = s.raw("GET", &format!("/v1/executions/{id}/output"));
        assert_eq!(status, 200);
    }
    let (status, vms) = s.call("GET", "/v1/vms", None);
    assert_eq!(status, 200, "{vms}");
    let (status, ping) = s.call("POST", "/v1/vms/vm1/ping", None);
    assert_eq!(status, 200, "{ping}");
    let (status, audit) = s.call("GET", "/v1/audit?action=exec&limit=5", None);
    assert_eq!(status, 200, "{audit}");
    assert!(
        audit["entries"]
            .as_array()
            .is_some_and(|e| e.iter().any(|a| a["target"] == "vm1:echo")),
        "{audit}"
    );
    if mounted {
        // Space comes back: exec works again.
        std::fs::remove_file(state.join("filler")).expect("unfill");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (status, body) = s.exec("vm1", "echo", &["again"]);
            if status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "still refused: {body}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn free_bytes(dir: &Path) -> u64 {
    host_shim::sys::free_bytes(dir).expect("statvfs")
}

#[test]
fn a_small_vm_quota_keeps_the_newest_output_and_prunes_the_oldest() {
    let mut s = Stack::new(
        "disk-quota",
        &["vm1"],
        "\n[records]\nvm_quota = \"2M\"\nprune_interval_s = 1\n",
    );
    s.start_daemon();
    s.start_agent("vm1");
    s.wait_ready("vm1", Duration::from_secs(15));
    // Twenty executions of 256 KiB each: 5 MiB for a quota of 2 MiB.
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (status, body) = s.call(
            "POST",
            "/v1/exec",
            Some(json!({"target": "vm1", "command": "bytes", "args": ["262144"]})),
        );
        assert_eq!(status, 200, "{body}");
        let id = body["executions"][0]["id"].as_u64().expect("id");
        let rec = s.wait(id, 20_000);
        assert!(
            matches!(rec["state"].as_str(), Some("failed" | "succeeded")),
            "{rec}"
        );
        ids.push(id);
        // Pruning runs every second; give it a chance between some of them.
        if ids.len() % 5 == 0 {
            std::thread::sleep(Duration::from_millis(1200));
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    let (_, list) = s.call("GET", "/v1/executions?vm=vm1&limit=100", None);
    let kept: Vec<u64> = list["executions"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|r| r["id"].as_u64())
        .collect();
    let last = *ids.last().expect("ids");
    assert!(kept.contains(&last), "the newest is kept: {kept:?}");
    assert!(!kept.contains(&ids[0]), "the oldest went: {kept:?}");
    let stored: u64 = list["executions"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["stdout"]["stored_len"].as_u64().unwrap_or(0))
        .sum();
    println!(
        "{} of 20 executions kept, {stored} bytes of output",
        kept.len()
    );
    assert!(
        stored <= 2 << 20,
        "{stored} bytes kept for a quota of 2 MiB"
    );
    // The newest was stored whole.
    let rec = s.wait(last, 1);
    assert_eq!(rec["stdout"]["stored_len"], 262_144, "{rec}");
}
