//! The policy over `host.toml`: the example file as documented, identification of callers
//! and every authorization rule, allowed and denied, with the exact reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use host_shim::config::{
    BudgetConfig, CallersConfig, ChannelConfig, CommandSelector, DaemonConfig, HostConfig,
    PrincipalConfig, RecordsConfig, VmConfig, VmSelector,
};
use host_shim::http::policy::{Action, Caller, Denied, Policy, hash_token};

const CI_TOKEN: &str = "s3cret-ci-token";

/// VMs `web1`, `web2` (role=web) and `db1` (role=db), and principals covering every rule.
fn config() -> HostConfig {
    let text = format!(
        r#"
[[vm]]
name = "web1"
labels = {{ role = "web" }}
channel = "plain"
path = "/dev/shm/web1"

[[vm]]
name = "web2"
labels = {{ role = "web" }}
channel = "plain"
path = "/dev/shm/web2"

[[vm]]
name = "db1"
labels = {{ role = "db" }}
channel = "doorbell"
socket = "/run/portless/db1.ivshmem"

[[principal]]
name = "ops"
uids = [1000]
gids = [27]
vms = ["*"]
commands = ["*"]
push = true
audit = true

[[principal]]
name = "ci"
token_sha256 = "{ci}"
vms = ["role=web"]
commands = ["uname", "service-status"]

[[principal]]
name = "dev"
gids = [100, 27]
vms = ["db1"]
commands = ["uname"]

[[principal]]
name = "alice"
uids = [1001]
gids = [100]
vms = ["web1", "db1"]
commands = ["uname"]

[[principal]]
name = "deployer"
uids = [2000]
token_sha256 = "{deployer}"
vms = ["web2"]
push = true

[[principal]]
name = "auditor"
gids = [4]
audit = true
"#,
        ci = hash_token(CI_TOKEN),
        deployer = hash_token("deployer-token"),
    );
    match HostConfig::parse(&text, "policy.toml") {
        Ok(config) => config,
        Err(e) => panic!("{e}"),
    }
}

fn unix(uid: u32, gid: u32) -> Caller {
    Caller::Unix {
        uid,
        gid,
        pid: Some(42),
    }
}

fn who(policy: &Policy, caller: &Caller) -> Option<String> {
    policy.identify(caller).map(|p| p.name().to_owned())
}

/// `authorize` for the principal named `name`, the reason of a denial as `Err`.
fn authorize(
    config: &HostConfig,
    name: &str,
    action: Action<'_>,
    vm: Option<&str>,
) -> Result<(), String> {
    let policy = Policy::new(&config.principals);
    let principal = policy
        .principals()
        .iter()
        .find(|p| p.name() == name)
        .unwrap_or_else(|| panic!("no principal {name}"));
    let vm = vm.map(|vm| config.vm(vm).unwrap_or_else(|| panic!("no vm {vm}")));
    policy
        .authorize(principal, &action, vm)
        .map_err(|Denied { reason }| reason)
}

fn no_access(principal: &str, vm: &str) -> Result<(), String> {
    Err(format!(
        "principal {principal:?} has no access to vm {vm:?}"
    ))
}

#[test]
fn example_file_is_as_documented() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/host.toml");
    let config = HostConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let labels: BTreeMap<String, String> = [("role", "web"), ("zone", "a")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let expected = HostConfig {
        daemon: DaemonConfig {
            socket: PathBuf::from("/run/portless/portless.sock"),
            state_dir: PathBuf::from("/var/lib/portless"),
            socket_mode: 0o660,
            tcp: Some(([127, 0, 0, 1], 7433).into()),
            tls: None,
            insecure_plaintext: false,
            output_cap: 16 * 1024 * 1024,
            delivery_timeout: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(5),
            command_refresh: Duration::from_secs(300),
        },
        vms: vec![
            VmConfig {
                name: "web1".to_owned(),
                labels,
                channel: ChannelConfig::Plain {
                    path: PathBuf::from("/dev/shm/portless-web1"),
                    size: 1 << 20,
                },
            },
            VmConfig {
                name: "db1".to_owned(),
                labels: BTreeMap::new(),
                channel: ChannelConfig::Doorbell {
                    socket: PathBuf::from("/run/portless/db1.ivshmem"),
                    size: 4 << 20,
                    qemu_user: None,
                },
            },
        ],
        principals: vec![
            PrincipalConfig {
                name: "ops".to_owned(),
                uids: vec![1000],
                gids: vec![27],
                token_sha256: None,
                vms: vec![VmSelector::All],
                commands: vec![CommandSelector::All],
                push: true,
                audit: true,
                read_all: true,
                cancel_all: true,
            },
            PrincipalConfig {
                name: "ci".to_owned(),
                uids: vec![],
                gids: vec![],
                // The example's hash is that of the token "test".
                token_sha256: hex::decode(hash_token("test"))
                    .ok()
                    .and_then(|h| h.try_into().ok()),
                vms: vec![VmSelector::Label {
                    key: "role".to_owned(),
                    value: "web".to_owned(),
                }],
                commands: vec![
                    CommandSelector::Name("uname".to_owned()),
                    CommandSelector::Name("service-status".to_owned()),
                ],
                push: false,
                audit: false,
                read_all: false,
                cancel_all: false,
            },
        ],
        budget: BudgetConfig::default(),
        records: RecordsConfig::default(),
        callers: CallersConfig::default(),
        console: host_shim::config::ConsoleConfig::default(),
        fleet: None,
    };
    assert_eq!(config, expected);
    assert!(config.principals[1].token_sha256.is_some());

    // The example's daemon values are the defaults, but for the TCP listener.
    let defaults = DaemonConfig {
        tcp: config.daemon.tcp,
        ..DaemonConfig::default()
    };
    assert_eq!(config.daemon, defaults);

    let policy = Policy::new(&config.principals);
    let ci = policy.identify(&Caller::Token("test".to_owned()));
    assert_eq!(ci.map(|p| p.name()), Some("ci"));
}

#[test]
fn hash_token_is_hex_sha256() {
    assert_eq!(
        hash_token("test"),
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
    assert_eq!(
        hash_token(""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[test]
fn unix_callers_by_uid_then_gid() {
    let config = config();
    let policy = Policy::new(&config.principals);
    // By uid.
    assert_eq!(who(&policy, &unix(1000, 5)).as_deref(), Some("ops"));
    // A uid match wins over an earlier principal listing the gid.
    assert_eq!(who(&policy, &unix(1001, 100)).as_deref(), Some("alice"));
    // By gid: the first principal listing it (dev before alice).
    assert_eq!(who(&policy, &unix(7, 100)).as_deref(), Some("dev"));
    // gid 27: ops lists it before dev.
    assert_eq!(who(&policy, &unix(7, 27)).as_deref(), Some("ops"));
    assert_eq!(who(&policy, &unix(7, 4)).as_deref(), Some("auditor"));
    // Unknown.
    assert_eq!(who(&policy, &unix(7, 8)), None);
    let no_pid = Caller::Unix {
        uid: 2000,
        gid: 0,
        pid: None,
    };
    assert_eq!(who(&policy, &no_pid).as_deref(), Some("deployer"));
}

#[test]
fn token_callers_by_hash() {
    let config = config();
    let policy = Policy::new(&config.principals);
    let token = |t: &str| who(&policy, &Caller::Token(t.to_owned()));
    assert_eq!(token(CI_TOKEN).as_deref(), Some("ci"));
    assert_eq!(token("deployer-token").as_deref(), Some("deployer"));
    // Wrong, truncated, extended, empty: nobody.
    assert_eq!(token("s3cret-ci-tokem"), None);
    assert_eq!(token(&CI_TOKEN[..CI_TOKEN.len() - 1]), None);
    assert_eq!(token(&format!("{CI_TOKEN} ")), None);
    assert_eq!(token(""), None);
    // The hash itself is not the token.
    assert_eq!(token(&hash_token(CI_TOKEN)), None);
    // A unix caller never matches by token, nor a token caller by ids.
    assert_eq!(who(&policy, &Caller::Token("1000".to_owned())), None);
}

#[test]
fn callers_display_for_the_audit_log() {
    assert_eq!(unix(1000, 1000).to_string(), "uid=1000 gid=1000 pid=42");
    let no_pid = Caller::Unix {
        uid: 0,
        gid: 5,
        pid: None,
    };
    assert_eq!(no_pid.to_string(), "uid=0 gid=5");
    let token = Caller::Token(CI_TOKEN.to_owned());
    assert_eq!(token.to_string(), "token");
    // Debug output (logs, panics) never shows the token either.
    let debug = format!("{token:?}");
    assert!(!debug.contains(CI_TOKEN), "{debug}");
    assert_eq!(debug, "Token(<redacted>)");
}

#[test]
fn list_vms() {
    let c = config();
    // Without a VM every principal may list (the answer is filtered per VM).
    for name in ["ops", "ci", "dev", "auditor"] {
        assert_eq!(authorize(&c, name, Action::ListVms, None), Ok(()));
    }
    assert_eq!(authorize(&c, "ci", Action::ListVms, Some("web1")), Ok(()));
    assert_eq!(authorize(&c, "ci", Action::ListVms, Some("web2")), Ok(()));
    assert_eq!(
        authorize(&c, "ci", Action::ListVms, Some("db1")),
        no_access("ci", "db1")
    );
    assert_eq!(authorize(&c, "ops", Action::ListVms, Some("db1")), Ok(()));
    // A principal without `vms` sees none.
    assert_eq!(
        authorize(&c, "auditor", Action::ListVms, Some("web1")),
        no_access("auditor", "web1")
    );
}

#[test]
fn vm_scoped_reads_need_the_vm() {
    let c = config();
    let actions = [
        (Action::ListCommands, "list commands"),
        (Action::Ping, "ping"),
        (Action::Metrics, "read metrics"),
        (Action::ReadExecution, "read executions"),
        (Action::Cancel, "cancel executions"),
    ];
    for (action, verb) in actions {
        // By label.
        assert_eq!(authorize(&c, "ci", action, Some("web2")), Ok(()), "{verb}");
        assert_eq!(
            authorize(&c, "ci", action, Some("db1")),
            no_access("ci", "db1")
        );
        // By name.
        assert_eq!(authorize(&c, "dev", action, Some("db1")), Ok(()), "{verb}");
        assert_eq!(
            authorize(&c, "dev", action, Some("web1")),
            no_access("dev", "web1")
        );
        // By "*".
        assert_eq!(authorize(&c, "ops", action, Some("web1")), Ok(()), "{verb}");
        // None.
        assert_eq!(
            authorize(&c, "auditor", action, Some("db1")),
            no_access("auditor", "db1")
        );
        // Without a VM: refused, naming the action.
        assert_eq!(
            authorize(&c, "ops", action, None),
            Err(format!("principal \"ops\" may not {verb} without a vm"))
        );
    }
}

#[test]
fn exec_needs_the_vm_and_the_command() {
    let c = config();
    let exec = |command| Action::Exec { command };
    assert_eq!(authorize(&c, "ci", exec("uname"), Some("web1")), Ok(()));
    assert_eq!(
        authorize(&c, "ci", exec("service-status"), Some("web2")),
        Ok(())
    );
    assert_eq!(
        authorize(&c, "ci", exec("reboot"), Some("web1")),
        Err("principal \"ci\" may not run \"reboot\" on vm \"web1\"".to_owned())
    );
    // Access to the VM is checked first.
    assert_eq!(
        authorize(&c, "ci", exec("reboot"), Some("db1")),
        no_access("ci", "db1")
    );
    assert_eq!(
        authorize(&c, "ci", exec("uname"), Some("db1")),
        no_access("ci", "db1")
    );
    // Command names match exactly.
    assert_eq!(
        authorize(&c, "alice", exec("Uname"), Some("web1")),
        Err("principal \"alice\" may not run \"Uname\" on vm \"web1\"".to_owned())
    );
    // "*" covers every command.
    assert_eq!(authorize(&c, "ops", exec("reboot"), Some("db1")), Ok(()));
    // No commands at all.
    assert_eq!(
        authorize(&c, "deployer", exec("uname"), Some("web2")),
        Err("principal \"deployer\" may not run \"uname\" on vm \"web2\"".to_owned())
    );
    assert_eq!(
        authorize(&c, "ci", exec("uname"), None),
        Err("principal \"ci\" may not run \"uname\" without a vm".to_owned())
    );
}

#[test]
fn push_needs_the_right_and_the_vm() {
    let c = config();
    assert_eq!(authorize(&c, "ops", Action::Push, Some("db1")), Ok(()));
    assert_eq!(
        authorize(&c, "deployer", Action::Push, Some("web2")),
        Ok(())
    );
    assert_eq!(
        authorize(&c, "deployer", Action::Push, Some("web1")),
        no_access("deployer", "web1")
    );
    // Without `push = true`, even on its own VMs.
    assert_eq!(
        authorize(&c, "ci", Action::Push, Some("web1")),
        Err("principal \"ci\" may not push programs".to_owned())
    );
    assert_eq!(
        authorize(&c, "ci", Action::Push, None),
        Err("principal \"ci\" may not push programs".to_owned())
    );
    assert_eq!(
        authorize(&c, "deployer", Action::Push, None),
        Err("principal \"deployer\" may not push programs without a vm".to_owned())
    );
}

#[test]
fn audit_needs_the_right() {
    let c = config();
    assert_eq!(authorize(&c, "ops", Action::ReadAudit, None), Ok(()));
    assert_eq!(authorize(&c, "auditor", Action::ReadAudit, None), Ok(()));
    // Not VM-scoped: a VM given changes nothing.
    assert_eq!(
        authorize(&c, "auditor", Action::ReadAudit, Some("db1")),
        Ok(())
    );
    for name in ["ci", "dev", "deployer"] {
        assert_eq!(
            authorize(&c, name, Action::ReadAudit, None),
            Err(format!("principal {name:?} may not read the audit log"))
        );
    }
}

#[test]
fn check_identifies_then_authorizes() {
    let c = config();
    let policy = Policy::new(&c.principals);
    let web1 = c.vm("web1");
    let db1 = c.vm("db1");
    let uname = Action::Exec { command: "uname" };
    let ci = Caller::Token(CI_TOKEN.to_owned());

    let allowed = policy.check(&ci, &uname, web1).map(|p| p.name().to_owned());
    assert_eq!(allowed, Ok("ci".to_owned()));
    assert_eq!(
        policy.check(&ci, &uname, db1).map(|_| ()),
        Err(Denied {
            reason: "principal \"ci\" has no access to vm \"db1\"".to_owned()
        })
    );

    // Unidentified callers are denied everything, even listing VMs.
    let stranger = unix(5, 6);
    let wrong_token = Caller::Token("guess".to_owned());
    for action in [Action::ListVms, Action::Ping, uname, Action::ReadAudit] {
        assert_eq!(
            policy.check(&stranger, &action, web1).map(|_| ()),
            Err(Denied {
                reason: "no principal matches caller uid=5 gid=6 pid=42".to_owned()
            })
        );
        assert_eq!(
            policy.check(&wrong_token, &action, None).map(|_| ()),
            Err(Denied {
                reason: "no principal matches the bearer token".to_owned()
            })
        );
    }
    let denied = policy.check(&stranger, &Action::ListVms, None).err();
    assert_eq!(
        denied.map(|d| d.to_string()),
        Some("denied: no principal matches caller uid=5 gid=6 pid=42".to_owned())
    );

    // A policy without principals knows nobody.
    let empty = Policy::new(&[]);
    assert!(empty.identify(&unix(0, 0)).is_none());
    assert!(empty.identify(&ci).is_none());
}

#[test]
fn actions_display_as_verbs() {
    let cases = [
        (Action::ListVms, "list vms"),
        (Action::ListCommands, "list commands"),
        (Action::Exec { command: "uname" }, "run \"uname\""),
        (Action::ReadExecution, "read executions"),
        (Action::Cancel, "cancel executions"),
        (Action::Push, "push programs"),
        (Action::Ping, "ping"),
        (Action::Metrics, "read metrics"),
        (Action::ReadAudit, "read the audit log"),
    ];
    for (action, text) in cases {
        assert_eq!(action.to_string(), text);
    }
}

#[test]
fn principal_accessors() {
    let c = config();
    let policy = Policy::new(&c.principals);
    let names: Vec<&str> = policy.principals().iter().map(|p| p.name()).collect();
    assert_eq!(names, ["ops", "ci", "dev", "alice", "deployer", "auditor"]);
    let alice = &policy.principals()[3];
    assert_eq!(alice.config(), &c.principals[3]);
    let vm = |name| c.vm(name).unwrap_or_else(|| panic!("{name}"));
    assert!(alice.may_access(vm("web1")) && alice.may_access(vm("db1")));
    assert!(!alice.may_access(vm("web2")));
    assert!(alice.may_run("uname") && !alice.may_run("uptime"));
}
