//! Who may do what: callers are identified as principals of `host.toml` and every API call
//! is checked against that principal's VMs, commands and rights before it is carried out.
//!
//! Identification ([`Policy::identify`]): a unix caller by the peer credentials of its
//! socket (the first principal listing its uid, else the first listing its gid); a TCP
//! caller by its bearer token, whose SHA-256 is compared in constant time with the stored
//! hashes (the file never holds a token). A caller no principal matches is denied
//! everything.
//!
//! Authorization ([`Policy::authorize`]) answers with the precise reason of a denial, which
//! the daemon returns to the caller and writes to the audit log.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::config::{PrincipalConfig, VmConfig};

/// Who is calling, as the API's listener saw it.
#[derive(Clone, PartialEq, Eq)]
pub enum Caller {
    /// A caller on the unix socket, by its peer credentials (`SO_PEERCRED`).
    Unix {
        /// Its user id.
        uid: u32,
        /// Its primary group id.
        gid: u32,
        /// Its process id, when known.
        pid: Option<i32>,
    },
    /// A caller on the TCP listener: the bearer token as presented.
    Token(String),
    /// A browser with a live console session, which acts for the principal that logged in.
    Session {
        /// The principal.
        principal: String,
        /// The session's public tag.
        tag: String,
    },
}

impl fmt::Display for Caller {
    /// For the audit log: `uid=1000 gid=1000 pid=42`, or `token` (never the token).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix { uid, gid, pid } => {
                write!(f, "uid={uid} gid={gid}")?;
                match pid {
                    Some(pid) => write!(f, " pid={pid}"),
                    None => Ok(()),
                }
            }
            Self::Token(_) => f.write_str("token"),
            Self::Session { tag, .. } => write!(f, "console session {tag}"),
        }
    }
}

impl fmt::Debug for Caller {
    /// Like the derived `Debug`, with the token left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix { uid, gid, pid } => f
                .debug_struct("Unix")
                .field("uid", uid)
                .field("gid", gid)
                .field("pid", pid)
                .finish(),
            Self::Token(_) => f.write_str("Token(<redacted>)"),
            Self::Session { principal, tag } => f
                .debug_struct("Session")
                .field("principal", principal)
                .field("tag", tag)
                .finish(),
        }
    }
}

/// What a caller asks to do. VM-scoped actions are checked with the VM they concern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// List VMs: allowed to every principal without a VM (the answer holds only the VMs it
    /// may see); with a VM, whether that VM is in the answer.
    ListVms,
    /// List a VM's commands.
    ListCommands,
    /// Run `command` on a VM.
    Exec {
        /// The command's allow-list name.
        command: &'a str,
    },
    /// Read an execution (status, output): checked with the execution's VM.
    ReadExecution,
    /// Cancel an execution: checked with the execution's VM.
    Cancel,
    /// Push a program to a VM (and maybe run it).
    Push,
    /// Ping a VM's agent.
    Ping,
    /// Read a VM's metrics.
    Metrics,
    /// Read the audit log (not VM-scoped).
    ReadAudit,
    /// Read the daemon's own state: open streams, pushes, counted denials (not VM-scoped).
    ReadDaemon,
    /// Ask who it is and what it may do (not VM-scoped; allowed to every principal).
    Whoami,
    /// Get a one-time login code of the web console for itself (allowed to every principal).
    ConsoleCode,
    /// Log in to the web console (with a code or a token).
    ConsoleLogin,
    /// Log out of the web console.
    ConsoleLogout,
    /// A request of a console session that changes something, refused before it was
    /// looked at for a missing CSRF token or a foreign `Origin`.
    ConsoleRequest,
}

impl fmt::Display for Action<'_> {
    /// What the action does, as a verb phrase: `list commands`, `run "uname"`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ListVms => f.write_str("list vms"),
            Self::ListCommands => f.write_str("list commands"),
            Self::Exec { command } => write!(f, "run {command:?}"),
            Self::ReadExecution => f.write_str("read executions"),
            Self::Cancel => f.write_str("cancel executions"),
            Self::Push => f.write_str("push programs"),
            Self::Ping => f.write_str("ping"),
            Self::Metrics => f.write_str("read metrics"),
            Self::ReadAudit => f.write_str("read the audit log"),
            Self::ReadDaemon => f.write_str("read the daemon's state"),
            Self::Whoami => f.write_str("ask who it is"),
            Self::ConsoleCode => f.write_str("get a console login code"),
            Self::ConsoleRequest => f.write_str("make this request from the console"),
            Self::ConsoleLogin => f.write_str("log in to the console"),
            Self::ConsoleLogout => f.write_str("log out of the console"),
        }
    }
}

/// A refusal, with the reason the caller is told and the audit log records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("denied: {reason}")]
pub struct Denied {
    /// Why, e.g. `principal "ci" may not run "reboot" on vm "web1"`.
    pub reason: String,
}

impl Denied {
    fn new(reason: String) -> Self {
        Self { reason }
    }
}

/// A principal as the policy holds it: its configuration, with the checks over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    config: PrincipalConfig,
}

impl Principal {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Its configuration.
    pub fn config(&self) -> &PrincipalConfig {
        &self.config
    }

    /// Whether it may see and use `vm` (one of its `vms` selectors matches it).
    pub fn may_access(&self, vm: &VmConfig) -> bool {
        self.config.vms.iter().any(|s| s.matches(vm))
    }

    /// Whether `command` is among its `commands` (on the VMs it may access).
    pub fn may_run(&self, command: &str) -> bool {
        self.config.commands.iter().any(|s| s.matches(command))
    }

    fn denied(&self, what: fmt::Arguments<'_>) -> Denied {
        Denied::new(format!("principal {:?} {what}", self.config.name))
    }

    fn require_vm<'v>(
        &self,
        action: &Action<'_>,
        vm: Option<&'v VmConfig>,
    ) -> Result<&'v VmConfig, Denied> {
        let Some(vm) = vm else {
            return Err(self.denied(format_args!("may not {action} without a vm")));
        };
        if self.may_access(vm) {
            Ok(vm)
        } else {
            Err(self.denied(format_args!("has no access to vm {:?}", vm.name)))
        }
    }
}

/// The principals of `host.toml` and the rules over them.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    principals: Vec<Principal>,
}

impl Policy {
    /// A policy over `principals` (as loaded and checked by [`crate::config::HostConfig`]).
    pub fn new(principals: &[PrincipalConfig]) -> Self {
        let principals = principals
            .iter()
            .map(|config| Principal {
                config: config.clone(),
            })
            .collect();
        Self { principals }
    }

    /// The principals, in file order.
    pub fn principals(&self) -> &[Principal] {
        &self.principals
    }

    /// The principal `caller` is, if any. A unix caller is the first principal listing its
    /// uid, else the first listing its gid. A token caller is the principal whose
    /// `token_sha256` is the token's SHA-256: every stored hash is compared, each in
    /// constant time.
    pub fn identify(&self, caller: &Caller) -> Option<&Principal> {
        match caller {
            Caller::Unix { uid, gid, .. } => self
                .principals
                .iter()
                .find(|p| p.config.uids.contains(uid))
                .or_else(|| self.principals.iter().find(|p| p.config.gids.contains(gid))),
            Caller::Token(token) => {
                let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
                let mut found = None;
                for principal in &self.principals {
                    if let Some(hash) = &principal.config.token_sha256
                        && constant_time_eq(hash, &digest)
                        && found.is_none()
                    {
                        found = Some(principal);
                    }
                }
                found
            }
            Caller::Session { principal, .. } => self.principal(principal),
        }
    }

    /// The principal named `name`.
    pub fn principal(&self, name: &str) -> Option<&Principal> {
        self.principals.iter().find(|p| p.config.name == name)
    }

    /// Whether `principal` may do `action`, on `vm` for VM-scoped actions (for reading or
    /// cancelling an execution, the execution's VM). The rules:
    ///
    /// - `ListVms`: allowed without a VM; with one, if the principal's `vms` match it.
    /// - `ListCommands`, `Ping`, `Metrics`, `ReadExecution`, `Cancel`: the VM matched.
    /// - `Exec`: the VM matched and the command among the principal's `commands`.
    /// - `Push`: `push = true` and the VM matched.
    /// - `ReadAudit`, `ReadDaemon`: `audit = true`.
    /// - `Whoami`, `ConsoleCode`, `ConsoleRequest`: any principal (a console request is
    ///   then checked as what it asks).
    ///
    /// A VM-scoped action asked without a VM is denied.
    pub fn authorize(
        &self,
        principal: &Principal,
        action: &Action<'_>,
        vm: Option<&VmConfig>,
    ) -> Result<(), Denied> {
        match *action {
            Action::ListVms => match vm {
                None => Ok(()),
                Some(_) => principal.require_vm(action, vm).map(drop),
            },
            Action::ListCommands
            | Action::Ping
            | Action::Metrics
            | Action::ReadExecution
            | Action::Cancel => principal.require_vm(action, vm).map(drop),
            Action::Exec { command } => {
                let vm = principal.require_vm(action, vm)?;
                if principal.may_run(command) {
                    Ok(())
                } else {
                    Err(principal
                        .denied(format_args!("may not run {command:?} on vm {:?}", vm.name)))
                }
            }
            Action::Push => {
                if !principal.config.push {
                    return Err(principal.denied(format_args!("may not push programs")));
                }
                principal.require_vm(action, vm).map(drop)
            }
            Action::Whoami
            | Action::ConsoleCode
            | Action::ConsoleRequest
            | Action::ConsoleLogin
            | Action::ConsoleLogout => Ok(()),
            Action::ReadAudit | Action::ReadDaemon => {
                if principal.config.audit {
                    Ok(())
                } else {
                    Err(principal.denied(format_args!("may not {action}")))
                }
            }
        }
    }

    /// [`identify`](Self::identify) then [`authorize`](Self::authorize): the principal if
    /// allowed. A caller no principal matches is denied with `no principal matches caller
    /// uid=... gid=...` or `no principal matches the bearer token`.
    pub fn check(
        &self,
        caller: &Caller,
        action: &Action<'_>,
        vm: Option<&VmConfig>,
    ) -> Result<&Principal, Denied> {
        let Some(principal) = self.identify(caller) else {
            let reason = match caller {
                Caller::Unix { .. } => format!("no principal matches caller {caller}"),
                Caller::Token(_) => "no principal matches the bearer token".to_owned(),
                Caller::Session { principal, .. } => {
                    format!("the console session's principal {principal:?} is no longer configured")
                }
            };
            return Err(Denied::new(reason));
        };
        self.authorize(principal, action, vm)?;
        Ok(principal)
    }
}

/// The hex SHA-256 of `token`: what `token_sha256` in `host.toml` holds.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Equality whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}
