//! `portless-agent --shm-file` against a test host over a real shared file, with real
//! processes: exit codes, signals, large output with nothing lost, concurrent executions,
//! timeouts, cancellation, config reload, restarts.

mod common;

use std::time::Duration;

use common::{CONFIG, Event, Harness};
use ring_protocol::message::{ArgProblem, HostToAgent, Outcome, Rejection, Stream};

#[test]
fn exit_codes_signals_and_stderr() {
    let mut h = Harness::start("exit-codes", CONFIG);
    h.hello();
    let run = h.run("true", &[]);
    assert_eq!(run.outcome(), Outcome::Exited(0));
    let run = h.run("fail", &[]);
    assert_eq!(run.outcome(), Outcome::Exited(3));
    assert_eq!(run.stderr, b"failing\n");
    assert!(run.stdout.is_empty());
    let run = h.run("killed", &[]);
    assert_eq!(run.outcome(), Outcome::Signaled(9));
    let run = h.run("nothere", &[]);
    assert_eq!(run.outcome(), Outcome::FailedToStart(libc::ENOENT));
}

#[test]
fn requests_outside_the_allow_list_are_rejected() {
    let mut h = Harness::start("rejections", CONFIG);
    h.hello();
    assert_eq!(
        h.exec("rm", &["-rf", "/"], None),
        Err(Rejection::UnknownCommand)
    );
    assert_eq!(
        h.exec("sleep", &["1; reboot"], None),
        Err(Rejection::InvalidArgument {
            index: 0,
            problem: ArgProblem::NotInteger
        })
    );
    assert_eq!(
        h.exec("sleep", &["0"], None),
        Err(Rejection::InvalidArgument {
            index: 0,
            problem: ArgProblem::OutOfRange
        })
    );
    assert_eq!(
        h.exec("sleep", &[], None),
        Err(Rejection::InvalidArgument {
            index: 0,
            problem: ArgProblem::Missing
        })
    );
}

#[test]
fn a_clean_environment_and_the_configured_directory() {
    let mut h = Harness::start("environment", CONFIG);
    h.hello();
    let run = h.run("env", &[]);
    assert_eq!(run.outcome(), Outcome::Exited(0));
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "ONLY=this\n",
        "nothing inherited"
    );
}

#[test]
fn large_output_arrives_byte_for_byte() {
    let mut h = Harness::start("large-output", CONFIG);
    h.hello();
    let count = 2_000_000;
    let run = h.run("seq", &[&count.to_string()]);
    assert_eq!(run.outcome(), Outcome::Exited(0));
    let mut expected = String::new();
    for i in 1..=count {
        expected.push_str(&i.to_string());
        expected.push('\n');
    }
    assert_eq!(run.stdout.len(), expected.len());
    assert!(run.stdout == expected.as_bytes(), "output differs");
}

#[test]
fn output_over_the_limit_is_counted_but_not_sent() {
    let mut h = Harness::start("output-limit", CONFIG);
    h.hello();
    let run = h.run("seq-capped", &[]);
    let finished = run.finished.expect("finished");
    assert_eq!(
        finished.outcome,
        Outcome::Exited(0),
        "the process was not blocked or killed"
    );
    assert!(finished.truncated);
    assert_eq!(run.stdout.len(), 1000);
    let full: usize = (1..=100_000).map(|i: u32| i.to_string().len() + 1).sum();
    assert_eq!(finished.stdout_bytes, full as u64);
}

#[test]
fn concurrent_executions_all_finish() {
    let mut h = Harness::start("concurrent", CONFIG);
    h.hello();
    let ids: Vec<_> = (0..6)
        .map(|k| {
            h.exec("seq", &[&(10_000 * (k + 1)).to_string()], None)
                .expect("accepted")
        })
        .collect();
    for (k, id) in ids.into_iter().enumerate() {
        let run = h.collect(id, Duration::from_secs(60));
        assert_eq!(run.outcome(), Outcome::Exited(0));
        let lines = run.stdout.iter().filter(|b| **b == b'\n').count();
        assert_eq!(lines, 10_000 * (k + 1));
    }
}

#[test]
fn timeouts_kill_the_whole_group_even_if_it_ignores_term() {
    let mut h = Harness::start("timeouts", CONFIG);
    h.hello();
    // A request can shorten the command's timeout.
    let id = h.exec("sleep", &["30"], Some(300)).expect("accepted");
    let run = h.collect(id, Duration::from_secs(10));
    assert_eq!(run.outcome(), Outcome::TimedOut);
    let ms = run.finished.expect("finished").duration_ms;
    assert!((300..5000).contains(&ms), "took {ms} ms");
    // TERM is ignored: KILL follows after the grace period.
    let id = h.exec("stubborn", &[], None).expect("accepted");
    let run = h.collect(id, Duration::from_secs(10));
    assert_eq!(run.outcome(), Outcome::TimedOut);
    assert_eq!(run.stdout, b"ready\n");
    let ms = run.finished.expect("finished").duration_ms;
    assert!(ms >= 300 + 500, "killed before the grace period: {ms} ms");
}

#[test]
fn cancel_stops_an_execution() {
    let mut h = Harness::start("cancel", CONFIG);
    h.hello();
    let id = h.exec("sleep", &["30"], None).expect("accepted");
    let request_id = h.request_id();
    h.send(&HostToAgent::Cancel {
        request_id,
        execution: id,
    });
    let run = h.collect(id, Duration::from_secs(10));
    assert_eq!(run.outcome(), Outcome::Cancelled);
}

#[test]
fn config_reload_applies_good_configs_and_keeps_the_old_one_on_errors() {
    let mut h = Harness::start("reload", CONFIG);
    h.hello();
    let extended = format!(
        "{CONFIG}\n[[command]]\nname = \"echo\"\nprogram = \"/bin/echo\"\nargs = [\"reloaded\"]\n"
    );
    common::write_config(&h.config, &extended);
    h.signal(libc::SIGHUP);
    let ev = h.wait_for(Duration::from_secs(10), |e| {
        matches!(e, Event::CommandsChanged(_))
    });
    assert_eq!(ev, Event::CommandsChanged(2));
    let run = h.run("echo", &[]);
    assert_eq!(run.stdout, b"reloaded\n");
    // A broken file: reported, and the last good allow-list stays in force.
    common::write_config(
        &h.config,
        "[[command]]\nname = \"x\"\nprogram = \"relative\"\n",
    );
    h.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !h.log().contains("not reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload error logged:\n{}",
            h.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        h.log().contains("line 3"),
        "the error names the line:\n{}",
        h.log()
    );
    let run = h.run("echo", &[]);
    assert_eq!(run.stdout, b"reloaded\n");
}

#[test]
fn a_restarted_agent_greets_with_a_new_generation_and_stops_cleanly() {
    let mut h = Harness::start("restart", CONFIG);
    let first = h.hello();
    let id = h.exec("sleep", &["30"], None).expect("accepted");
    let status = h.stop_agent();
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");
    h.spawn_agent();
    let second = h.hello();
    assert_ne!(
        first, second,
        "execution ids of the new agent cannot collide"
    );
    assert_ne!(id.generation, second);
    h.send(&HostToAgent::Ping { nonce: 42 });
    h.wait_for(Duration::from_secs(10), |e| *e == Event::Pong(42));
}

#[test]
fn stderr_and_stdout_are_kept_apart() {
    let config = format!(
        "{CONFIG}\n[[command]]\nname = \"both\"\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"echo out; echo err >&2; echo out2\"]\n"
    );
    let mut h = Harness::start("streams", &config);
    h.hello();
    let run = h.run("both", &[]);
    assert_eq!(run.stdout, b"out\nout2\n");
    assert_eq!(run.stderr, b"err\n");
    let _ = Stream::Stdout;
}

/// Pushes `program` as `name` and commits it; returns the push result.
fn push(
    h: &mut Harness,
    push_id: u64,
    name: &str,
    program: &[u8],
    hash: [u8; 32],
    run: bool,
) -> Event {
    h.send(&HostToAgent::PushBegin {
        push_id,
        name,
        size: program.len() as u64,
        sha256: hash,
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
        run,
        timeout_ms: Some(10_000),
    });
    h.wait_for(
        Duration::from_secs(10),
        |e| matches!(e, Event::PushResult { push_id: p, .. } if *p == push_id),
    )
}

fn push_config(dir: &std::path::Path) -> String {
    format!(
        "[push]\nenabled = true\nmax_bytes = 100000\ndir = \"{}\"\n{CONFIG}",
        dir.join("pushed").display()
    )
}

#[test]
fn pushed_programs_are_checked_stored_and_run() {
    use ring_protocol::message::PushOutcome;
    use sha2::{Digest, Sha256};
    let dir = common::scratch_dir("push-config");
    let mut h = Harness::start("push", &push_config(&dir));
    h.hello();
    let script = format!(
        "#!/bin/sh\necho pushed and running\n# {}\nexit 7\n",
        "x".repeat(9000)
    );
    let hash: [u8; 32] = Sha256::digest(script.as_bytes()).into();

    // A wrong hash is refused and nothing is left behind.
    let mut bad = hash;
    bad[0] ^= 1;
    let ev = push(&mut h, 1, "patch.sh", script.as_bytes(), bad, false);
    assert_eq!(
        ev,
        Event::PushResult {
            push_id: 1,
            outcome: PushOutcome::Failed(Rejection::HashMismatch)
        }
    );
    assert!(!dir.join("pushed/patch.sh").exists());

    // Stored, with owner-only permissions.
    let ev = push(&mut h, 2, "patch.sh", script.as_bytes(), hash, false);
    assert_eq!(
        ev,
        Event::PushResult {
            push_id: 2,
            outcome: PushOutcome::Stored
        }
    );
    let stored = std::fs::read(dir.join("pushed/patch.sh")).expect("stored");
    assert_eq!(stored, script.as_bytes());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("pushed/patch.sh"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);

    // Stored and run: reported like any execution.
    let ev = push(&mut h, 3, "patch.sh", script.as_bytes(), hash, true);
    let Event::PushResult {
        outcome: PushOutcome::Started(id),
        ..
    } = ev
    else {
        panic!("{ev:?}")
    };
    let run = h.collect(id, Duration::from_secs(10));
    assert_eq!(run.outcome(), Outcome::Exited(7));
    assert_eq!(run.stdout, b"pushed and running\n");

    // Limits.
    let big = vec![b'#'; 100_001];
    let ev = push(&mut h, 4, "big", &big, hash, false);
    assert_eq!(
        ev,
        Event::PushResult {
            push_id: 4,
            outcome: PushOutcome::Failed(Rejection::TooLarge)
        }
    );
    let ev = push(&mut h, 5, "../escape", b"x", hash, false);
    assert_eq!(
        ev,
        Event::PushResult {
            push_id: 5,
            outcome: PushOutcome::Failed(Rejection::BadPush)
        }
    );
}

#[test]
fn a_push_never_writes_through_what_another_user_left_in_its_directory() {
    use ring_protocol::message::PushOutcome;
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::{PermissionsExt, symlink};
    let dir = common::scratch_dir("push-staging-dir");
    let pushed = dir.join("pushed");
    std::fs::create_dir(&pushed).expect("push dir");
    std::fs::set_permissions(&pushed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    // Another file of the agent's user, hard-linked at the staging name.
    let victim = dir.join("victim");
    std::fs::write(&victim, "precious").expect("victim");
    std::fs::hard_link(&victim, pushed.join(".patch.sh.partial")).expect("link");
    let mut h = Harness::start("push-staging", &push_config(&dir));
    h.hello();
    let script = b"#!/bin/sh\necho new\n";
    let hash: [u8; 32] = Sha256::digest(script).into();
    let ev = push(&mut h, 1, "patch.sh", script, hash, false);
    assert_eq!(
        ev,
        Event::PushResult {
            push_id: 1,
            outcome: PushOutcome::Stored
        }
    );
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
    assert_eq!(
        std::fs::read(pushed.join("patch.sh")).expect("stored"),
        script
    );

    // A push directory others can write to, or a link to one, is refused.
    std::fs::set_permissions(&pushed, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let ev = push(&mut h, 2, "patch.sh", script, hash, false);
    assert_eq!(
        ev,
        Event::PushResult {
            push_id: 2,
            outcome: PushOutcome::Failed(Rejection::Failed)
        }
    );
    std::fs::set_permissions(&pushed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let elsewhere = dir.join("elsewhere");
    std::fs::rename(&pushed, &elsewhere).expect("move");
    symlink(&elsewhere, &pushed).expect("symlink");
    let ev = push(&mut h, 3, "other.sh", script, hash, false);
    assert_eq!(
        ev,
        Event::PushResult {
            push_id: 3,
            outcome: PushOutcome::Failed(Rejection::Failed)
        }
    );
    assert!(!elsewhere.join("other.sh").exists());
}

#[test]
fn pushes_are_refused_unless_enabled() {
    use ring_protocol::message::PushOutcome;
    let mut h = Harness::start("push-disabled", CONFIG);
    h.hello();
    let ev = push(&mut h, 1, "patch.sh", b"#!/bin/sh\n", [0; 32], true);
    assert_eq!(
        ev,
        Event::PushResult {
            push_id: 1,
            outcome: PushOutcome::Failed(Rejection::NotAllowed)
        }
    );
}

/// The agent's zombie children, if any.
fn zombies_of(pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next());
        if state == Some("Z") && ppid == Some(&pid.to_string()) {
            found.push(stat);
        }
    }
    found
}

#[test]
fn the_steady_state_allocates_nothing_and_leaves_no_zombie() {
    let dir = common::scratch_dir("steady-config");
    let mut h = Harness::start("steady", &push_config(&dir));
    steady_state(&mut h);
}

#[test]
fn the_steady_state_allocates_nothing_with_a_cgroup_per_execution_either() {
    let Some(cgroup) = common::test_cgroup("steady") else {
        return;
    };
    let dir = common::scratch_dir("steady-cgroup-config");
    let mut h = Harness::start_in_cgroup("steady-cgroup", &push_config(&dir), &cgroup);
    steady_state(&mut h);
    assert!(h.stop_agent().success());
    std::fs::remove_dir(&cgroup).expect("the agent removed its cgroups");
}

/// Runs a workload of every kind of request four times: the agent's heap allocations after
/// the first round and after the last must be the same, and it must leave no zombie.
fn steady_state(h: &mut Harness) {
    h.hello();
    let workload = |h: &mut Harness, round: u64| {
        for k in 0..3 {
            let run = h.run("seq", &["50000"]);
            assert_eq!(run.outcome(), Outcome::Exited(0));
            let _ = h.run("fail", &[]);
            let _ = h.exec("rm", &[], None);
            let id = h.exec("sleep", &["30"], None).expect("accepted");
            let request_id = h.request_id();
            h.send(&HostToAgent::Status {
                request_id,
                execution: id,
            });
            h.send(&HostToAgent::Cancel {
                request_id,
                execution: id,
            });
            let _ = h.collect(id, Duration::from_secs(10));
            h.send(&HostToAgent::Ping {
                nonce: round * 10 + k,
            });
            h.send(&HostToAgent::Metrics { request_id });
            h.send(&HostToAgent::ListCommands {
                request_id,
                start: 0,
                limit: 100,
            });
            h.wait_for(Duration::from_secs(10), |e| {
                matches!(e, Event::CommandsEnd { .. })
            });
            let _ = push(
                h,
                round * 10 + k,
                "p.sh",
                b"#!/bin/sh\necho hi\n",
                [0; 32],
                false,
            );
        }
        h.backlog.clear();
    };
    let allocations = |h: &mut Harness| -> u64 {
        let before = h.log().matches("heap allocations").count();
        h.signal(libc::SIGUSR1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = h.log();
            if log.matches("heap allocations").count() > before {
                let line = log
                    .lines()
                    .rfind(|l| l.contains("heap allocations"))
                    .expect("line");
                return line
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("a count");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no allocation report:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    workload(h, 1);
    let warm = allocations(h);
    for round in 2..5 {
        workload(h, round);
    }
    let after = allocations(h);
    assert_eq!(
        after,
        warm,
        "the steady state allocated {} times",
        after - warm
    );
    let pid = h.agent.as_ref().expect("running").id();
    assert!(zombies_of(pid).is_empty(), "zombies: {:?}", zombies_of(pid));
}

/// `id` of the user the agent itself can see (`id USER` as root, through the same files).
fn id_of(h: &mut Harness, user_command: &str) -> String {
    let run = h.run(user_command, &[]);
    assert_eq!(run.outcome(), Outcome::Exited(0), "{run:?}");
    String::from_utf8_lossy(&run.stdout).into_owned()
}

#[test]
fn commands_run_as_the_configured_user_and_group() {
    // SAFETY: `geteuid` has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: changing user needs root");
        return;
    }
    let config = format!(
        "{CONFIG}\n[[command]]\nname = \"whoami\"\nprogram = \"/usr/bin/id\"\nuser = 65534\ngroup = 65534\n\n\
         [[command]]\nname = \"whoami-by-name\"\nprogram = \"/usr/bin/id\"\nuser = \"nobody\"\n\n\
         [[command]]\nname = \"id-nobody\"\nprogram = \"/usr/bin/id\"\nargs = [\"nobody\"]\n"
    );
    let mut h = Harness::start("identity", &config);
    h.hello();
    let out = id_of(&mut h, "whoami");
    assert!(
        out.starts_with("uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)"),
        "{out}"
    );
    // A user without a group: the user's own group and groups, never the agent's (root).
    assert_eq!(id_of(&mut h, "whoami-by-name"), id_of(&mut h, "id-nobody"));
}

#[test]
fn a_user_without_a_group_gets_its_primary_and_supplementary_groups() {
    // SAFETY: `geteuid` has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: changing user and mounting need root");
        return;
    }
    let passwd = "root:x:0:0:root:/root:/bin/sh\npltest:x:4242:4243::/nonexistent:/bin/false\n";
    let group = "root:x:0:\npltest:x:4243:\nwheel:x:4300:root,pltest\nother:x:4301:root\n\
                 audio:x:4302:pltest\n";
    let id = |name: &str, user: &str| {
        format!("[[command]]\nname = \"{name}\"\nprogram = \"/usr/bin/id\"\nuser = {user}\n\n")
    };
    let config = format!(
        "{CONFIG}\n{}{}[[command]]\nname = \"id-pltest\"\nprogram = \"/usr/bin/id\"\nargs = [\"pltest\"]\n\n\
         [[command]]\nname = \"ghost\"\nprogram = \"/usr/bin/id\"\nuser = 5555\n",
        id("by-name", "\"pltest\""),
        id("by-uid", "4242"),
    );
    let mut h = Harness::start_with_users("identity-groups", &config, passwd, group);
    h.hello();
    let expected = id_of(&mut h, "id-pltest");
    assert_eq!(
        expected, "uid=4242(pltest) gid=4243(pltest) groups=4243(pltest),4300(wheel),4302(audio)\n",
        "the test's own files are in force"
    );
    assert_eq!(id_of(&mut h, "by-name"), expected);
    assert_eq!(id_of(&mut h, "by-uid"), expected);
    // A uid without a passwd entry and without a group has no group to run with.
    let run = h.run("ghost", &[]);
    assert_eq!(run.outcome(), Outcome::FailedToStart(libc::ESRCH));
}

#[test]
fn the_agent_waits_for_the_host_and_follows_its_restarts_and_resets() {
    use ring_protocol::HostEndpoint;
    use ring_protocol::layout::offsets;
    use std::sync::atomic::Ordering::Relaxed;
    let mut h = Harness::start("host-lifecycle", CONFIG);
    h.hello();
    // A host process that starts over from scratch: the agent re-attaches and greets again.
    h.host = HostEndpoint::create(&*h.shm, 2).expect("valid region");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while h.host.is_resetting() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never detached"
        );
        h.host.try_finish_reset(&*h.shm, false);
        std::thread::sleep(Duration::from_millis(5));
    }
    h.backlog.clear();
    h.hello();
    // A corrupt ring: the agent asks for a reset, the host carries it out, all is well again.
    let epoch = h.host.epoch();
    h.shm.store(offsets::H2G_PROD, 0x7777_7770, Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !h.host.reset_requested(&*h.shm) {
        assert!(
            std::time::Instant::now() < deadline,
            "no reset request:\n{}",
            h.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    h.host.begin_reset(&*h.shm);
    while !h.host.try_finish_reset(&*h.shm, false) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never detached"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_ne!(h.host.epoch(), epoch);
    h.backlog.clear();
    h.hello();
    assert_eq!(h.run("true", &[]).outcome(), Outcome::Exited(0));
    assert!(
        h.log().contains("corrupt"),
        "the agent logged why:\n{}",
        h.log()
    );
}

#[test]
fn an_agent_started_before_the_host_waits_for_it() {
    let dir = common::scratch_dir("agent-first");
    let region = dir.join("region");
    let file = std::fs::File::create(&region).expect("create");
    file.set_len(common::REGION as u64).expect("size");
    drop(file);
    std::fs::write(dir.join("allow-list.toml"), CONFIG).expect("config");
    let log = std::fs::File::create(dir.join("agent.log")).expect("log");
    let mut agent = std::process::Command::new(common::agent_binary())
        .arg("--cgroup")
        .arg("off")
        .arg("--shm-file")
        .arg(&region)
        .arg("--config")
        .arg(dir.join("allow-list.toml"))
        .stderr(log)
        .spawn()
        .expect("start agent");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        agent.try_wait().expect("wait").is_none(),
        "the agent gave up on a zeroed region"
    );
    let shm = common::SharedFile::create_existing(&region, common::REGION);
    let mut host = ring_protocol::HostEndpoint::create(&*shm, 1).expect("valid region");
    let mut buf = ring_protocol::frame_buf();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(ring_protocol::AgentToHost::Hello(_))) = host.recv(&*shm, &mut buf) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no hello");
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = agent.kill();
    let _ = agent.wait();
}
