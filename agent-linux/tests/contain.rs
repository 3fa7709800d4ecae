//! Nothing an execution starts outlives it: `portless-agent --shm-file` with real processes,
//! contained by process groups (`--cgroup off`) and, where the host has cgroup v2, by a
//! cgroup per execution. Each test starts `sleep` with a number of seconds no other test
//! uses, and looks for it in /proc afterwards.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{CONFIG, Harness, test_cgroup};
use ring_protocol::message::{HostToAgent, Outcome};

/// A command that runs the shell line `script` with `$1` the test's mark (the seconds of the
/// `sleep` it leaves behind), and `timeout_ms` if given.
fn marked(name: &str, script: &str, timeout_ms: Option<u32>) -> String {
    let timeout = timeout_ms.map_or_else(String::new, |t| format!("timeout_ms = {t}\n"));
    format!(
        "\n[[command]]\nname = \"{name}\"\nprogram = \"/bin/sh\"\n\
         args = [\"-c\", {script:?}, \"sh\", \"{{s}}\"]\n{timeout}\n\
         [[command.param]]\nname = \"s\"\nkind = \"integer\"\nmin = 1\nmax = 100000000\n"
    )
}

/// The allow-list of these tests: commands that leave a `sleep` behind in different ways
/// (in the background, or in a session of their own; with a leader that exits at once, or
/// one that waits and is timed out or cancelled), one that says where it runs, and one with
/// a limit.
fn config() -> String {
    [
        CONFIG.to_owned(),
        marked("leave", r#"sleep "$1" >/dev/null 2>&1 & echo started"#, None),
        marked(
            "leave-and-wait",
            r#"sleep "$1" >/dev/null 2>&1 & exec sleep 1000"#,
            Some(700),
        ),
        marked("escape", r#"setsid sleep "$1" & echo started"#, None),
        marked(
            "escape-and-wait",
            r#"setsid sleep "$1" >/dev/null 2>&1 & exec sleep 1000"#,
            Some(700),
        ),
        "\n[[command]]\nname = \"where\"\nprogram = \"/bin/cat\"\nargs = [\"/proc/self/cgroup\"]\n\
         \n[[command]]\nname = \"limited\"\nprogram = \"/bin/cat\"\nargs = [\"/proc/self/cgroup\"]\n\
         pids_max = 32\n"
            .to_owned(),
    ]
    .concat()
}

/// A number of seconds for `sleep` that marks it as this test's.
fn mark(k: u32) -> String {
    (50_000_000 + (std::process::id() % 100_000) * 100 + k).to_string()
}

/// Live (not zombie) processes running `sleep <mark>`.
fn alive(mark: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() < 2 || !args[0].ends_with(b"sleep") || args[1] != mark.as_bytes() {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("Z");
        if state != "Z" && state != "X" {
            found.push(pid);
        }
    }
    found
}

/// Kills what a failed test left, so that it does not outlive the test either.
/// Removes cgroup `dir`, retrying for up to a second while the kernel still answers `EBUSY`
/// (it does for a moment after the last process was killed and reaped).
fn remove_cgroup(dir: &std::path::Path) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        match std::fs::remove_dir(dir) {
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

struct Sweep(Vec<String>);

impl Drop for Sweep {
    fn drop(&mut self) {
        for m in &self.0 {
            for pid in alive(m) {
                // SAFETY: `kill` takes plain values.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn start(h: &mut Harness) {
    h.hello();
    h.greet_reading_ended();
}

/// Runs `command` with `mark` to its end; returns its outcome and leftovers.
fn run(h: &mut Harness, command: &str, mark: &str) -> (Outcome, Option<u32>) {
    let id = h.exec(command, &[mark], None).expect("accepted");
    let run = h.collect(id, Duration::from_secs(20));
    (run.outcome(), run.leftovers)
}

/// Starts `command` with `mark`, waits until its `sleep` runs, cancels it; returns how it
/// ended and its leftovers.
fn run_and_cancel(h: &mut Harness, command: &str, mark: &str) -> (Outcome, Option<u32>) {
    let id = h.exec(command, &[mark], Some(60_000)).expect("accepted");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(mark).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{command} never started its sleep"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    h.send(&HostToAgent::Cancel {
        request_id: 999,
        execution: id,
    });
    let run = h.collect(id, Duration::from_secs(20));
    (run.outcome(), run.leftovers)
}

/// `leave` (a leader that exits at once) ends saying it killed the one `sleep` it left, and
/// `wait` (a leader that waits) ends timed out and, once more, cancelled; no `sleep` of theirs
/// is alive afterwards.
fn nothing_outlives(h: &mut Harness, leave: &str, wait: &str, marks: &[String; 3]) {
    assert_eq!(run(h, leave, &marks[0]), (Outcome::Exited(0), Some(1)));
    assert_eq!(
        alive(&marks[0]),
        [] as [u32; 0],
        "{leave}: its sleep outlived it"
    );
    assert_eq!(run(h, wait, &marks[1]).0, Outcome::TimedOut);
    assert_eq!(
        alive(&marks[1]),
        [] as [u32; 0],
        "{wait}: timed out, its sleep lived on"
    );
    assert_eq!(run_and_cancel(h, wait, &marks[2]).0, Outcome::Cancelled);
    assert_eq!(
        alive(&marks[2]),
        [] as [u32; 0],
        "{wait}: cancelled, its sleep lived on"
    );
}

#[test]
fn process_groups_a_background_child_is_killed_when_its_execution_ends() {
    let marks = [mark(1), mark(2), mark(3)];
    let _sweep = Sweep(marks.to_vec());
    let mut h = Harness::start("contain-pgroup", &config());
    start(&mut h);
    assert!(
        h.log().contains("containment: process groups"),
        "{}",
        h.log()
    );

    // The leader exits at once: what it left in the background is killed, and the end
    // says so; timed out, and cancelled, the whole group goes.
    nothing_outlives(&mut h, "leave", "leave-and-wait", &marks);

    // Limits need cgroups: without them such a command does not start.
    let id = h.exec("limited", &[], None).expect("accepted");
    let ended = h.collect(id, Duration::from_secs(10));
    assert_eq!(ended.outcome(), Outcome::FailedToStart(libc::EOPNOTSUPP));
    assert!(
        h.log().contains("killed 1 process it left running"),
        "{}",
        h.log()
    );
}

/// The `exec-*` cgroups in `dir`, and how many of them hold a process.
fn exec_cgroups(dir: &Path) -> (usize, usize) {
    let names: Vec<_> = std::fs::read_dir(dir)
        .expect("cgroup dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("exec-"))
        .collect();
    let populated = names
        .iter()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("cgroup.events"))
                .is_ok_and(|t| t.lines().any(|l| l == "populated 1"))
        })
        .count();
    (names.len(), populated)
}

/// The cgroup the `where` command runs in.
fn cgroup_of(h: &mut Harness) -> String {
    let id = h.exec("where", &[], None).expect("accepted");
    let ended = h.collect(id, Duration::from_secs(10));
    assert_eq!(ended.outcome(), Outcome::Exited(0));
    let out = String::from_utf8_lossy(&ended.stdout).into_owned();
    out.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line")
        .to_owned()
}

#[test]
fn cgroups_hold_what_left_the_process_group_and_are_removed_after() {
    let Some(dir) = test_cgroup("contain") else {
        return;
    };
    let marks = [mark(11), mark(12), mark(13), mark(14)];
    let _sweep = Sweep(marks.to_vec());
    let mut h = Harness::start_in_cgroup("contain-cgroup", &config(), &dir);
    start(&mut h);
    assert!(
        h.log().contains("containment: a cgroup per execution"),
        "{}",
        h.log()
    );

    // A child in a session of its own (setsid), holding the output pipe: after the drain
    // grace it is killed all the same; timed out and cancelled, it goes too.
    nothing_outlives(
        &mut h,
        "escape",
        "escape-and-wait",
        &[marks[0].clone(), marks[1].clone(), marks[2].clone()],
    );
    // Nothing left behind: an execution whose leftovers were killed leaves no cgroup...
    assert_eq!(
        run(&mut h, "leave", &marks[3]),
        (Outcome::Exited(0), Some(1))
    );
    assert_eq!(exec_cgroups(&dir), (0, 0));
    // ...and one that ended clean leaves its cgroup, empty, to the next execution.
    let first = cgroup_of(&mut h);
    assert_eq!(exec_cgroups(&dir), (1, 0));
    assert_eq!(cgroup_of(&mut h), first, "the idle cgroup is used again");

    // Limits where the cgroup has the controller; otherwise refused.
    let controllers =
        std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let id = h.exec("limited", &[], None).expect("accepted");
    let ended = h.collect(id, Duration::from_secs(10));
    if controllers.split_whitespace().any(|c| c == "pids") {
        assert_eq!(ended.outcome(), Outcome::Exited(0));
        let own = String::from_utf8_lossy(&ended.stdout);
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("cgroup");
        assert!(path.contains("/exec-"), "{own}");
    } else {
        assert_eq!(ended.outcome(), Outcome::FailedToStart(libc::EOPNOTSUPP));
    }

    // An agent killed with executions running leaves their cgroups; the next one empties
    // and removes them.
    let id = h
        .exec("leave-and-wait", &[&marks[0]], Some(60_000))
        .expect("accepted");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(&marks[0]).is_empty() {
        assert!(Instant::now() < deadline, "never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = id;
    h.signal(libc::SIGKILL);
    let _ = h.agent.take().expect("running").wait();
    assert_eq!(exec_cgroups(&dir).1, 1, "the running execution's cgroup");
    h.spawn_agent();
    h.hello();
    assert_eq!(exec_cgroups(&dir), (0, 0));
    assert_eq!(alive(&marks[0]), [] as [u32; 0]);
    // An agent that stops removes the cgroups it kept.
    cgroup_of(&mut h);
    assert_eq!(exec_cgroups(&dir), (1, 0));
    assert!(h.stop_agent().success());
    assert_eq!(exec_cgroups(&dir), (0, 0));
    drop(h);
    std::fs::remove_dir(&dir).expect("the test's cgroup is empty");
}

#[test]
fn an_agent_in_a_cgroup_of_its_own_moves_into_a_leaf_and_makes_its_executions_beside_it() {
    // As under systemd with Delegate=yes: the service's cgroup is the agent's to manage.
    let Some(service) = test_cgroup("service") else {
        return;
    };
    let config = config();
    let mut h = Harness::start_as_service_in("contain-service", &config, &service);
    start(&mut h);
    let log = h.log();
    assert!(
        log.contains(&format!("a cgroup per execution in {}", service.display())),
        "{log}"
    );
    let pid = h.agent.as_ref().expect("running").id();
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("agent's cgroup");
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("");
    assert!(own.ends_with("/agent"), "the agent is in {own}");
    // An execution's cgroup is a sibling of the agent's leaf.
    let path = cgroup_of(&mut h);
    let out = path.clone();
    let (parent, leaf) = path.rsplit_once('/').expect("a path");
    assert_eq!(
        Some(parent),
        own.rsplit_once('/').map(|(dir, _)| dir),
        "{out}"
    );
    assert!(leaf.starts_with("exec-"), "{out}");
    let mark = mark(21);
    let _sweep = Sweep(vec![mark.clone()]);
    assert_eq!(run(&mut h, "escape", &mark), (Outcome::Exited(0), Some(1)));
    assert_eq!(alive(&mark), [] as [u32; 0]);
    drop(h);
    let leaf = service.join("agent");
    let _ = remove_cgroup(&leaf);
    remove_cgroup(&service).expect("the service's cgroup is empty");
}
