//! The daemon's configuration, `host.toml`: where the daemon listens, the VMs it serves and
//! the principals that may use them (`portless serve --config host.toml`).
//!
//! The file is read with `serde` and `toml`, every table with `deny_unknown_fields`, then
//! checked as a whole: names unique, every channel complete, region sizes valid, selectors
//! well-formed and naming only VMs that exist. Every error names the file and, where one is
//! known, the line and column: `host.toml:12:3: unknown field `nmae`, expected ...`.
//! `examples/host.toml` is the documented example.
//!
//! The file is also where [`Target`]s (what a CLI or API call runs on: a VM, a list, a label
//! selector or all) are resolved to VMs, by [`HostConfig::select_vms`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ring_protocol::layout::{MAX_REGION_SIZE, MIN_REGION_SIZE};

mod console;
mod fleet;
mod limits;
pub use console::*;
pub use fleet::FleetConfig;
pub use limits::*;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use toml::Spanned;

/// Default path of the daemon's API socket (`[daemon] socket`).
pub const DEFAULT_SOCKET: &str = "/run/portless/portless.sock";
/// Default directory of the daemon's records (`[daemon] state_dir`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/portless";
/// Default permission bits of the API socket (`[daemon] socket_mode`, `"0660"`).
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Default number of bytes kept per stream per execution (`[daemon] output_cap`, 16 MiB).
pub const DEFAULT_OUTPUT_CAP: usize = 16 * 1024 * 1024;
/// Default time an exec waits for its VM to become ready (`[daemon] delivery_timeout_ms`).
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time without an agent heartbeat before a VM is unresponsive
/// (`[daemon] heartbeat_timeout_ms`).
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default period of the re-listing of each VM's commands (`[daemon] command_refresh_s`).
pub const DEFAULT_COMMAND_REFRESH: Duration = Duration::from_secs(300);
/// Default size of a VM's shared region (`[[vm]] size`, 1 MiB).
pub const DEFAULT_REGION_SIZE: usize = 1024 * 1024;
/// Longest VM name, principal name, label key or label value, in bytes.
pub const MAX_NAME_LEN: usize = 63;
/// Longest command name in a principal's `commands` (the agent's limit too), in bytes.
pub const MAX_COMMAND_NAME_LEN: usize = 64;

/// The whole configuration of the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostConfig {
    /// The `[daemon]` table.
    pub daemon: DaemonConfig,
    /// The `[[vm]]` tables, in file order; names are unique.
    pub vms: Vec<VmConfig>,
    /// The `[[principal]]` tables, in file order; names are unique.
    pub principals: Vec<PrincipalConfig>,
    /// The `[budget]` table: what one guest may make the host spend.
    pub budget: BudgetConfig,
    /// The `[records]` table: output merging, quotas and retention.
    pub records: RecordsConfig,
    /// The `[callers]` table: what callers of the API may make the daemon spend.
    pub callers: CallersConfig,
    /// The `[console]` table: the web console's listener and sessions.
    pub console: ConsoleConfig,
    /// The `[fleet]` table, when the host is part of a fleet.
    pub fleet: Option<FleetConfig>,
}

/// The `[daemon]` table: where the daemon listens and keeps its records, and its timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Path of the API's unix socket.
    pub socket: PathBuf,
    /// Directory of the SQLite records.
    pub state_dir: PathBuf,
    /// Permission bits of the API socket (at most `0o777`).
    pub socket_mode: u32,
    /// Address of the optional TCP listener (bearer tokens only there).
    pub tcp: Option<SocketAddr>,
    /// The TCP listener's TLS certificate chain and key (PEM files); `None`: plain HTTP,
    /// which only a loopback address or `insecure_plaintext` allows.
    pub tls: Option<TlsFiles>,
    /// Plain HTTP on a TCP address that is not loopback, tokens in clear text: only when
    /// this says so.
    pub insecure_plaintext: bool,
    /// Bytes of output kept per stream per execution; more is counted and flagged truncated.
    pub output_cap: usize,
    /// How long an exec waits for its VM to become ready before it ends `undeliverable`.
    pub delivery_timeout: Duration,
    /// How long without an agent heartbeat before a VM is `unresponsive`.
    pub heartbeat_timeout: Duration,
    /// Period of the re-listing of each VM's commands.
    pub command_refresh: Duration,
}

/// The TCP listener's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file with the certificate chain, the server's first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            socket_mode: DEFAULT_SOCKET_MODE,
            tcp: None,
            tls: None,
            insecure_plaintext: false,
            output_cap: DEFAULT_OUTPUT_CAP,
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            command_refresh: DEFAULT_COMMAND_REFRESH,
        }
    }
}

/// One `[[vm]]` table: a VM the daemon serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Unique name: 1..=63 of `[a-z0-9_.-]`, starting with a letter or digit.
    pub name: String,
    /// Labels for `label=value` selectors; keys and values are 1..=63 of `[A-Za-z0-9_.-]`.
    pub labels: BTreeMap<String, String>,
    /// How the daemon reaches the VM's shared memory.
    pub channel: ChannelConfig,
}

impl VmConfig {
    /// Whether the VM has label `key` set to `value`.
    pub fn has_label(&self, key: &str, value: &str) -> bool {
        self.labels.get(key).is_some_and(|v| v == value)
    }
}

/// How the daemon reaches a VM's shared region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelConfig {
    /// QEMU `ivshmem-plain`: the daemon maps the memory-backend file at `path` and polls
    /// (the device has no interrupts).
    Plain {
        /// The memory-backend file QEMU shares with the guest.
        path: PathBuf,
        /// Region size in bytes: a power of two in 64 KiB..=64 MiB.
        size: usize,
    },
    /// QEMU `ivshmem-doorbell`: the daemon is the ivshmem server listening on `socket`; it
    /// creates the memory and the doorbells.
    Doorbell {
        /// The unix socket QEMU's `ivshmem-doorbell` chardev connects to.
        socket: PathBuf,
        /// Region size in bytes: a power of two in 64 KiB..=64 MiB.
        size: usize,
        /// The user QEMU runs as, when it is not the daemon's (`qemu_user`): the socket is
        /// made that user's and its connections accepted. Root and the daemon's own user are
        /// always accepted; anyone else never.
        qemu_user: Option<UnixUser>,
    },
}

/// A unix user as configured: a name (resolved when the daemon starts) or a uid.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum UnixUser {
    /// A numeric uid.
    Id(u32),
    /// A user name, looked up in the system's user database.
    Name(String),
}

impl ChannelConfig {
    /// The region size in bytes.
    pub fn size(&self) -> usize {
        match *self {
            Self::Plain { size, .. } | Self::Doorbell { size, .. } => size,
        }
    }

    /// The path the channel is reached by, and the field that holds it: the plain
    /// channel's `path` or the doorbell channel's `socket`.
    pub fn path(&self) -> (&'static str, &Path) {
        match self {
            Self::Plain { path, .. } => ("path", path),
            Self::Doorbell { socket, .. } => ("socket", socket),
        }
    }

    /// The kind as written in the file: `"plain"` or `"doorbell"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Plain { .. } => "plain",
            Self::Doorbell { .. } => "doorbell",
        }
    }
}

/// One `[[principal]]` table: who may do what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrincipalConfig {
    /// Unique name: 1..=63 of `[a-z0-9_.-]`, starting with a letter or digit.
    pub name: String,
    /// Unix user ids (socket peer credentials) that are this principal.
    pub uids: Vec<u32>,
    /// Unix group ids (the peer's primary group) that are this principal.
    pub gids: Vec<u32>,
    /// SHA-256 of the principal's bearer token, if it has one.
    pub token_sha256: Option<[u8; 32]>,
    /// The VMs this principal may see and use.
    pub vms: Vec<VmSelector>,
    /// The commands this principal may run on those VMs.
    pub commands: Vec<CommandSelector>,
    /// Whether it may push programs.
    pub push: bool,
    /// Whether it may read the audit log.
    pub audit: bool,
    /// Whether it may read the executions other principals started (on its VMs).
    pub read_all: bool,
    /// Whether it may cancel the executions other principals started (on its VMs).
    pub cancel_all: bool,
}

/// An entry of a principal's `vms`: which VMs it covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VmSelector {
    /// `"*"`: every VM.
    All,
    /// A VM name (checked to exist when the file is loaded).
    Name(String),
    /// `"key=value"`: every VM with that label.
    Label {
        /// The label's key.
        key: String,
        /// The value it must have.
        value: String,
    },
}

impl VmSelector {
    /// Whether `vm` is covered.
    pub fn matches(&self, vm: &VmConfig) -> bool {
        match self {
            Self::All => true,
            Self::Name(name) => vm.name == *name,
            Self::Label { key, value } => vm.has_label(key, value),
        }
    }
}

impl FromStr for VmSelector {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        if s == "*" {
            Ok(Self::All)
        } else if s.contains('=') {
            let (key, value) = parse_label(s)?;
            Ok(Self::Label { key, value })
        } else if is_name(s) {
            Ok(Self::Name(s.to_owned()))
        } else {
            Err(SyntaxError::VmName(s.to_owned()))
        }
    }
}

impl fmt::Display for VmSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Name(name) => f.write_str(name),
            Self::Label { key, value } => write!(f, "{key}={value}"),
        }
    }
}

/// An entry of a principal's `commands`: which commands it covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CommandSelector {
    /// `"*"`: every command the VM's allow-list has.
    All,
    /// One command, by its allow-list name.
    Name(String),
}

impl CommandSelector {
    /// Whether `command` is covered.
    pub fn matches(&self, command: &str) -> bool {
        match self {
            Self::All => true,
            Self::Name(name) => name == command,
        }
    }
}

impl FromStr for CommandSelector {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        if s == "*" {
            Ok(Self::All)
        } else if is_command_name(s) {
            Ok(Self::Name(s.to_owned()))
        } else {
            Err(SyntaxError::CommandName(s.to_owned()))
        }
    }
}

impl fmt::Display for CommandSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// What a CLI or API call runs on, as written there: `web1`, `web1,web2`, `role=web`, or
/// `*` (the CLI's `--all`).
///
/// It converts to and from that string, also through serde, so an API request can carry
/// it as one JSON string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Target {
    /// One VM by name.
    Name(String),
    /// Several VMs by name (two or more, no repeats, in the order given).
    Names(Vec<String>),
    /// Every VM with label `key` set to `value`.
    Label {
        /// The label's key.
        key: String,
        /// The value it must have.
        value: String,
    },
    /// Every VM.
    All,
}

impl Target {
    /// Parses a target as written on the command line or in a request.
    pub fn parse(s: &str) -> Result<Self, SyntaxError> {
        if s.is_empty() {
            return Err(SyntaxError::EmptyTarget);
        }
        if s == "*" {
            return Ok(Self::All);
        }
        if s.contains('=') {
            if s.contains(',') {
                return Err(SyntaxError::Label(s.to_owned()));
            }
            let (key, value) = parse_label(s)?;
            return Ok(Self::Label { key, value });
        }
        if !s.contains(',') {
            return if is_name(s) {
                Ok(Self::Name(s.to_owned()))
            } else {
                Err(SyntaxError::VmName(s.to_owned()))
            };
        }
        let mut names: Vec<String> = Vec::new();
        for name in s.split(',') {
            if !is_name(name) {
                return Err(SyntaxError::VmName(name.to_owned()));
            }
            if !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        Ok(match <[String; 1]>::try_from(names) {
            Ok([name]) => Self::Name(name),
            Err(names) => Self::Names(names),
        })
    }
}

impl FromStr for Target {
    type Err = SyntaxError;

    fn from_str(s: &str) -> Result<Self, SyntaxError> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Target {
    type Error = SyntaxError;

    fn try_from(s: String) -> Result<Self, SyntaxError> {
        Self::parse(&s)
    }
}

impl From<Target> for String {
    fn from(target: Target) -> String {
        target.to_string()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Names(names) => f.write_str(&names.join(",")),
            Self::Label { key, value } => write!(f, "{key}={value}"),
            Self::All => f.write_str("*"),
        }
    }
}

/// A VM name, label, selector or target string that is not well-formed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SyntaxError {
    /// An empty target.
    #[error("empty target: expected a vm name, a comma list of names, label=value or *")]
    EmptyTarget,
    /// Not a valid VM name.
    #[error(
        "{0:?} is not a valid vm name: expected 1 to 63 of a-z, 0-9, '_', '.', '-', \
         starting with a letter or digit"
    )]
    VmName(String),
    /// Not a valid `key=value` label selector.
    #[error(
        "{0:?} is not a valid label selector: expected key=value, each 1 to 63 of A-Z, a-z, \
         0-9, '_', '.', '-'"
    )]
    Label(String),
    /// Not a valid command name.
    #[error(
        "{0:?} is not a valid command: expected * or a command name (1 to 64 of A-Z, a-z, \
         0-9, '.', '_', '-')"
    )]
    CommandName(String),
}

/// A [`Target`] that does not resolve to VMs of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectError {
    /// Names that are not VMs of the configuration (in the order given).
    #[error("unknown vm{}: {}", if .0.len() == 1 { "" } else { "s" }, quoted_list(.0))]
    UnknownVms(Vec<String>),
    /// A label selector that matches no VM.
    #[error("no vm has label {key}={value}")]
    NoMatch {
        /// The label's key.
        key: String,
        /// The value asked for.
        value: String,
    },
}

fn quoted_list(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    quoted.join(", ")
}

/// A line and column in a configuration file, both counted from 1 (the column in
/// characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl Position {
    /// The position of byte `offset` in `text` (clamped to the text's end).
    pub fn of_offset(text: &str, offset: usize) -> Self {
        let mut offset = offset.min(text.len());
        while !text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

/// A configuration file that cannot be used: which file, where in it, and what is wrong.
///
/// Displays as `origin:line:column: problem` (or `origin: problem` when no position is
/// known), the way compilers report. The message is complete: there is no `source()` to
/// print after it.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    origin: String,
    position: Option<Position>,
    kind: Box<ConfigErrorKind>,
}

impl ConfigError {
    /// The file's name as given to [`HostConfig::load`] or [`HostConfig::parse`].
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Where in the file, when known.
    pub fn position(&self) -> Option<Position> {
        self.position
    }

    /// The line, when known.
    pub fn line(&self) -> Option<usize> {
        self.position.map(|p| p.line)
    }

    /// What is wrong.
    pub fn kind(&self) -> &ConfigErrorKind {
        &self.kind
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(Position { line, column }) => {
                write!(f, "{}:{line}:{column}: {}", self.origin, self.kind)
            }
            None => write!(f, "{}: {}", self.origin, self.kind),
        }
    }
}

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Read(io::Error),
    /// Not TOML, or not the shape of `host.toml` (unknown or missing field, wrong type),
    /// as `toml` and `serde` word it.
    #[error("{0}")]
    Syntax(String),
    /// A `[daemon]` setting out of range or malformed.
    #[error("[daemon] {field}: {reason}")]
    Daemon {
        /// The setting.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// A `[budget]` or `[records]` setting out of range.
    #[error("[{table}] {field}: {reason}")]
    Limit {
        /// `budget` or `records`.
        table: &'static str,
        /// The setting.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// A VM name that is not well-formed.
    #[error("vm name: {0}")]
    VmName(SyntaxError),
    /// Two VMs with one name.
    #[error("duplicate vm {name:?} (first defined on line {first_line})")]
    DuplicateVm {
        /// The name.
        name: String,
        /// Line of the first definition.
        first_line: usize,
    },
    /// A label whose key or value is not well-formed.
    #[error(
        "vm {vm:?}: label {key:?} = {value:?} is not valid: keys and values are 1 to 63 of \
         A-Z, a-z, 0-9, '_', '.', '-'"
    )]
    Label {
        /// The VM.
        vm: String,
        /// The label's key.
        key: String,
        /// Its value.
        value: String,
    },
    /// A VM without `channel`.
    #[error("vm {0:?} needs \"channel\": \"plain\" or \"doorbell\"")]
    MissingChannel(String),
    /// A channel without the field its kind needs (`path` for plain, `socket` for doorbell).
    #[error("vm {vm:?}: channel {channel:?} needs {field:?}")]
    MissingChannelField {
        /// The VM.
        vm: String,
        /// `"plain"` or `"doorbell"`.
        channel: &'static str,
        /// `"path"` or `"socket"`.
        field: &'static str,
    },
    /// A field that belongs to the other kind of channel.
    #[error("vm {vm:?}: {field:?} does not apply to channel {channel:?}")]
    ChannelFieldNotAllowed {
        /// The VM.
        vm: String,
        /// `"plain"` or `"doorbell"`.
        channel: &'static str,
        /// `"path"`, `"socket"` or `"qemu_user"`.
        field: &'static str,
    },
    /// A `path` or `socket` another VM uses already.
    #[error("vm {vm:?}: {field:?} {path:?} is already used by vm {other:?}")]
    SharedPath {
        /// The later VM.
        vm: String,
        /// `"path"` or `"socket"`.
        field: &'static str,
        /// The path.
        path: PathBuf,
        /// The earlier VM.
        other: String,
    },
    /// An empty `path` or `socket`.
    #[error("vm {vm:?}: {field:?} is empty")]
    EmptyPath {
        /// The VM.
        vm: String,
        /// `"path"` or `"socket"`.
        field: &'static str,
    },
    /// A region size that is malformed, not a power of two or out of range.
    #[error("vm {vm:?}: size {size} {reason}")]
    Size {
        /// The VM.
        vm: String,
        /// The size as written (strings quoted).
        size: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A principal name that is not well-formed.
    #[error(
        "principal name {0:?} is not valid: expected 1 to 63 of a-z, 0-9, '_', '.', '-', \
         starting with a letter or digit"
    )]
    PrincipalName(String),
    /// Two principals with one name.
    #[error("duplicate principal {name:?} (first defined on line {first_line})")]
    DuplicatePrincipal {
        /// The name.
        name: String,
        /// Line of the first definition.
        first_line: usize,
    },
    /// A principal nobody could be: no uids, no gids, no token.
    #[error("principal {0:?} has no uids, gids or token_sha256: no caller could be it")]
    NoIdentity(String),
    /// A `token_sha256` that is not 64 hex digits.
    #[error(
        "principal {0:?}: token_sha256 must be 64 hex digits (the SHA-256 of the token, never \
         the token itself)"
    )]
    TokenHash(String),
    /// Two principals with the same token.
    #[error("principal {principal:?} has the same token as principal {other:?}")]
    DuplicateToken {
        /// The later principal.
        principal: String,
        /// The earlier one.
        other: String,
    },
    /// A `vms` or `commands` entry that is not well-formed.
    #[error("principal {principal:?}: {error}")]
    Selector {
        /// The principal.
        principal: String,
        /// What is wrong.
        error: SyntaxError,
    },
    /// A `vms` entry naming a VM the file does not define.
    #[error("principal {principal:?}: vm {vm:?} is not defined")]
    UnknownVm {
        /// The principal.
        principal: String,
        /// The name.
        vm: String,
    },
}

impl HostConfig {
    /// Reads and checks the configuration file at `path`; errors name it as given.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &origin),
            Err(e) => Err(ConfigError {
                origin,
                position: None,
                kind: Box::new(ConfigErrorKind::Read(e)),
            }),
        }
    }

    /// Parses and checks configuration `text`; errors name it `origin` (a file name).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let fail = |span: Option<Range<usize>>, kind: ConfigErrorKind| ConfigError {
            origin: origin.to_owned(),
            position: span.map(|s| Position::of_offset(text, s.start)),
            kind: Box::new(kind),
        };
        let raw: RawFile = toml::from_str(text)
            .map_err(|e| fail(e.span(), ConfigErrorKind::Syntax(e.message().to_owned())))?;
        let line_of = |span: Range<usize>| Position::of_offset(text, span.start).line;
        raw.check(line_of)
            .map_err(|(span, kind)| fail(Some(span), kind))
    }

    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmConfig> {
        self.vms.iter().find(|vm| vm.name == name)
    }

    /// The principal named `name`.
    pub fn principal(&self, name: &str) -> Option<&PrincipalConfig> {
        self.principals.iter().find(|p| p.name == name)
    }

    /// The VMs `target` designates: names in the order given, label and all in file order.
    /// Every unknown name is reported at once; a label no VM has is an error too.
    pub fn select_vms(&self, target: &Target) -> Result<Vec<&VmConfig>, SelectError> {
        match target {
            Target::All => Ok(self.vms.iter().collect()),
            Target::Label { key, value } => {
                let vms: Vec<&VmConfig> = self
                    .vms
                    .iter()
                    .filter(|vm| vm.has_label(key, value))
                    .collect();
                if vms.is_empty() {
                    Err(SelectError::NoMatch {
                        key: key.clone(),
                        value: value.clone(),
                    })
                } else {
                    Ok(vms)
                }
            }
            Target::Name(name) => self.select_names(std::slice::from_ref(name)),
            Target::Names(names) => self.select_names(names),
        }
    }

    fn select_names(&self, names: &[String]) -> Result<Vec<&VmConfig>, SelectError> {
        let mut found = Vec::with_capacity(names.len());
        let mut unknown = Vec::new();
        for name in names {
            match self.vm(name) {
                Some(vm) => found.push(vm),
                None => unknown.push(name.clone()),
            }
        }
        if unknown.is_empty() {
            Ok(found)
        } else {
            Err(SelectError::UnknownVms(unknown))
        }
    }
}

/// `[a-z0-9][a-z0-9_.-]{0,62}`: VM and principal names.
fn is_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    first_ok
        && s.len() <= MAX_NAME_LEN
        && bytes.all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
        })
}

/// `[A-Za-z0-9_.-]{1,63}`: label keys and values.
fn is_label_part(s: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The agent's command names: `[A-Za-z0-9._-]{1,64}`.
fn is_command_name(s: &str) -> bool {
    (1..=MAX_COMMAND_NAME_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `key=value`, split at the first `=`.
fn parse_label(s: &str) -> Result<(String, String), SyntaxError> {
    match s.split_once('=') {
        Some((key, value)) if is_label_part(key) && is_label_part(value) => {
            Ok((key.to_owned(), value.to_owned()))
        }
        _ => Err(SyntaxError::Label(s.to_owned())),
    }
}

/// Parses a region size: bytes as an integer, or a string of digits with an optional
/// `K`/`KiB`/`M`/`MiB`/`G`/`GiB` suffix (binary units, any case). It must be a power of two
/// in [`MIN_REGION_SIZE`]..=[`MAX_REGION_SIZE`].
pub fn parse_size(s: &str) -> Result<usize, &'static str> {
    const MALFORMED: &str = "is not a size: expected bytes, or a number followed by K or M";
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(MALFORMED);
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return Err(MALFORMED),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .unwrap_or(u64::MAX);
    check_size(bytes)
}

fn check_size(bytes: u64) -> Result<usize, &'static str> {
    const RANGE: &str = "must be between 64K and 64M";
    let size = usize::try_from(bytes).map_err(|_| RANGE)?;
    if !(MIN_REGION_SIZE..=MAX_REGION_SIZE).contains(&size) {
        Err(RANGE)
    } else if !size.is_power_of_two() {
        Err("must be a power of two")
    } else {
        Ok(size)
    }
}

// ---- The file as serde reads it, before it is checked. ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    budget: limits::RawBudget,
    #[serde(default)]
    records: limits::RawRecords,
    #[serde(default)]
    callers: limits::RawCallers,
    #[serde(default)]
    console: console::RawConsole,
    fleet: Option<fleet::RawFleet>,
    #[serde(default)]
    vm: Vec<RawVm>,
    #[serde(default)]
    principal: Vec<RawPrincipal>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    socket: Option<Spanned<PathBuf>>,
    state_dir: Option<Spanned<PathBuf>>,
    socket_mode: Option<Spanned<String>>,
    tcp: Option<Spanned<String>>,
    tls_cert: Option<Spanned<PathBuf>>,
    tls_key: Option<Spanned<PathBuf>>,
    insecure_plaintext: Option<Spanned<bool>>,
    output_cap: Option<Spanned<u64>>,
    delivery_timeout_ms: Option<Spanned<u64>>,
    heartbeat_timeout_ms: Option<Spanned<u64>>,
    command_refresh_s: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: Spanned<String>,
    #[serde(default)]
    labels: Option<Spanned<BTreeMap<String, String>>>,
    channel: Option<Spanned<ChannelKind>>,
    path: Option<Spanned<PathBuf>>,
    socket: Option<Spanned<PathBuf>>,
    size: Option<Spanned<RawSize>>,
    qemu_user: Option<Spanned<UnixUser>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ChannelKind {
    Plain,
    Doorbell,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    name: Spanned<String>,
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    token_sha256: Option<Spanned<String>>,
    #[serde(default)]
    vms: Vec<Spanned<String>>,
    #[serde(default)]
    commands: Vec<Spanned<String>>,
    #[serde(default)]
    push: bool,
    #[serde(default)]
    audit: bool,
    #[serde(default)]
    read_all: bool,
    #[serde(default)]
    cancel_all: bool,
}

/// A `size` as written: a string with a unit, or an integer of bytes.
enum RawSize {
    Text(String),
    Bytes(i64),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: bytes, or a string like \"1M\" or \"64K\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

impl RawSize {
    fn bytes(&self) -> Result<usize, &'static str> {
        match self {
            Self::Text(s) => parse_size(s),
            Self::Bytes(n) => match u64::try_from(*n) {
                Ok(n) => check_size(n),
                Err(_) => Err("must be between 64K and 64M"),
            },
        }
    }
}

impl fmt::Display for RawSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text(s) => write!(f, "{s:?}"),
            Self::Bytes(n) => write!(f, "{n}"),
        }
    }
}

/// A check failure: where, and what.
type Failure = (Range<usize>, ConfigErrorKind);

impl RawFile {
    fn check(self, line_of: impl Fn(Range<usize>) -> usize) -> Result<HostConfig, Failure> {
        let daemon = self.daemon.check()?;
        let budget = self.budget.check()?;
        let records = self.records.check()?;
        let callers = self.callers.check()?;
        let console = self.console.check()?;
        let fleet_span = self.fleet.as_ref().map(|f| f.principal_span());
        let fleet = self.fleet.map(fleet::RawFleet::check).transpose()?;

        let mut vms = Vec::with_capacity(self.vm.len());
        let mut vm_lines: HashMap<String, usize> = HashMap::new();
        for raw in self.vm {
            let span = raw.name.span();
            let path_span = raw.path.as_ref().or(raw.socket.as_ref()).map(Spanned::span);
            let vm = raw.check()?;
            if let Some(&first_line) = vm_lines.get(&vm.name) {
                let name = vm.name;
                return Err((span, ConfigErrorKind::DuplicateVm { name, first_line }));
            }
            let (field, path) = vm.channel.path();
            if let Some(other) = vms.iter().find(|o: &&VmConfig| o.channel.path().1 == path) {
                let kind = ConfigErrorKind::SharedPath {
                    vm: vm.name.clone(),
                    field,
                    path: path.to_owned(),
                    other: other.name.clone(),
                };
                return Err((path_span.unwrap_or(span), kind));
            }
            vm_lines.insert(vm.name.clone(), line_of(span));
            vms.push(vm);
        }

        let mut principals: Vec<PrincipalConfig> = Vec::with_capacity(self.principal.len());
        let mut principal_lines: HashMap<String, usize> = HashMap::new();
        for raw in self.principal {
            let span = raw.name.span();
            let principal = raw.check(&vm_lines)?;
            if let Some(&first_line) = principal_lines.get(&principal.name) {
                let name = principal.name;
                return Err((
                    span,
                    ConfigErrorKind::DuplicatePrincipal { name, first_line },
                ));
            }
            if let Some(hash) = principal.token_sha256
                && let Some(other) = principals.iter().find(|p| p.token_sha256 == Some(hash))
            {
                let kind = ConfigErrorKind::DuplicateToken {
                    principal: principal.name,
                    other: other.name.clone(),
                };
                return Err((span, kind));
            }
            principal_lines.insert(principal.name.clone(), line_of(span));
            principals.push(principal);
        }
        if let (Some(f), Some(span)) = (&fleet, fleet_span)
            && !principals.iter().any(|p| p.name == f.principal)
        {
            return Err(limits::table_error(
                "fleet",
                span,
                "principal",
                &format!("{:?} is not a [[principal]] of this file", f.principal),
            ));
        }

        Ok(HostConfig {
            daemon,
            vms,
            principals,
            budget,
            records,
            callers,
            console,
            fleet,
        })
    }
}

fn daemon_error(span: Range<usize>, field: &'static str, reason: impl Into<String>) -> Failure {
    let reason = reason.into();
    (span, ConfigErrorKind::Daemon { field, reason })
}

fn nonzero(value: Option<Spanned<u64>>, field: &'static str) -> Result<Option<u64>, Failure> {
    match value {
        Some(v) if *v.get_ref() == 0 => {
            Err(daemon_error(v.span(), field, "must be greater than 0"))
        }
        Some(v) => Ok(Some(v.into_inner())),
        None => Ok(None),
    }
}

fn path_setting(
    value: Option<Spanned<PathBuf>>,
    field: &'static str,
    default: &str,
) -> Result<PathBuf, Failure> {
    match value {
        Some(v) if v.get_ref().as_os_str().is_empty() => {
            Err(daemon_error(v.span(), field, "must not be empty"))
        }
        Some(v) => Ok(v.into_inner()),
        None => Ok(PathBuf::from(default)),
    }
}

impl RawDaemon {
    fn check(self) -> Result<DaemonConfig, Failure> {
        let defaults = DaemonConfig::default();
        let socket_mode = match self.socket_mode {
            Some(mode) => {
                let text = mode.get_ref();
                let valid = (1..=4).contains(&text.len())
                    && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
                match u32::from_str_radix(text, 8) {
                    Ok(bits) if valid && bits <= 0o777 => bits,
                    _ => {
                        let reason =
                            format!("{text:?} is not permission bits in octal like \"0660\"");
                        return Err(daemon_error(mode.span(), "socket_mode", reason));
                    }
                }
            }
            None => defaults.socket_mode,
        };
        let tcp_span = self.tcp.as_ref().map(Spanned::span);
        let tcp = match self.tcp {
            Some(addr) => match addr.get_ref().parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    let reason = format!(
                        "{:?} is not an IP address and port like \"127.0.0.1:7433\"",
                        addr.get_ref()
                    );
                    return Err(daemon_error(addr.span(), "tcp", reason));
                }
            },
            None => None,
        };
        let tls = match (self.tls_cert, self.tls_key) {
            (None, None) => None,
            (Some(cert), None) => {
                return Err(daemon_error(cert.span(), "tls_cert", "needs tls_key too"));
            }
            (None, Some(key)) => {
                return Err(daemon_error(key.span(), "tls_key", "needs tls_cert too"));
            }
            (Some(cert), Some(key)) => {
                if tcp.is_none() {
                    let reason = "applies to the TCP listener: set tcp too";
                    return Err(daemon_error(cert.span(), "tls_cert", reason));
                }
                let cert = path_setting(Some(cert), "tls_cert", "")?;
                let key = path_setting(Some(key), "tls_key", "")?;
                Some(TlsFiles { cert, key })
            }
        };
        let insecure_plaintext = self.insecure_plaintext.map(Spanned::into_inner);
        if let Some(addr) = tcp
            && tls.is_none()
            && !addr.ip().is_loopback()
            && insecure_plaintext != Some(true)
        {
            let reason = format!(
                "{addr} is not a loopback address: bearer tokens would cross the network in \
                 clear text. Serve it with TLS (tls_cert and tls_key), or set \
                 insecure_plaintext = true to accept that"
            );
            return Err(daemon_error(tcp_span.unwrap_or(0..0), "tcp", reason));
        }
        let output_cap = match self.output_cap {
            Some(cap) => match usize::try_from(*cap.get_ref()) {
                Ok(c) if c > 0 => c,
                Ok(_) => {
                    return Err(daemon_error(
                        cap.span(),
                        "output_cap",
                        "must be greater than 0",
                    ));
                }
                Err(_) => return Err(daemon_error(cap.span(), "output_cap", "is too large")),
            },
            None => defaults.output_cap,
        };
        let millis = |v: Option<u64>, default| v.map_or(default, Duration::from_millis);
        Ok(DaemonConfig {
            socket: path_setting(self.socket, "socket", DEFAULT_SOCKET)?,
            state_dir: path_setting(self.state_dir, "state_dir", DEFAULT_STATE_DIR)?,
            socket_mode,
            tcp,
            tls,
            insecure_plaintext: insecure_plaintext.unwrap_or(false),
            output_cap,
            delivery_timeout: millis(
                nonzero(self.delivery_timeout_ms, "delivery_timeout_ms")?,
                defaults.delivery_timeout,
            ),
            heartbeat_timeout: millis(
                nonzero(self.heartbeat_timeout_ms, "heartbeat_timeout_ms")?,
                defaults.heartbeat_timeout,
            ),
            command_refresh: nonzero(self.command_refresh_s, "command_refresh_s")?
                .map_or(defaults.command_refresh, Duration::from_secs),
        })
    }
}

impl RawVm {
    fn check(self) -> Result<VmConfig, Failure> {
        let name_span = self.name.span();
        let name = self.name.into_inner();
        if !is_name(&name) {
            return Err((
                name_span,
                ConfigErrorKind::VmName(SyntaxError::VmName(name)),
            ));
        }

        let labels = match self.labels {
            Some(labels) => {
                let span = labels.span();
                let labels = labels.into_inner();
                for (key, value) in &labels {
                    if !is_label_part(key) || !is_label_part(value) {
                        let kind = ConfigErrorKind::Label {
                            vm: name,
                            key: key.clone(),
                            value: value.clone(),
                        };
                        return Err((span, kind));
                    }
                }
                labels
            }
            None => BTreeMap::new(),
        };

        let size = match self.size {
            Some(size) => match size.get_ref().bytes() {
                Ok(bytes) => bytes,
                Err(reason) => {
                    let kind = ConfigErrorKind::Size {
                        vm: name,
                        size: size.get_ref().to_string(),
                        reason,
                    };
                    return Err((size.span(), kind));
                }
            },
            None => DEFAULT_REGION_SIZE,
        };

        let Some(channel) = self.channel else {
            return Err((name_span, ConfigErrorKind::MissingChannel(name)));
        };
        let channel_span = channel.span();
        let (kind, wanted, unwanted, wanted_name, unwanted_name) = match *channel.get_ref() {
            ChannelKind::Plain => ("plain", self.path, self.socket, "path", "socket"),
            ChannelKind::Doorbell => ("doorbell", self.socket, self.path, "socket", "path"),
        };
        if let Some(extra) = unwanted {
            let kind = ConfigErrorKind::ChannelFieldNotAllowed {
                vm: name,
                channel: kind,
                field: unwanted_name,
            };
            return Err((extra.span(), kind));
        }
        let Some(path) = wanted else {
            let kind = ConfigErrorKind::MissingChannelField {
                vm: name,
                channel: kind,
                field: wanted_name,
            };
            return Err((channel_span, kind));
        };
        if path.get_ref().as_os_str().is_empty() {
            let kind = ConfigErrorKind::EmptyPath {
                vm: name,
                field: wanted_name,
            };
            return Err((path.span(), kind));
        }
        let path = path.into_inner();
        let channel = match channel.into_inner() {
            ChannelKind::Plain => {
                if let Some(user) = self.qemu_user {
                    let kind = ConfigErrorKind::ChannelFieldNotAllowed {
                        vm: name,
                        channel: "plain",
                        field: "qemu_user",
                    };
                    return Err((user.span(), kind));
                }
                ChannelConfig::Plain { path, size }
            }
            ChannelKind::Doorbell => ChannelConfig::Doorbell {
                socket: path,
                size,
                qemu_user: self.qemu_user.map(Spanned::into_inner),
            },
        };
        Ok(VmConfig {
            name,
            labels,
            channel,
        })
    }
}

impl RawPrincipal {
    fn check(self, vms: &HashMap<String, usize>) -> Result<PrincipalConfig, Failure> {
        let name_span = self.name.span();
        let name = self.name.into_inner();
        if !is_name(&name) {
            return Err((name_span, ConfigErrorKind::PrincipalName(name)));
        }

        let token_sha256 = match self.token_sha256 {
            Some(hash) => {
                let text = hash.get_ref();
                let mut bytes = [0u8; 32];
                if text.len() != 64 || hex::decode_to_slice(text, &mut bytes).is_err() {
                    return Err((hash.span(), ConfigErrorKind::TokenHash(name)));
                }
                Some(bytes)
            }
            None => None,
        };
        if self.uids.is_empty() && self.gids.is_empty() && token_sha256.is_none() {
            return Err((name_span, ConfigErrorKind::NoIdentity(name)));
        }

        let mut selectors = Vec::with_capacity(self.vms.len());
        for entry in self.vms {
            let selector = match entry.get_ref().parse::<VmSelector>() {
                Ok(s) => s,
                Err(error) => {
                    let kind = ConfigErrorKind::Selector {
                        principal: name,
                        error,
                    };
                    return Err((entry.span(), kind));
                }
            };
            if let VmSelector::Name(vm) = &selector
                && !vms.contains_key(vm)
            {
                let kind = ConfigErrorKind::UnknownVm {
                    principal: name,
                    vm: vm.clone(),
                };
                return Err((entry.span(), kind));
            }
            if !selectors.contains(&selector) {
                selectors.push(selector);
            }
        }

        let mut commands = Vec::with_capacity(self.commands.len());
        for entry in self.commands {
            match entry.get_ref().parse::<CommandSelector>() {
                Ok(c) if commands.contains(&c) => {}
                Ok(c) => commands.push(c),
                Err(error) => {
                    let kind = ConfigErrorKind::Selector {
                        principal: name,
                        error,
                    };
                    return Err((entry.span(), kind));
                }
            }
        }

        Ok(PrincipalConfig {
            name,
            uids: dedup(self.uids),
            gids: dedup(self.gids),
            token_sha256,
            vms: selectors,
            commands,
            push: self.push,
            audit: self.audit,
            read_all: self.read_all,
            cancel_all: self.cancel_all,
        })
    }
}

/// `ids` without repeats, in first-seen order.
fn dedup(ids: Vec<u32>) -> Vec<u32> {
    let mut seen = BTreeSet::new();
    ids.into_iter().filter(|id| seen.insert(*id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four lines: a valid plain VM `web1`.
    const WEB1: &str = "[[vm]]\nname = \"web1\"\nchannel = \"plain\"\npath = \"/dev/shm/web1\"\n";

    fn error(text: &str) -> String {
        match HostConfig::parse(text, "host.toml") {
            Ok(config) => panic!("accepted: {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn parse(text: &str) -> HostConfig {
        match HostConfig::parse(text, "host.toml") {
            Ok(config) => config,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(parse(""), HostConfig::default());
        let config = parse(&format!(
            "[daemon]\n{WEB1}[[principal]]\nname = \"p\"\nuids = [1]\n"
        ));
        assert_eq!(config.daemon, DaemonConfig::default());
        let daemon = &config.daemon;
        assert_eq!(daemon.socket, Path::new("/run/portless/portless.sock"));
        assert_eq!(daemon.state_dir, Path::new("/var/lib/portless"));
        assert_eq!(daemon.socket_mode, 0o660);
        assert_eq!(daemon.tcp, None);
        assert_eq!(daemon.output_cap, 16 << 20);
        assert_eq!(daemon.delivery_timeout, Duration::from_secs(30));
        assert_eq!(daemon.heartbeat_timeout, Duration::from_secs(5));
        assert_eq!(daemon.command_refresh, Duration::from_secs(300));
        let vm = &config.vms[0];
        assert!(vm.labels.is_empty());
        assert_eq!(
            vm.channel,
            ChannelConfig::Plain {
                path: PathBuf::from("/dev/shm/web1"),
                size: 1 << 20
            }
        );
        let p = &config.principals[0];
        assert_eq!(p.gids, Vec::<u32>::new());
        assert_eq!(p.token_sha256, None);
        assert!(p.vms.is_empty() && p.commands.is_empty());
        assert!(!p.push && !p.audit && !p.read_all && !p.cancel_all);
    }

    #[test]
    fn daemon_settings() {
        let config = parse(
            "[daemon]\nsocket = \"/tmp/p.sock\"\nstate_dir = \"state\"\nsocket_mode = \"600\"\n\
             tcp = \"[::1]:80\"\noutput_cap = 10\ndelivery_timeout_ms = 1500\n\
             heartbeat_timeout_ms = 20\ncommand_refresh_s = 7\ntls_cert = \"c.pem\"\n\
             tls_key = \"k.pem\"\n",
        );
        let expected = DaemonConfig {
            socket: PathBuf::from("/tmp/p.sock"),
            state_dir: PathBuf::from("state"),
            socket_mode: 0o600,
            tcp: Some(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 80))),
            tls: Some(TlsFiles {
                cert: PathBuf::from("c.pem"),
                key: PathBuf::from("k.pem"),
            }),
            insecure_plaintext: false,
            output_cap: 10,
            delivery_timeout: Duration::from_millis(1500),
            heartbeat_timeout: Duration::from_millis(20),
            command_refresh: Duration::from_secs(7),
        };
        assert_eq!(config.daemon, expected);
    }

    #[test]
    fn a_tcp_listener_off_loopback_needs_tls_or_says_it_goes_without() {
        let err = error("[daemon]\ntcp = \"0.0.0.0:7433\"\n");
        assert!(
            err.starts_with("host.toml:2:7: [daemon] tcp: 0.0.0.0:7433 is not a loopback address"),
            "{err}"
        );
        assert!(err.contains("insecure_plaintext = true"), "{err}");
        let plain = parse("[daemon]\ntcp = \"0.0.0.0:7433\"\ninsecure_plaintext = true\n");
        assert!(plain.daemon.insecure_plaintext && plain.daemon.tls.is_none());
        let tls = parse("[daemon]\ntcp = \"10.1.2.3:7433\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\n");
        assert!(tls.daemon.tls.is_some());
        assert!(
            parse("[daemon]\ntcp = \"127.0.0.1:7433\"\n")
                .daemon
                .tls
                .is_none()
        );
        let err = error("[daemon]\ntcp = \"127.0.0.1:1\"\ntls_cert = \"/c\"\n");
        assert!(err.contains("tls_cert: needs tls_key too"), "{err}");
        let err = error("[daemon]\ntls_cert = \"/c\"\ntls_key = \"/k\"\n");
        assert!(err.contains("applies to the TCP listener"), "{err}");
    }

    #[test]
    fn shape_errors_name_file_line_and_column() {
        let cases = [
            (
                format!("{WEB1}nmae = \"x\"\n"),
                "host.toml:5:1: unknown field `nmae`, expected one of `name`, `labels`, \
                 `channel`, `path`, `socket`, `size`, `qemu_user`",
            ),
            (
                "\n[deamon]\n".to_owned(),
                "host.toml:2:2: unknown field `deamon`, expected one of `daemon`, `budget`, \
                 `records`, `callers`, `console`, `fleet`, `vm`, `principal`",
            ),
            (
                "[daemon]\n  sockt = \"/x\"\n".to_owned(),
                "host.toml:2:3: unknown field `sockt`, expected one of `socket`, `state_dir`, \
                 `socket_mode`, `tcp`, `tls_cert`, `tls_key`, `insecure_plaintext`, `output_cap`, `delivery_timeout_ms`, \
                 `heartbeat_timeout_ms`, `command_refresh_s`",
            ),
            (
                "[daemon]\noutput_cap = \"big\"\n".to_owned(),
                "host.toml:2:14: invalid type: string \"big\", expected u64",
            ),
            (
                "[[principal]]\nname = \"p\"\nuids = [-1]\n".to_owned(),
                "host.toml:3:9: invalid value: integer `-1`, expected u32",
            ),
            (
                "[[vm]]\nchannel = \"plain\"\n".to_owned(),
                "host.toml:1:1: missing field `name`",
            ),
            (
                "[[vm]]\nname = \"a\"\nchannel = \"plan\"\n".to_owned(),
                "host.toml:3:11: unknown variant `plan`, expected `plain` or `doorbell`",
            ),
            (
                format!("{WEB1}labels = {{ role = 1 }}\n"),
                "host.toml:5:19: invalid type: integer `1`, expected a string",
            ),
            (
                format!("{WEB1}size = 1.5\n"),
                "host.toml:5:8: invalid type: floating point `1.5`, expected a size: bytes, or \
                 a string like \"1M\" or \"64K\"",
            ),
            (
                "a = [".to_owned(),
                "host.toml:1:6: unclosed array, expected `]`",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(error(&text), expected, "{text}");
        }
    }

    #[test]
    fn daemon_errors() {
        let cases = [
            (
                "socket = \"\"",
                "host.toml:2:10: [daemon] socket: must not be empty",
            ),
            (
                "state_dir = \"\"",
                "host.toml:2:13: [daemon] state_dir: must not be empty",
            ),
            (
                "socket_mode = \"0968\"",
                "host.toml:2:15: [daemon] socket_mode: \"0968\" is not permission bits in \
                 octal like \"0660\"",
            ),
            (
                "socket_mode = \"4755\"",
                "host.toml:2:15: [daemon] socket_mode: \"4755\" is not permission bits in \
                 octal like \"0660\"",
            ),
            (
                "socket_mode = \"\"",
                "host.toml:2:15: [daemon] socket_mode: \"\" is not permission bits in octal \
                 like \"0660\"",
            ),
            (
                "tcp = \"localhost:7433\"",
                "host.toml:2:7: [daemon] tcp: \"localhost:7433\" is not an IP address and port \
                 like \"127.0.0.1:7433\"",
            ),
            (
                "output_cap = 0",
                "host.toml:2:14: [daemon] output_cap: must be greater than 0",
            ),
            (
                "delivery_timeout_ms = 0",
                "host.toml:2:23: [daemon] delivery_timeout_ms: must be greater than 0",
            ),
            (
                "heartbeat_timeout_ms = 0",
                "host.toml:2:24: [daemon] heartbeat_timeout_ms: must be greater than 0",
            ),
            (
                "command_refresh_s = 0",
                "host.toml:2:21: [daemon] command_refresh_s: must be greater than 0",
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(error(&format!("[daemon]\n{line}\n")), expected, "{line}");
        }
    }

    #[test]
    fn vm_errors() {
        let cases = [
            (
                "[[vm]]\nname = \"Web1\"\nchannel = \"plain\"\npath = \"/p\"\n".to_owned(),
                "host.toml:2:8: vm name: \"Web1\" is not a valid vm name: expected 1 to 63 of \
                 a-z, 0-9, '_', '.', '-', starting with a letter or digit",
            ),
            (
                format!(
                    "{WEB1}\n{}",
                    WEB1.replace("web1\"\nchannel", "web1\"\n\nchannel")
                ),
                "host.toml:7:8: duplicate vm \"web1\" (first defined on line 2)",
            ),
            (
                "[[vm]]\nname = \"a\"\npath = \"/p\"\n".to_owned(),
                "host.toml:2:8: vm \"a\" needs \"channel\": \"plain\" or \"doorbell\"",
            ),
            (
                "[[vm]]\nname = \"a\"\nchannel = \"plain\"\n".to_owned(),
                "host.toml:3:11: vm \"a\": channel \"plain\" needs \"path\"",
            ),
            (
                "[[vm]]\nname = \"a\"\nchannel = \"doorbell\"\n".to_owned(),
                "host.toml:3:11: vm \"a\": channel \"doorbell\" needs \"socket\"",
            ),
            (
                format!("{WEB1}socket = \"/s\"\n"),
                "host.toml:5:10: vm \"web1\": \"socket\" does not apply to channel \"plain\"",
            ),
            (
                "[[vm]]\nname = \"a\"\nchannel = \"doorbell\"\nsocket = \"/s\"\npath = \"/p\"\n"
                    .to_owned(),
                "host.toml:5:8: vm \"a\": \"path\" does not apply to channel \"doorbell\"",
            ),
            (
                "[[vm]]\nname = \"a\"\nchannel = \"plain\"\npath = \"\"\n".to_owned(),
                "host.toml:4:8: vm \"a\": \"path\" is empty",
            ),
            (
                format!("{WEB1}qemu_user = \"qemu\"\n"),
                "host.toml:5:13: vm \"web1\": \"qemu_user\" does not apply to channel \"plain\"",
            ),
            (
                format!(
                    "{WEB1}{}",
                    WEB1.replace("name = \"web1\"", "name = \"web2\"")
                ),
                "host.toml:8:8: vm \"web2\": \"path\" \"/dev/shm/web1\" is already used by vm \
                 \"web1\"",
            ),
            (
                format!("{WEB1}labels = {{ role = \"web server\" }}\n"),
                "host.toml:5:10: vm \"web1\": label \"role\" = \"web server\" is not valid: keys \
                 and values are 1 to 63 of A-Z, a-z, 0-9, '_', '.', '-'",
            ),
            (
                format!("{WEB1}labels = {{ \"a=b\" = \"c\" }}\n"),
                "host.toml:5:10: vm \"web1\": label \"a=b\" = \"c\" is not valid: keys and \
                 values are 1 to 63 of A-Z, a-z, 0-9, '_', '.', '-'",
            ),
            (
                format!("{WEB1}size = \"3M\"\n"),
                "host.toml:5:8: vm \"web1\": size \"3M\" must be a power of two",
            ),
            (
                format!("{WEB1}size = \"128M\"\n"),
                "host.toml:5:8: vm \"web1\": size \"128M\" must be between 64K and 64M",
            ),
            (
                format!("{WEB1}size = 4096\n"),
                "host.toml:5:8: vm \"web1\": size 4096 must be between 64K and 64M",
            ),
            (
                format!("{WEB1}size = -65536\n"),
                "host.toml:5:8: vm \"web1\": size -65536 must be between 64K and 64M",
            ),
            (
                format!("{WEB1}size = \"1 M\"\n"),
                "host.toml:5:8: vm \"web1\": size \"1 M\" is not a size: expected bytes, or a \
                 number followed by K or M",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(error(&text), expected, "{text}");
        }
    }

    #[test]
    fn principal_errors() {
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let cases = [
            (
                "[[principal]]\nname = \"CI\"\nuids = [1]\n".to_owned(),
                "host.toml:6:8: principal name \"CI\" is not valid: expected 1 to 63 of a-z, \
                 0-9, '_', '.', '-', starting with a letter or digit",
            ),
            (
                "[[principal]]\nname = \"ci\"\nuids = [1]\n\n[[principal]]\nname = \"ci\"\n\
                 gids = [2]\n"
                    .to_owned(),
                "host.toml:10:8: duplicate principal \"ci\" (first defined on line 6)",
            ),
            (
                "[[principal]]\nname = \"ci\"\nvms = [\"*\"]\n".to_owned(),
                "host.toml:6:8: principal \"ci\" has no uids, gids or token_sha256: no caller \
                 could be it",
            ),
            (
                "[[principal]]\nname = \"ci\"\ntoken_sha256 = \"abc\"\n".to_owned(),
                "host.toml:7:16: principal \"ci\": token_sha256 must be 64 hex digits (the \
                 SHA-256 of the token, never the token itself)",
            ),
            (
                format!(
                    "[[principal]]\nname = \"ci\"\ntoken_sha256 = \"{}\"\n",
                    "g".repeat(64)
                ),
                "host.toml:7:16: principal \"ci\": token_sha256 must be 64 hex digits (the \
                 SHA-256 of the token, never the token itself)",
            ),
            (
                format!(
                    "[[principal]]\nname = \"a\"\ntoken_sha256 = \"{hash}\"\n[[principal]]\n\
                     name = \"b\"\ntoken_sha256 = \"{}\"\n",
                    hash.to_uppercase()
                ),
                "host.toml:9:8: principal \"b\" has the same token as principal \"a\"",
            ),
            (
                "[[principal]]\nname = \"ci\"\nuids = [1]\nvms = [\"*\", \"role==web\"]\n"
                    .to_owned(),
                "host.toml:8:13: principal \"ci\": \"role==web\" is not a valid label selector: \
                 expected key=value, each 1 to 63 of A-Z, a-z, 0-9, '_', '.', '-'",
            ),
            (
                "[[principal]]\nname = \"ci\"\nuids = [1]\nvms = [\"Web 1\"]\n".to_owned(),
                "host.toml:8:8: principal \"ci\": \"Web 1\" is not a valid vm name: expected 1 to \
                 63 of a-z, 0-9, '_', '.', '-', starting with a letter or digit",
            ),
            (
                "[[principal]]\nname = \"ci\"\nuids = [1]\nvms = [\"web1\", \"web9\"]\n".to_owned(),
                "host.toml:8:16: principal \"ci\": vm \"web9\" is not defined",
            ),
            (
                "[[principal]]\nname = \"ci\"\nuids = [1]\ncommands = [\"uname -a\"]\n".to_owned(),
                "host.toml:8:13: principal \"ci\": \"uname -a\" is not a valid command: expected \
                 * or a command name (1 to 64 of A-Z, a-z, 0-9, '.', '_', '-')",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(error(&format!("{WEB1}{text}")), expected, "{text}");
        }
    }

    #[test]
    fn read_errors_name_the_file() {
        let e = HostConfig::load("/nonexistent/portless/host.toml").err();
        let e = e.as_ref().map(|e| (e.to_string(), e.kind(), e.position()));
        assert!(
            matches!(
                &e,
                Some((text, ConfigErrorKind::Read(io), None))
                    if io.kind() == io::ErrorKind::NotFound
                        && text.starts_with("/nonexistent/portless/host.toml: cannot read: ")
            ),
            "{e:?}"
        );
    }

    #[test]
    fn error_accessors() {
        let e = HostConfig::parse(&format!("{WEB1}size = \"3M\"\n"), "x.toml").err();
        let e = e.as_ref();
        assert_eq!(e.map(ConfigError::origin), Some("x.toml"));
        assert_eq!(e.and_then(ConfigError::line), Some(5));
        assert_eq!(
            e.and_then(ConfigError::position),
            Some(Position { line: 5, column: 8 })
        );
        assert!(matches!(
            e.map(ConfigError::kind),
            Some(ConfigErrorKind::Size { vm, reason: "must be a power of two", .. }) if vm == "web1"
        ));
    }

    #[test]
    fn positions_count_characters() {
        let text = "a\nbé = 1\n";
        assert_eq!(
            Position::of_offset(text, 0),
            Position { line: 1, column: 1 }
        );
        assert_eq!(
            Position::of_offset(text, 2),
            Position { line: 2, column: 1 }
        );
        // The byte after 'é' (two bytes) is the third character of line 2.
        assert_eq!(
            Position::of_offset(text, 5),
            Position { line: 2, column: 3 }
        );
        // Inside 'é': its start.
        assert_eq!(
            Position::of_offset(text, 4),
            Position { line: 2, column: 2 }
        );
        assert_eq!(
            Position::of_offset(text, 100),
            Position { line: 3, column: 1 }
        );
    }

    #[test]
    fn qemu_user_is_a_name_or_a_uid() {
        let vm = |user: &str| {
            let config = parse(&format!(
                "[[vm]]\nname = \"d\"\nchannel = \"doorbell\"\nsocket = \"/s\"\n{user}"
            ));
            match &config.vms[0].channel {
                ChannelConfig::Doorbell { qemu_user, .. } => qemu_user.clone(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(vm(""), None);
        assert_eq!(
            vm("qemu_user = \"libvirt-qemu\"\n"),
            Some(UnixUser::Name("libvirt-qemu".to_owned()))
        );
        assert_eq!(vm("qemu_user = 64055\n"), Some(UnixUser::Id(64055)));
    }

    #[test]
    fn sizes() {
        let ok = [
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("128KiB", 128 << 10),
            ("1M", 1 << 20),
            ("4MiB", 4 << 20),
            ("64m", 64 << 20),
            ("1024K", 1 << 20),
            ("65536", 65536),
            ("67108864B", 64 << 20),
        ];
        for (text, bytes) in ok {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
        let range = "must be between 64K and 64M";
        let malformed = "is not a size: expected bytes, or a number followed by K or M";
        let bad = [
            ("32K", range),
            ("128M", range),
            ("1G", range),
            ("0", range),
            ("99999999999999999999999M", range),
            ("96K", "must be a power of two"),
            ("3M", "must be a power of two"),
            ("", malformed),
            ("M", malformed),
            ("1.5M", malformed),
            ("1MB", malformed),
            ("1 M", malformed),
            ("-1M", malformed),
        ];
        for (text, reason) in bad {
            assert_eq!(parse_size(text), Err(reason), "{text}");
        }
        let config = parse(&format!("{WEB1}size = 131072\n"));
        assert_eq!(config.vms[0].channel.size(), 128 << 10);
        let config = parse(&format!("{WEB1}size = \"64M\"\n"));
        assert_eq!(config.vms[0].channel.size(), 64 << 20);
    }

    fn vm(name: &str, labels: &[(&str, &str)]) -> VmConfig {
        VmConfig {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|&(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            channel: ChannelConfig::Plain {
                path: PathBuf::from(format!("/dev/shm/{name}")),
                size: DEFAULT_REGION_SIZE,
            },
        }
    }

    #[test]
    fn vm_selectors() {
        let web1 = vm("web1", &[("role", "web")]);
        let db1 = vm("db1", &[("role", "db")]);
        let all: VmSelector = "*".parse().unwrap();
        let name: VmSelector = "web1".parse().unwrap();
        let label: VmSelector = "role=web".parse().unwrap();
        assert_eq!(all, VmSelector::All);
        assert_eq!(name, VmSelector::Name("web1".to_owned()));
        assert_eq!(
            label,
            VmSelector::Label {
                key: "role".to_owned(),
                value: "web".to_owned()
            }
        );
        assert!(all.matches(&web1) && all.matches(&db1));
        assert!(name.matches(&web1) && !name.matches(&db1));
        assert!(label.matches(&web1) && !label.matches(&db1));
        let zone: VmSelector = "zone=web".parse().unwrap();
        assert!(!zone.matches(&web1));
        for s in ["*", "web1", "role=web"] {
            assert_eq!(s.parse::<VmSelector>().unwrap().to_string(), s);
        }
        for bad in [
            "", "Web1", "-a", "a b", "=web", "role=", "a=b=c", "**", "a,b",
        ] {
            assert!(bad.parse::<VmSelector>().is_err(), "{bad}");
        }
        assert_eq!("a".repeat(63).parse::<VmSelector>().map(|_| ()), Ok(()));
        assert!("a".repeat(64).parse::<VmSelector>().is_err());
    }

    #[test]
    fn command_selectors() {
        let all: CommandSelector = "*".parse().unwrap();
        let uname: CommandSelector = "uname".parse().unwrap();
        assert!(all.matches("reboot"));
        assert!(uname.matches("uname") && !uname.matches("unam") && !uname.matches("uname2"));
        assert_eq!(
            "Service.Status_2-x".parse::<CommandSelector>().map(|_| ()),
            Ok(())
        );
        assert_eq!(uname.to_string(), "uname");
        assert_eq!(all.to_string(), "*");
        for bad in ["", "a b", "a/b", "uname*"] {
            assert_eq!(
                bad.parse::<CommandSelector>(),
                Err(SyntaxError::CommandName(bad.to_owned()))
            );
        }
        assert!("c".repeat(65).parse::<CommandSelector>().is_err());
    }

    #[test]
    fn targets_parse() {
        let s = |v: &str| v.to_owned();
        let ok = [
            ("web1", Target::Name(s("web1"))),
            ("web1,db1", Target::Names(vec![s("web1"), s("db1")])),
            ("web1,db1,web1", Target::Names(vec![s("web1"), s("db1")])),
            ("web1,web1", Target::Name(s("web1"))),
            (
                "role=web",
                Target::Label {
                    key: s("role"),
                    value: s("web"),
                },
            ),
            ("*", Target::All),
        ];
        for (text, target) in ok {
            assert_eq!(Target::parse(text).as_ref(), Ok(&target), "{text}");
            assert_eq!(text.parse::<Target>().as_ref(), Ok(&target), "{text}");
        }
        for text in ["web1", "web1,db1", "role=web", "*"] {
            assert_eq!(Target::parse(text).map(|t| t.to_string()), Ok(s(text)));
        }
        let bad = [
            ("", SyntaxError::EmptyTarget),
            ("Web1", SyntaxError::VmName(s("Web1"))),
            ("web1,", SyntaxError::VmName(s(""))),
            ("web1,,db1", SyntaxError::VmName(s(""))),
            ("web1, db1", SyntaxError::VmName(s(" db1"))),
            ("role=web,db", SyntaxError::Label(s("role=web,db"))),
            ("role=", SyntaxError::Label(s("role="))),
            ("=web", SyntaxError::Label(s("=web"))),
        ];
        for (text, e) in bad {
            assert_eq!(Target::parse(text), Err(e), "{text}");
        }
        assert_eq!(
            Target::parse("").map_err(|e| e.to_string()),
            Err(s(
                "empty target: expected a vm name, a comma list of names, label=value or *"
            ))
        );
    }

    #[test]
    fn targets_through_serde() {
        let target = Target::Names(vec!["a".to_owned(), "b".to_owned()]);
        let json = serde_json::to_string(&target).unwrap();
        assert_eq!(json, "\"a,b\"");
        assert_eq!(serde_json::from_str::<Target>(&json).unwrap(), target);
        let e = serde_json::from_str::<Target>("\"A\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"A\" is not a valid vm name"), "{e}");
    }

    #[test]
    fn select_vms() {
        let config = HostConfig {
            vms: vec![
                vm("web1", &[("role", "web")]),
                vm("db1", &[("role", "db")]),
                vm("web2", &[("role", "web")]),
            ],
            ..HostConfig::default()
        };
        let names = |target: &str| {
            let target = Target::parse(target).unwrap();
            config
                .select_vms(&target)
                .map(|vms| vms.iter().map(|vm| vm.name.as_str()).collect::<Vec<_>>())
        };
        assert_eq!(names("db1"), Ok(vec!["db1"]));
        assert_eq!(names("web2,web1"), Ok(vec!["web2", "web1"]));
        assert_eq!(names("role=web"), Ok(vec!["web1", "web2"]));
        assert_eq!(names("*"), Ok(vec!["web1", "db1", "web2"]));
        assert_eq!(
            names("web3"),
            Err(SelectError::UnknownVms(vec!["web3".to_owned()]))
        );
        assert_eq!(
            names("web1,x,db1,y").map_err(|e| e.to_string()),
            Err("unknown vms: \"x\", \"y\"".to_owned())
        );
        assert_eq!(
            names("web3").map_err(|e| e.to_string()),
            Err("unknown vm: \"web3\"".to_owned())
        );
        assert_eq!(
            names("role=cache").map_err(|e| e.to_string()),
            Err("no vm has label role=cache".to_owned())
        );
        assert_eq!(config.vm("db1").map(|vm| vm.name.as_str()), Some("db1"));
        assert_eq!(config.vm("db2"), None);
        let empty = HostConfig::default();
        assert_eq!(empty.select_vms(&Target::All), Ok(vec![]));
    }
}
