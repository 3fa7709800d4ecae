//! The agent's allow-list: which commands the host may run, with which arguments, as which
//! user and within which limits. It is the agent's whole security policy, so it is parsed
//! strictly, checked completely when it loads, and then enforced on every request.
//!
//! # The file
//!
//! A strict subset of TOML, so that any TOML tool can check it:
//!
//! ```toml
//! [agent]                      # optional, at most once
//! max_running = 8              # concurrent executions, 1..=16 (default 8)
//! kill_grace_ms = 2000         # TERM -> KILL grace period (default 2000)
//! default_timeout_ms = 60000   # for commands without timeout_ms; 0 = none (default 60000)
//! default_max_output = 1048576 # bytes kept per stream (default 1 MiB)
//!
//! [push]                       # optional, at most once
//! enabled = false              # (default false)
//! max_bytes = 4194304          # (default 4 MiB)
//! dir = "/var/lib/portless-agent/push"
//! timeout_ms = 300000          # for pushed programs that are run (default 300000)
//! user = "root"                # optional: name or uid
//! group = "root"               # optional: name or gid
//!
//! [[command]]
//! name = "sleep"               # required, 1..=64 of [A-Za-z0-9._-], unique
//! description = "Sleep a while" # optional, <= 256 bytes
//! program = "/bin/sleep"       # required, absolute
//! args = ["{seconds}"]         # argv after argv[0]; "{param}" alone is replaced by the value
//! timeout_ms = 5000            # optional, 0 = none
//! max_output = 65536           # optional, bytes per stream
//! user = "nobody"              # optional: name or uid; without `group`, the user's
//!                              # primary group and its groups in /etc/group (initgroups)
//! group = 65534                # optional: name or gid; the only group the process has
//! cwd = "/"                    # optional, absolute
//! memory_max = 268435456       # optional, bytes (>= 1 MiB): cgroup memory.max
//! pids_max = 64                # optional, processes and threads: cgroup pids.max
//! cpu_max_percent = 50         # optional, percent of one CPU: cgroup cpu.max
//!                              # (a guest without these cgroup controllers refuses to
//!                              # start a command that sets them)
//! env = ["LANG=C"]             # optional, KEY=VALUE, keys unique
//!
//! [[command.param]]            # belongs to the last [[command]]; order = argument order
//! name = "seconds"             # [a-z0-9_]{1,32}, unique in the command
//! kind = "integer"             # "integer" (min, max), "choice" (choices) or
//! min = 1                      # "string" (charset, max_len, optional min_len <= 1024)
//! max = 3600
//! ```
//!
//! Strings are basic (`"..."`, TOML escapes) or literal (`'...'`); integers are decimal;
//! arrays may span lines and end with a comma. Other TOML (multi-line strings, floats,
//! dates, inline tables, dotted or quoted keys, other tables) is refused as
//! [`ConfigErrorKind::Unsupported`]; so are unknown, duplicate and missing keys. No string
//! may contain U+0000.
//!
//! An `args` element is a placeholder only if it is exactly `{name}` with `name` a valid
//! parameter name; it must then name a declared parameter, and every parameter must be used
//! by exactly one placeholder. Anything else is literal: `"x{a}"`, `"{}"` (for `find
//! -exec`) and `"{print $1}"` (for `awk`) pass through unchanged. Values are substituted as
//! whole argv elements, never through a shell.
//!
//! # Limits
//!
//! [`MAX_COMMANDS`] commands; per command [`MAX_ARGV`] `args` elements, [`MAX_ENV`] `env`
//! entries and [`MAX_PARAMS`] parameters; [`MAX_LISTING_TEXT`] bytes of text in a command's
//! listing so that it fits one frame; [`ARENA_BYTES`] of strings in all. Exceeding any is a
//! load error, never a silent cut.
//!
//! # Memory
//!
//! [`Config`] is a plain value of fixed size (about 70 KiB): every string, unescaped, lives in
//! one arena of [`ARENA_BYTES`], and the tables refer to it by offsets. Nothing allocates,
//! and there are no lifetimes, so the agent can keep the config in force and a candidate
//! side by side. [`Config::load`] parses into an existing value without a large stack
//! frame; [`Config::parse`] returns one by value for hosts and tests.

mod charset;
mod error;
mod load;
mod toml;

#[cfg(test)]
mod tests;

use ring_protocol::message::{ArgProblem, CommandInfo, ParamKind, ParamSpec, Rejection};

use crate::platform::Limits;

pub use charset::{Charset, CharsetError};
pub use error::{
    Capacity, ConfigError, ConfigErrorKind, SNIPPET_BYTES, Snippet, Table, Unsupported, ValueType,
};

/// Bytes of string storage in one [`Config`]: all names, paths, arguments, environment
/// entries, choices and charsets together, after unescaping.
pub const ARENA_BYTES: usize = 32 * 1024;
/// Most commands in one allow-list.
pub const MAX_COMMANDS: usize = 64;
/// Most `args` elements of one command (argv after `argv[0]`).
pub const MAX_ARGV: usize = 32;
/// Most `env` entries of one command.
pub const MAX_ENV: usize = 16;
/// Most parameters of one command (as many as the wire's [`CommandInfo`] carries).
pub const MAX_PARAMS: usize = ring_protocol::message::MAX_PARAMS;
/// Most concurrent executions the agent may be configured for.
pub const MAX_RUNNING: usize = 16;
/// Longest command name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest command description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 256;
/// Longest parameter name, in bytes.
pub const MAX_PARAM_NAME_LEN: usize = 32;
/// Longest choice of a choice parameter, in characters.
pub const MAX_CHOICE_LEN: usize = 64;
/// Largest `max_len` of a string parameter, in bytes.
pub const MAX_TEXT_LEN: u16 = 1024;
/// Smallest `memory_max` of a command, in bytes (less could not even start a program).
pub const MIN_MEMORY_MAX: u32 = 1 << 20;
/// Largest `pids_max` of a command (the kernel's own limit on process ids).
pub const MAX_PIDS: u32 = 4 * 1024 * 1024;
/// Largest `cpu_max_percent` of a command (1000 CPUs).
pub const MAX_CPU_PERCENT: u32 = 100_000;

/// Longest user or group name, in bytes.
pub const MAX_PRINCIPAL_LEN: usize = 32;
/// Most bytes of text in one command's listing ([`CommandSpec::info`]): its name,
/// description, parameter names, choices and charsets together. It keeps every listing
/// within one frame ([`ring_protocol::MAX_PAYLOAD_LEN`]) with room for the numbers and the
/// message around them.
pub const MAX_LISTING_TEXT: usize = 4096;

/// `max_running` when `[agent]` does not set it.
pub const DEFAULT_MAX_RUNNING: u16 = 8;
/// `kill_grace_ms` when `[agent]` does not set it.
pub const DEFAULT_KILL_GRACE_MS: u32 = 2000;
/// `default_timeout_ms` when `[agent]` does not set it.
pub const DEFAULT_TIMEOUT_MS: u32 = 60_000;
/// `default_max_output` when `[agent]` does not set it.
pub const DEFAULT_MAX_OUTPUT: u64 = 1 << 20;
/// `max_bytes` when `[push]` does not set it.
pub const DEFAULT_PUSH_MAX_BYTES: u64 = 4 << 20;
/// `dir` when `[push]` does not set it.
pub const DEFAULT_PUSH_DIR: &str = "/var/lib/portless-agent/push";
/// `timeout_ms` when `[push]` does not set it.
pub const DEFAULT_PUSH_TIMEOUT_MS: u32 = 300_000;

const _: () = assert!(ARENA_BYTES <= u16::MAX as usize, "spans are 16-bit");
const _: () = assert!(
    MAX_PARAMS <= u8::MAX as usize,
    "parameter indices are 8-bit"
);

/// Where a string lives in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span {
    start: u16,
    len: u16,
}

impl Span {
    fn get(self, arena: &str) -> &str {
        let start = usize::from(self.start);
        arena
            .get(start..start + usize::from(self.len))
            .unwrap_or("")
    }
}

/// A user or group as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrincipalRecord {
    Name(Span),
    Id(u32),
}

impl PrincipalRecord {
    fn view(self, arena: &str) -> Principal<'_> {
        match self {
            Self::Name(span) => Principal::Name(span.get(arena)),
            Self::Id(id) => Principal::Id(id),
        }
    }
}

/// An `args` element as stored: literal text, or the index of a parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArgRecord {
    Literal(Span),
    Param(u8),
}

/// A parameter's checks as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamKindRecord {
    Integer {
        min: i64,
        max: i64,
    },
    Choice {
        choices: Span,
    },
    Text {
        charset: Span,
        min_len: u16,
        max_len: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ParamRecord {
    name: Span,
    kind: ParamKindRecord,
}

impl ParamRecord {
    fn view(self, arena: &str) -> ParamSpec<'_> {
        ParamSpec {
            name: self.name.get(arena),
            kind: match self.kind {
                ParamKindRecord::Integer { min, max } => ParamKind::Integer { min, max },
                ParamKindRecord::Choice { choices } => ParamKind::OneOf {
                    choices: choices.get(arena),
                },
                ParamKindRecord::Text {
                    charset,
                    min_len,
                    max_len,
                } => ParamKind::Text {
                    class: charset.get(arena),
                    min_len,
                    max_len,
                },
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CommandRecord {
    name: Span,
    description: Span,
    program: Span,
    argv: heapless::Vec<ArgRecord, MAX_ARGV>,
    env: heapless::Vec<Span, MAX_ENV>,
    params: heapless::Vec<ParamRecord, MAX_PARAMS>,
    timeout_ms: Option<u32>,
    max_output: Option<u64>,
    user: Option<PrincipalRecord>,
    group: Option<PrincipalRecord>,
    cwd: Option<Span>,
    limits: Limits,
}

impl CommandRecord {
    const EMPTY: Self = Self {
        name: Span { start: 0, len: 0 },
        description: Span { start: 0, len: 0 },
        program: Span { start: 0, len: 0 },
        argv: heapless::Vec::new(),
        env: heapless::Vec::new(),
        params: heapless::Vec::new(),
        timeout_ms: None,
        max_output: None,
        user: None,
        group: None,
        cwd: None,
        limits: Limits::NONE,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PushRecord {
    enabled: bool,
    max_bytes: u64,
    dir: Option<Span>,
    timeout_ms: u32,
    user: Option<PrincipalRecord>,
    group: Option<PrincipalRecord>,
}

impl PushRecord {
    const DEFAULT: Self = Self {
        enabled: false,
        max_bytes: DEFAULT_PUSH_MAX_BYTES,
        dir: None,
        timeout_ms: DEFAULT_PUSH_TIMEOUT_MS,
        user: None,
        group: None,
    };
}

/// The `[agent]` table, defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentSettings {
    /// Most executions running at once, `1..=`[`MAX_RUNNING`].
    pub max_running: u16,
    /// Milliseconds between TERM and KILL when an execution is stopped.
    pub kill_grace_ms: u32,
    /// Timeout of commands that set none, in milliseconds; 0 for none.
    pub default_timeout_ms: u32,
    /// Output bytes kept per stream for commands that set no `max_output`.
    pub default_max_output: u64,
}

impl AgentSettings {
    /// The settings of a file without `[agent]`.
    pub const DEFAULT: Self = Self {
        max_running: DEFAULT_MAX_RUNNING,
        kill_grace_ms: DEFAULT_KILL_GRACE_MS,
        default_timeout_ms: DEFAULT_TIMEOUT_MS,
        default_max_output: DEFAULT_MAX_OUTPUT,
    };
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The `[push]` table, defaults filled in, borrowing from the [`Config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushSettings<'a> {
    /// Whether the host may push programs.
    pub enabled: bool,
    /// Largest program accepted, in bytes.
    pub max_bytes: u64,
    /// Absolute directory pushed programs are stored in.
    pub dir: &'a str,
    /// Timeout of pushed programs that are run, in milliseconds; 0 for none.
    pub timeout_ms: u32,
    /// Whom pushed programs run as; `None` for the agent's own user.
    pub user: Option<Principal<'a>>,
    /// Which group pushed programs run as; `None` for the agent's own (or the user's).
    pub group: Option<Principal<'a>>,
}

/// A user or group, as configured: a name for the platform to resolve, or a numeric id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Principal<'a> {
    /// A name: 1..=[`MAX_PRINCIPAL_LEN`] of `[A-Za-z0-9._-]`, not starting with `-`.
    Name(&'a str),
    /// A numeric id (never `u32::MAX`, which means "unchanged" to `setresuid`).
    Id(u32),
}

/// One `args` element of a command, before substitution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ArgTemplate<'a> {
    /// Passed as is.
    Literal(&'a str),
    /// Replaced by the value of a parameter.
    Param {
        /// The parameter's position (and so its argument's index in a request).
        index: usize,
        /// The parameter's name.
        name: &'a str,
    },
}

/// A loaded allow-list.
///
/// A plain value of fixed size without lifetimes or heap memory; see the [module
/// docs](self) for the file format. Create one with [`Config::new`] (empty: no commands,
/// default settings) and fill it with [`Config::load`].
///
/// ```
/// use agent_core::config::Config;
///
/// let mut config = Config::new();
/// config.load(
///     r#"
/// [[command]]
/// name = "sleep"
/// program = "/bin/sleep"
/// args = ["{seconds}"]
///
/// [[command.param]]
/// name = "seconds"
/// kind = "integer"
/// min = 1
/// max = 3600
/// "#,
/// )?;
/// let sleep = config.command("sleep").expect("listed");
/// assert!(sleep.check_args(&["5"]).is_ok());
/// assert!(sleep.check_args(&["05"]).is_err());
/// let argv: Vec<&str> = sleep.argv(&["5"]).collect();
/// assert_eq!(argv, ["/bin/sleep", "5"]);
///
/// let error = config.load("[agent]\nmax_runing = 4\n").unwrap_err();
/// assert_eq!(error.to_string(), r#"line 2: unknown key "max_runing" in [agent]"#);
/// assert_eq!(config.command_count(), 0); // a failed load leaves it empty
/// # Ok::<(), agent_core::config::ConfigError>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    arena: heapless::String<ARENA_BYTES>,
    agent: AgentSettings,
    push: PushRecord,
    commands: heapless::Vec<CommandRecord, MAX_COMMANDS>,
}

impl Default for Config {
    fn default() -> Self {
        Self::new()
    }
}

impl Config {
    /// An empty allow-list: no commands, default `[agent]` and `[push]` settings (push
    /// disabled).
    pub const fn new() -> Self {
        Self {
            arena: heapless::String::new(),
            agent: AgentSettings::DEFAULT,
            push: PushRecord::DEFAULT,
            commands: heapless::Vec::new(),
        }
    }

    /// Replaces the contents with the allow-list in `text`.
    ///
    /// On error the value is left empty (as [`Config::new`]), never half-loaded. To keep a
    /// config in force while a new one is checked, load the candidate into a second value
    /// and switch to it only on success.
    pub fn load(&mut self, text: &str) -> Result<(), ConfigError> {
        self.clear();
        let loaded = load::load(self, text);
        if loaded.is_err() {
            self.clear();
        }
        loaded
    }

    /// Parses `text` into a new value.
    ///
    /// The value is returned by value, which takes stack space for at least one
    /// `size_of::<Config>()` (about 70 KiB); on small stacks use [`Config::load`] on a value
    /// kept elsewhere (a `static`, a box).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut config = Self::new();
        config.load(text)?;
        Ok(config)
    }

    /// Empties the allow-list (as [`Config::new`]).
    pub fn clear(&mut self) {
        self.arena.clear();
        self.agent = AgentSettings::DEFAULT;
        self.push = PushRecord::DEFAULT;
        self.commands.clear();
    }

    /// The command called `name`, if the allow-list has one.
    pub fn command(&self, name: &str) -> Option<CommandSpec<'_>> {
        self.commands().find(|command| command.name() == name)
    }

    /// Every command, in file order (the order of the host's listing pages).
    pub fn commands(&self) -> Commands<'_> {
        Commands {
            config: self,
            records: self.commands.iter(),
        }
    }

    /// How many commands there are.
    pub fn command_count(&self) -> usize {
        self.commands.len()
    }

    /// The `[agent]` settings.
    pub const fn agent_settings(&self) -> AgentSettings {
        self.agent
    }

    /// The `[push]` settings.
    pub fn push_settings(&self) -> PushSettings<'_> {
        let push = &self.push;
        PushSettings {
            enabled: push.enabled,
            max_bytes: push.max_bytes,
            dir: push
                .dir
                .map_or(DEFAULT_PUSH_DIR, |span| span.get(&self.arena)),
            timeout_ms: push.timeout_ms,
            user: push.user.map(|p| p.view(&self.arena)),
            group: push.group.map(|p| p.view(&self.arena)),
        }
    }

    /// Bytes of the string arena in use (of [`ARENA_BYTES`]).
    pub fn arena_used(&self) -> usize {
        self.arena.len()
    }
}

impl core::fmt::Debug for Config {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Config")
            .field("agent", &self.agent)
            .field("push", &self.push_settings())
            .field("commands", &DebugList(self.commands()))
            .finish()
    }
}

/// Shows an iterator's items as a list, without collecting them.
struct DebugList<I>(I);

impl<I> core::fmt::Debug for DebugList<I>
where
    I: Iterator + Clone,
    I::Item: core::fmt::Debug,
{
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.0.clone()).finish()
    }
}

/// The commands of a [`Config`] in file order: an iterator that can also be indexed.
#[derive(Clone)]
pub struct Commands<'a> {
    config: &'a Config,
    records: core::slice::Iter<'a, CommandRecord>,
}

impl<'a> Commands<'a> {
    /// The command at `index` among those not yet iterated (so, on a fresh value, the
    /// `index`-th of the file), without advancing.
    pub fn get(&self, index: usize) -> Option<CommandSpec<'a>> {
        let record = self.records.as_slice().get(index)?;
        Some(self.view(record))
    }

    fn view(&self, record: &'a CommandRecord) -> CommandSpec<'a> {
        CommandSpec {
            config: self.config,
            record,
        }
    }
}

impl<'a> Iterator for Commands<'a> {
    type Item = CommandSpec<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let record = self.records.next()?;
        Some(self.view(record))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.records.size_hint()
    }
}

impl DoubleEndedIterator for Commands<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        let record = self.records.next_back()?;
        Some(self.view(record))
    }
}

impl ExactSizeIterator for Commands<'_> {}

impl core::iter::FusedIterator for Commands<'_> {}

impl core::fmt::Debug for Commands<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list()
            .entries(self.clone().map(|command| command.name()))
            .finish()
    }
}

/// One command of a [`Config`], borrowed from it.
#[derive(Clone, Copy)]
pub struct CommandSpec<'a> {
    config: &'a Config,
    record: &'a CommandRecord,
}

impl core::fmt::Debug for CommandSpec<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CommandSpec")
            .field("name", &self.name())
            .field("description", &self.description())
            .field("program", &self.program())
            .field("args", &DebugList(self.args()))
            .field("params", &DebugList(self.params()))
            .field("timeout_ms", &self.timeout_ms())
            .field("max_output", &self.max_output())
            .field("user", &self.user())
            .field("group", &self.group())
            .field("cwd", &self.cwd())
            .field("env", &DebugList(self.env()))
            .field("limits", &self.limits())
            .finish()
    }
}

impl<'a> CommandSpec<'a> {
    fn text(&self, span: Span) -> &'a str {
        span.get(&self.config.arena)
    }

    /// The name the host runs it by.
    pub fn name(&self) -> &'a str {
        self.text(self.record.name)
    }

    /// One line for people; empty if the file gives none.
    pub fn description(&self) -> &'a str {
        self.text(self.record.description)
    }

    /// The absolute path of the program (also passed as `argv[0]`).
    pub fn program(&self) -> &'a str {
        self.text(self.record.program)
    }

    /// The `args` template: argv after `argv[0]`, before substitution.
    pub fn args(&self) -> impl ExactSizeIterator<Item = ArgTemplate<'a>> + Clone + use<'a> {
        let arena: &'a str = &self.config.arena;
        let record = self.record;
        record.argv.iter().map(move |arg| match *arg {
            ArgRecord::Literal(span) => ArgTemplate::Literal(span.get(arena)),
            ArgRecord::Param(index) => {
                let index = usize::from(index);
                let name = record.params.get(index).map_or("", |p| p.name.get(arena));
                ArgTemplate::Param { index, name }
            }
        })
    }

    /// The declared parameters, in argument order.
    pub fn params(&self) -> impl ExactSizeIterator<Item = ParamSpec<'a>> + Clone + use<'a> {
        let arena: &'a str = &self.config.arena;
        self.record
            .params
            .iter()
            .map(move |param| param.view(arena))
    }

    /// How many arguments a request must carry.
    pub fn param_count(&self) -> usize {
        self.record.params.len()
    }

    /// The timeout in milliseconds (the command's own, else `[agent] default_timeout_ms`);
    /// 0 for none.
    pub fn timeout_ms(&self) -> u32 {
        self.record
            .timeout_ms
            .unwrap_or(self.config.agent.default_timeout_ms)
    }

    /// Output bytes kept per stream (the command's own, else `[agent] default_max_output`).
    pub fn max_output(&self) -> u64 {
        self.record
            .max_output
            .unwrap_or(self.config.agent.default_max_output)
    }

    /// Whom it runs as; `None` for the agent's own user.
    pub fn user(&self) -> Option<Principal<'a>> {
        let arena: &'a str = &self.config.arena;
        self.record.user.map(|p| p.view(arena))
    }

    /// Which group it runs as; `None` for the agent's own (or the user's).
    pub fn group(&self) -> Option<Principal<'a>> {
        let arena: &'a str = &self.config.arena;
        self.record.group.map(|p| p.view(arena))
    }

    /// The resource limits of its executions (`memory_max`, `pids_max`, `cpu_max_percent`).
    pub fn limits(&self) -> Limits {
        self.record.limits
    }

    /// The absolute working directory, if set.
    pub fn cwd(&self) -> Option<&'a str> {
        self.record.cwd.map(|span| self.text(span))
    }

    /// The `env` entries, each `KEY=VALUE` with distinct keys, in file order: meant as the
    /// command's whole environment (nothing is inherited from the agent).
    pub fn env(&self) -> impl ExactSizeIterator<Item = &'a str> + Clone + use<'a> {
        let arena: &'a str = &self.config.arena;
        self.record.env.iter().map(move |span| span.get(arena))
    }

    /// The command as listed to the host, borrowing from the config.
    pub fn info(&self) -> CommandInfo<'a> {
        let mut params = heapless::Vec::new();
        for param in self.params() {
            if params.push(param).is_err() {
                break; // cannot happen: both hold MAX_PARAMS
            }
        }
        CommandInfo {
            name: self.name(),
            description: self.description(),
            params,
            timeout_ms: self.timeout_ms(),
            max_output: self.max_output(),
        }
    }

    /// Checks a request's arguments against the declared parameters.
    ///
    /// Arguments are checked in order and the first problem is reported: a missing argument
    /// at the index of the first missing one, a surplus at the index of the first extra one,
    /// otherwise what [`check_value`] finds.
    pub fn check_args(&self, args: &[&str]) -> Result<(), Rejection> {
        let invalid = |index: usize, problem| Rejection::InvalidArgument {
            index: u8::try_from(index).unwrap_or(u8::MAX),
            problem,
        };
        let mut args = args.iter();
        for (index, param) in self.params().enumerate() {
            let Some(arg) = args.next() else {
                return Err(invalid(index, ArgProblem::Missing));
            };
            check_value(&param.kind, arg).map_err(|problem| invalid(index, problem))?;
        }
        if args.next().is_some() {
            return Err(invalid(self.param_count(), ArgProblem::Unexpected));
        }
        Ok(())
    }

    /// The argv to execute: [`program`](Self::program) (as `argv[0]`), then
    /// [`substituted_args`](Self::substituted_args).
    ///
    /// `args` must have passed [`check_args`](Self::check_args); a missing value would come
    /// out as an empty string.
    pub fn argv<'s>(
        &self,
        args: &'s [&'s str],
    ) -> impl Iterator<Item = &'s str> + Clone + use<'a, 's>
    where
        'a: 's,
    {
        let program: &'s str = self.program();
        core::iter::once(program).chain(self.substituted_args(args))
    }

    /// `argv[1..]`: each `args` element, with placeholders replaced by the matching element
    /// of `args` (a request's values, in parameter order).
    ///
    /// `args` must have passed [`check_args`](Self::check_args); a missing value would come
    /// out as an empty string.
    pub fn substituted_args<'s>(
        &self,
        args: &'s [&'s str],
    ) -> impl ExactSizeIterator<Item = &'s str> + Clone + use<'a, 's>
    where
        'a: 's,
    {
        let arena: &'s str = &self.config.arena;
        self.record.argv.iter().map(move |arg| match *arg {
            ArgRecord::Literal(span) => span.get(arena),
            ArgRecord::Param(index) => args.get(usize::from(index)).copied().unwrap_or(""),
        })
    }
}

/// Checks one argument against a parameter's kind (as [`CommandSpec::check_args`] does for
/// each argument; also usable on a [`CommandInfo`] received over the wire).
///
/// - `Integer`: canonical decimal only (an optional `-`, no `+`, no leading zeros, no
///   spaces, not `-0`), else `NotInteger`; outside `min..=max` (or `i64`), `OutOfRange`.
/// - `OneOf`: exactly one of the `|`-separated choices, else `NotAChoice`.
/// - `Text`: `min_len..=max_len` bytes, else `BadLength`; every character in the class,
///   else `BadCharacter`.
pub fn check_value(kind: &ParamKind<'_>, value: &str) -> Result<(), ArgProblem> {
    match *kind {
        ParamKind::Integer { min, max } => {
            let n = canonical_integer(value)?;
            if (min..=max).contains(&n) {
                Ok(())
            } else {
                Err(ArgProblem::OutOfRange)
            }
        }
        ParamKind::OneOf { choices } => {
            if choices.split('|').any(|choice| choice == value) {
                Ok(())
            } else {
                Err(ArgProblem::NotAChoice)
            }
        }
        ParamKind::Text {
            class,
            min_len,
            max_len,
        } => {
            if !(usize::from(min_len)..=usize::from(max_len)).contains(&value.len()) {
                return Err(ArgProblem::BadLength);
            }
            match Charset::parse(class) {
                Ok(class) if class.matches(value) => Ok(()),
                _ => Err(ArgProblem::BadCharacter),
            }
        }
    }
}

/// A decimal integer written the one canonical way; too large for `i64` is out of range.
fn canonical_integer(value: &str) -> Result<i64, ArgProblem> {
    let (negative, digits) = match value.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, value),
    };
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (!digits.starts_with('0') || (digits == "0" && !negative));
    if !canonical {
        return Err(ArgProblem::NotInteger);
    }
    let mut magnitude: u64 = 0;
    for b in digits.bytes() {
        magnitude = magnitude
            .checked_mul(10)
            .and_then(|m| m.checked_add(u64::from(b - b'0')))
            .ok_or(ArgProblem::OutOfRange)?;
    }
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
    .ok_or(ArgProblem::OutOfRange)
}
