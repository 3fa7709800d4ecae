//! From the lexer's items to a [`Config`]: which keys each table has, their types and
//! ranges, and the checks that span keys or tables (unique names, placeholders against
//! declared parameters, per-kind parameter keys).
//!
//! Strings are copied into the arena as they are read and checked there. Checks that need a
//! whole table (required keys, parameter kinds) run when the table ends; those that need a
//! whole command (placeholders) when the next `[[command]]` starts or the file ends, since
//! TOML lets `[[command.param]]` follow other tables and still belong to the last command.

use super::error::{Capacity, ConfigError, ConfigErrorKind, Snippet, Table, ValueType};
use super::toml::{Array, Header, Item, Lexer, TomlStr, Value};
use super::{
    ArgRecord, Charset, CommandRecord, Config, MAX_CHOICE_LEN, MAX_COMMANDS, MAX_CPU_PERCENT,
    MAX_DESCRIPTION_LEN, MAX_LISTING_TEXT, MAX_NAME_LEN, MAX_PARAM_NAME_LEN, MAX_PARAMS, MAX_PIDS,
    MAX_PRINCIPAL_LEN, MAX_RUNNING, MAX_TEXT_LEN, MIN_MEMORY_MAX, ParamKindRecord, ParamRecord,
    PrincipalRecord, Span,
};

type Kind = ConfigErrorKind;

/// `MAX_RUNNING` fits (the parent module asserts it at compile time).
const MAX_RUNNING_U32: u32 = MAX_RUNNING as u32;
type Arena = heapless::String<{ super::ARENA_BYTES }>;

/// Loads `text` into `config`, which the caller has cleared.
pub(super) fn load(config: &mut Config, text: &str) -> Result<(), ConfigError> {
    let mut loader = Loader {
        config,
        table: Table::Root,
        agent_keys: None,
        push_keys: None,
        command: None,
        param: None,
    };
    let mut lexer = Lexer::new(text);
    while let Some((line, item)) = lexer.next_item()? {
        match item {
            Item::Header(header) => loader.header(line, header)?,
            Item::Entry { key, value } => loader.entry(line, key, &value)?,
        }
    }
    loader.finish_command()
}

/// Declares the keys of a table: an enum, its parsing and its key names.
macro_rules! keys {
    ($name:ident { $($variant:ident = $text:literal,)* }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum $name {
            $($variant,)*
        }

        impl $name {
            fn parse(key: &str) -> Option<Self> {
                match key {
                    $($text => Some(Self::$variant),)*
                    _ => None,
                }
            }

            const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                }
            }

            const fn bit(self) -> u32 {
                1 << (self as u32)
            }
        }
    };
}

keys!(AgentKey {
    MaxRunning = "max_running",
    KillGraceMs = "kill_grace_ms",
    DefaultTimeoutMs = "default_timeout_ms",
    DefaultMaxOutput = "default_max_output",
});

keys!(PushKey {
    Enabled = "enabled",
    MaxBytes = "max_bytes",
    Dir = "dir",
    TimeoutMs = "timeout_ms",
    User = "user",
    Group = "group",
});

keys!(CommandKey {
    Name = "name",
    Description = "description",
    Program = "program",
    Args = "args",
    TimeoutMs = "timeout_ms",
    MaxOutput = "max_output",
    User = "user",
    Group = "group",
    Cwd = "cwd",
    Env = "env",
    MemoryMax = "memory_max",
    PidsMax = "pids_max",
    CpuMaxPercent = "cpu_max_percent",
});

keys!(ParamKey {
    Name = "name",
    Kind = "kind",
    Min = "min",
    Max = "max",
    Choices = "choices",
    Charset = "charset",
    MinLen = "min_len",
    MaxLen = "max_len",
});

/// The keys a table has set so far, as bits.
#[derive(Debug, Clone, Copy, Default)]
struct KeySet(u32);

impl KeySet {
    /// Records a key; a duplicate is an error.
    fn insert(&mut self, bit: u32, key: &'static str, table: Table) -> Result<(), Kind> {
        if self.0 & bit != 0 {
            return Err(Kind::DuplicateKey { key, table });
        }
        self.0 |= bit;
        Ok(())
    }

    const fn contains(self, bit: u32) -> bool {
        self.0 & bit != 0
    }
}

/// What the loader remembers of the last `[[command]]` while it is open (the record itself
/// is already the last of `config.commands`).
struct CommandState {
    header_line: u32,
    keys: KeySet,
    args_line: u32,
    param_lines: [u32; MAX_PARAMS],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParamKindTag {
    Integer,
    Choice,
    Text,
}

impl ParamKindTag {
    const fn name(self) -> &'static str {
        match self {
            Self::Integer => "integer",
            Self::Choice => "choice",
            Self::Text => "string",
        }
    }
}

/// The keys of an open `[[command.param]]`, each with its line, checked together when the
/// table ends (TOML does not order keys, so `kind` may come last).
#[derive(Default)]
struct ParamState {
    header_line: u32,
    keys: KeySet,
    name: Option<Span>,
    kind: Option<ParamKindTag>,
    min: Option<(i64, u32)>,
    max: Option<(i64, u32)>,
    choices: Option<(Span, u32)>,
    charset: Option<(Span, u32)>,
    min_len: Option<(u16, u32)>,
    max_len: Option<(u16, u32)>,
}

struct Loader<'c> {
    config: &'c mut Config,
    table: Table,
    agent_keys: Option<KeySet>,
    push_keys: Option<KeySet>,
    command: Option<CommandState>,
    param: Option<ParamState>,
}

fn at(line: u32) -> impl Fn(Kind) -> ConfigError {
    move |kind| ConfigError::new(line, kind)
}

impl Loader<'_> {
    fn header(&mut self, line: u32, header: Header) -> Result<(), ConfigError> {
        self.finish_param()?;
        match header {
            Header::Agent => {
                if self.agent_keys.replace(KeySet::default()).is_some() {
                    return Err(ConfigError::new(line, Kind::DuplicateTable(Table::Agent)));
                }
                self.table = Table::Agent;
            }
            Header::Push => {
                if self.push_keys.replace(KeySet::default()).is_some() {
                    return Err(ConfigError::new(line, Kind::DuplicateTable(Table::Push)));
                }
                self.table = Table::Push;
            }
            Header::Command => {
                self.finish_command()?;
                if self.config.commands.len() >= MAX_COMMANDS
                    || self.config.commands.push(CommandRecord::EMPTY).is_err()
                {
                    return Err(ConfigError::new(line, Kind::TooMany(Capacity::Commands)));
                }
                self.command = Some(CommandState {
                    header_line: line,
                    keys: KeySet::default(),
                    args_line: line,
                    param_lines: [line; MAX_PARAMS],
                });
                self.table = Table::Command;
            }
            Header::Param => {
                let (Some(_), Some(record)) = (&self.command, self.config.commands.last()) else {
                    return Err(ConfigError::new(line, Kind::ParamOutsideCommand));
                };
                if record.params.len() >= MAX_PARAMS {
                    return Err(ConfigError::new(line, Kind::TooMany(Capacity::Params)));
                }
                self.param = Some(ParamState {
                    header_line: line,
                    ..ParamState::default()
                });
                self.table = Table::Param;
            }
        }
        Ok(())
    }

    fn entry(&mut self, line: u32, key: &str, value: &Value<'_>) -> Result<(), ConfigError> {
        let unknown = |table| {
            ConfigError::new(
                line,
                Kind::UnknownKey {
                    key: Snippet::new(key),
                    table,
                },
            )
        };
        match self.table {
            Table::Root => Err(unknown(Table::Root)),
            Table::Agent => {
                let key = AgentKey::parse(key).ok_or_else(|| unknown(Table::Agent))?;
                self.agent_entry(key, value).map_err(at(line))
            }
            Table::Push => {
                let key = PushKey::parse(key).ok_or_else(|| unknown(Table::Push))?;
                self.push_entry(key, value).map_err(at(line))
            }
            Table::Command => {
                let key = CommandKey::parse(key).ok_or_else(|| unknown(Table::Command))?;
                self.command_entry(line, key, value)
            }
            Table::Param => {
                let key = ParamKey::parse(key).ok_or_else(|| unknown(Table::Param))?;
                self.param_entry(line, key, value)
            }
        }
    }

    fn agent_entry(&mut self, key: AgentKey, value: &Value<'_>) -> Result<(), Kind> {
        self.agent_keys
            .get_or_insert_default()
            .insert(key.bit(), key.name(), Table::Agent)?;
        let agent = &mut self.config.agent;
        let name = key.name();
        match key {
            AgentKey::MaxRunning => {
                let n = uint32(name, value, 1, MAX_RUNNING_U32)?;
                agent.max_running = u16::try_from(n).unwrap_or(1);
            }
            AgentKey::KillGraceMs => agent.kill_grace_ms = uint32(name, value, 0, u32::MAX)?,
            AgentKey::DefaultTimeoutMs => {
                agent.default_timeout_ms = uint32(name, value, 0, u32::MAX)?;
            }
            AgentKey::DefaultMaxOutput => agent.default_max_output = uint64(name, value, 0)?,
        }
        Ok(())
    }

    fn push_entry(&mut self, key: PushKey, value: &Value<'_>) -> Result<(), Kind> {
        self.push_keys
            .get_or_insert_default()
            .insert(key.bit(), key.name(), Table::Push)?;
        let push = &mut self.config.push;
        let arena = &mut self.config.arena;
        let name = key.name();
        match key {
            PushKey::Enabled => push.enabled = boolean(name, value)?,
            PushKey::MaxBytes => push.max_bytes = uint64(name, value, 1)?,
            PushKey::Dir => push.dir = Some(absolute_path(name, value, arena)?),
            PushKey::TimeoutMs => push.timeout_ms = uint32(name, value, 0, u32::MAX)?,
            PushKey::User => push.user = Some(principal(name, value, arena)?),
            PushKey::Group => push.group = Some(principal(name, value, arena)?),
        }
        Ok(())
    }

    fn command_entry(
        &mut self,
        line: u32,
        key: CommandKey,
        value: &Value<'_>,
    ) -> Result<(), ConfigError> {
        let config = &mut *self.config;
        let (Some(state), Some((record, others))) =
            (self.command.as_mut(), config.commands.split_last_mut())
        else {
            return Err(ConfigError::new(line, Kind::ParamOutsideCommand));
        };
        let arena = &mut config.arena;
        let name = key.name();
        state
            .keys
            .insert(key.bit(), name, Table::Command)
            .map_err(at(line))?;
        match key {
            CommandKey::Name => {
                let span = string_value(arena, name, value).map_err(at(line))?;
                let text = span.get(arena);
                if !is_command_name(text) {
                    return Err(ConfigError::new(
                        line,
                        Kind::InvalidCommandName(Snippet::new(text)),
                    ));
                }
                if others.iter().any(|other| other.name.get(arena) == text) {
                    return Err(ConfigError::new(
                        line,
                        Kind::DuplicateCommand(Snippet::new(text)),
                    ));
                }
                record.name = span;
            }
            CommandKey::Description => {
                let span = string_value(arena, name, value).map_err(at(line))?;
                if usize::from(span.len) > MAX_DESCRIPTION_LEN {
                    return Err(ConfigError::new(
                        line,
                        Kind::TooLong {
                            key: name,
                            max: MAX_DESCRIPTION_LEN,
                        },
                    ));
                }
                record.description = span;
            }
            CommandKey::Program => {
                record.program = absolute_path(name, value, arena).map_err(at(line))?;
            }
            CommandKey::Cwd => {
                record.cwd = Some(absolute_path(name, value, arena).map_err(at(line))?);
            }
            CommandKey::TimeoutMs => {
                record.timeout_ms = Some(uint32(name, value, 0, u32::MAX).map_err(at(line))?);
            }
            CommandKey::MaxOutput => {
                record.max_output = Some(uint64(name, value, 0).map_err(at(line))?);
            }
            CommandKey::MemoryMax => {
                let n = uint64(name, value, MIN_MEMORY_MAX).map_err(at(line))?;
                record.limits.memory_max = Some(n);
            }
            CommandKey::PidsMax => {
                record.limits.pids_max = Some(uint32(name, value, 1, MAX_PIDS).map_err(at(line))?);
            }
            CommandKey::CpuMaxPercent => {
                let n = uint32(name, value, 1, MAX_CPU_PERCENT).map_err(at(line))?;
                record.limits.cpu_max_percent = Some(n);
            }
            CommandKey::User => {
                record.user = Some(principal(name, value, arena).map_err(at(line))?);
            }
            CommandKey::Group => {
                record.group = Some(principal(name, value, arena).map_err(at(line))?);
            }
            CommandKey::Args => {
                state.args_line = line;
                for element in strings(name, value).map_err(at(line))?.elements() {
                    let (line, s) = string_element(name, element)?;
                    let span = intern(arena, s).map_err(at(line))?;
                    record
                        .argv
                        .push(ArgRecord::Literal(span))
                        .map_err(|_| ConfigError::new(line, Kind::TooMany(Capacity::Args)))?;
                }
            }
            CommandKey::Env => {
                for element in strings(name, value).map_err(at(line))?.elements() {
                    let (line, s) = string_element(name, element)?;
                    let span = intern(arena, s).map_err(at(line))?;
                    let entry = span.get(arena);
                    let Some(var) = env_key(entry) else {
                        return Err(ConfigError::new(
                            line,
                            Kind::InvalidEnv(Snippet::new(entry)),
                        ));
                    };
                    if record
                        .env
                        .iter()
                        .any(|other| env_key(other.get(arena)) == Some(var))
                    {
                        return Err(ConfigError::new(
                            line,
                            Kind::DuplicateEnv(Snippet::new(var)),
                        ));
                    }
                    record
                        .env
                        .push(span)
                        .map_err(|_| ConfigError::new(line, Kind::TooMany(Capacity::Env)))?;
                }
            }
        }
        Ok(())
    }

    fn param_entry(
        &mut self,
        line: u32,
        key: ParamKey,
        value: &Value<'_>,
    ) -> Result<(), ConfigError> {
        let config = &mut *self.config;
        let (Some(state), Some(record)) = (self.param.as_mut(), config.commands.last()) else {
            return Err(ConfigError::new(line, Kind::ParamOutsideCommand));
        };
        let arena = &mut config.arena;
        let name = key.name();
        state
            .keys
            .insert(key.bit(), name, Table::Param)
            .map_err(at(line))?;
        match key {
            ParamKey::Name => {
                let span = string_value(arena, name, value).map_err(at(line))?;
                let text = span.get(arena);
                if !is_param_name(text) {
                    return Err(ConfigError::new(
                        line,
                        Kind::InvalidParamName(Snippet::new(text)),
                    ));
                }
                if record.params.iter().any(|p| p.name.get(arena) == text) {
                    return Err(ConfigError::new(
                        line,
                        Kind::DuplicateParam(Snippet::new(text)),
                    ));
                }
                state.name = Some(span);
            }
            ParamKey::Kind => {
                let span = string_value(arena, name, value).map_err(at(line))?;
                let tag = match span.get(arena) {
                    "integer" => ParamKindTag::Integer,
                    "choice" => ParamKindTag::Choice,
                    "string" => ParamKindTag::Text,
                    other => {
                        return Err(ConfigError::new(
                            line,
                            Kind::UnknownParamKind(Snippet::new(other)),
                        ));
                    }
                };
                // Only the tag is kept.
                arena.truncate(usize::from(span.start));
                state.kind = Some(tag);
            }
            ParamKey::Min => state.min = Some((integer(name, value).map_err(at(line))?, line)),
            ParamKey::Max => state.max = Some((integer(name, value).map_err(at(line))?, line)),
            ParamKey::MinLen | ParamKey::MaxLen => {
                let n = uint32(name, value, 0, MAX_TEXT_LEN.into()).map_err(at(line))?;
                let n = u16::try_from(n).unwrap_or(MAX_TEXT_LEN);
                if key == ParamKey::MinLen {
                    state.min_len = Some((n, line));
                } else {
                    state.max_len = Some((n, line));
                }
            }
            ParamKey::Charset => {
                let span = string_value(arena, name, value).map_err(at(line))?;
                listing_text(usize::from(span.len)).map_err(at(line))?;
                Charset::parse(span.get(arena))
                    .map_err(|e| ConfigError::new(line, Kind::InvalidCharset(e)))?;
                state.charset = Some((span, line));
            }
            ParamKey::Choices => {
                let start = arena.len();
                for element in strings(name, value).map_err(at(line))?.elements() {
                    let (line, s) = string_element(name, element)?;
                    if arena.len() > start {
                        arena
                            .push('|')
                            .map_err(|_| ConfigError::new(line, Kind::ArenaFull))?;
                    }
                    let choice = intern(arena, s).map_err(at(line))?;
                    // Bounds the listing and the quadratic duplicate check below.
                    listing_text(arena.len().saturating_sub(start)).map_err(at(line))?;
                    let text = choice.get(arena);
                    if text.is_empty()
                        || text.contains('|')
                        || text.chars().count() > MAX_CHOICE_LEN
                    {
                        return Err(ConfigError::new(
                            line,
                            Kind::InvalidChoice(Snippet::new(text)),
                        ));
                    }
                    let earlier = arena
                        .get(start..usize::from(choice.start).saturating_sub(1))
                        .unwrap_or("");
                    if !earlier.is_empty() && earlier.split('|').any(|c| c == text) {
                        return Err(ConfigError::new(
                            line,
                            Kind::DuplicateChoice(Snippet::new(text)),
                        ));
                    }
                }
                if arena.len() == start {
                    return Err(ConfigError::new(line, Kind::NoChoices));
                }
                state.choices = Some((span(start, arena.len()).map_err(at(line))?, line));
            }
        }
        Ok(())
    }

    /// Checks the open `[[command.param]]` as a whole and adds it to its command.
    fn finish_param(&mut self) -> Result<(), ConfigError> {
        let Some(param) = self.param.take() else {
            return Ok(());
        };
        let header = param.header_line;
        let missing = |key| {
            ConfigError::new(
                header,
                Kind::MissingKey {
                    key,
                    table: Table::Param,
                },
            )
        };
        let name = param.name.ok_or_else(|| missing("name"))?;
        let kind = param.kind.ok_or_else(|| missing("kind"))?;
        let not_for_kind = |key, line: u32| {
            ConfigError::new(
                line,
                Kind::KeyNotForKind {
                    key,
                    kind: kind.name(),
                },
            )
        };
        let reject = |key: &'static str, line: Option<u32>, allowed: bool| match line {
            Some(line) if !allowed => Err(not_for_kind(key, line)),
            _ => Ok(()),
        };
        let integer = kind == ParamKindTag::Integer;
        let choice = kind == ParamKindTag::Choice;
        let text = kind == ParamKindTag::Text;
        reject("min", param.min.map(|(_, l)| l), integer)?;
        reject("max", param.max.map(|(_, l)| l), integer)?;
        reject("choices", param.choices.map(|(_, l)| l), choice)?;
        reject("charset", param.charset.map(|(_, l)| l), text)?;
        reject("min_len", param.min_len.map(|(_, l)| l), text)?;
        reject("max_len", param.max_len.map(|(_, l)| l), text)?;
        let kind = match kind {
            ParamKindTag::Integer => {
                let (min, min_line) = param.min.ok_or_else(|| missing("min"))?;
                let (max, _) = param.max.ok_or_else(|| missing("max"))?;
                if min > max {
                    return Err(ConfigError::new(min_line, Kind::MinAboveMax { min, max }));
                }
                ParamKindRecord::Integer { min, max }
            }
            ParamKindTag::Choice => ParamKindRecord::Choice {
                choices: param.choices.ok_or_else(|| missing("choices"))?.0,
            },
            ParamKindTag::Text => {
                let (charset, _) = param.charset.ok_or_else(|| missing("charset"))?;
                let (max_len, _) = param.max_len.ok_or_else(|| missing("max_len"))?;
                let (min_len, min_line) = param.min_len.unwrap_or((0, header));
                if min_len > max_len {
                    return Err(ConfigError::new(
                        min_line,
                        Kind::MinLenAboveMaxLen { min_len, max_len },
                    ));
                }
                ParamKindRecord::Text {
                    charset,
                    min_len,
                    max_len,
                }
            }
        };
        let (Some(state), Some(record)) = (self.command.as_mut(), self.config.commands.last_mut())
        else {
            return Err(ConfigError::new(header, Kind::ParamOutsideCommand));
        };
        if let Some(slot) = state.param_lines.get_mut(record.params.len()) {
            *slot = header;
        }
        record
            .params
            .push(ParamRecord { name, kind })
            .map_err(|_| ConfigError::new(header, Kind::TooMany(Capacity::Params)))
    }

    /// Checks the open `[[command]]` as a whole: required keys, and placeholders against the
    /// declared parameters (each used exactly once).
    fn finish_command(&mut self) -> Result<(), ConfigError> {
        self.finish_param()?;
        let Some(state) = self.command.take() else {
            return Ok(());
        };
        let Some(record) = self.config.commands.last_mut() else {
            return Ok(());
        };
        let arena = &self.config.arena;
        for key in [CommandKey::Name, CommandKey::Program] {
            if !state.keys.contains(key.bit()) {
                return Err(ConfigError::new(
                    state.header_line,
                    Kind::MissingKey {
                        key: key.name(),
                        table: Table::Command,
                    },
                ));
            }
        }
        let args_error = at(state.args_line);
        let mut used = [false; MAX_PARAMS];
        for arg in &mut record.argv {
            let ArgRecord::Literal(span) = *arg else {
                continue;
            };
            let text = span.get(arena);
            let Some(wanted) = placeholder(text) else {
                continue;
            };
            let index = record
                .params
                .iter()
                .position(|p| p.name.get(arena) == wanted)
                .ok_or_else(|| args_error(Kind::UnknownPlaceholder(Snippet::new(text))))?;
            match used.get_mut(index) {
                Some(seen) if !*seen => *seen = true,
                _ => return Err(args_error(Kind::ParamUsedTwice(Snippet::new(wanted)))),
            }
            *arg = ArgRecord::Param(u8::try_from(index).unwrap_or(u8::MAX));
        }
        let text = record.params.iter().fold(
            usize::from(record.name.len) + usize::from(record.description.len),
            |sum, param| {
                let values = match param.kind {
                    ParamKindRecord::Integer { .. } => 0,
                    ParamKindRecord::Choice { choices } => choices.len,
                    ParamKindRecord::Text { charset, .. } => charset.len,
                };
                sum + usize::from(param.name.len) + usize::from(values)
            },
        );
        listing_text(text).map_err(at(state.header_line))?;
        for ((param, used), line) in record.params.iter().zip(used).zip(state.param_lines) {
            if !used {
                return Err(ConfigError::new(
                    line,
                    Kind::UnusedParam(Snippet::new(param.name.get(arena))),
                ));
            }
        }
        Ok(())
    }
}

/// Refuses more listing text than fits a frame.
const fn listing_text(bytes: usize) -> Result<(), Kind> {
    if bytes > MAX_LISTING_TEXT {
        Err(Kind::ListingTooLarge {
            bytes,
            max: MAX_LISTING_TEXT,
        })
    } else {
        Ok(())
    }
}

fn value_type(value: &Value<'_>) -> ValueType {
    match value {
        Value::String(_) => ValueType::String,
        Value::Integer(_) => ValueType::Integer,
        Value::Boolean(_) => ValueType::Boolean,
        Value::Array(_) => ValueType::Array,
    }
}

fn wrong_type(key: &'static str, expected: ValueType, value: &Value<'_>) -> Kind {
    Kind::WrongType {
        key,
        expected,
        found: value_type(value),
    }
}

fn integer(key: &'static str, value: &Value<'_>) -> Result<i64, Kind> {
    match *value {
        Value::Integer(n) => Ok(n),
        _ => Err(wrong_type(key, ValueType::Integer, value)),
    }
}

fn in_range(key: &'static str, value: &Value<'_>, min: i64, max: i64) -> Result<i64, Kind> {
    let n = integer(key, value)?;
    if (min..=max).contains(&n) {
        Ok(n)
    } else {
        Err(Kind::OutOfRange {
            key,
            value: n,
            min,
            max,
        })
    }
}

fn uint32(key: &'static str, value: &Value<'_>, min: u32, max: u32) -> Result<u32, Kind> {
    let n = in_range(key, value, min.into(), max.into())?;
    Ok(u32::try_from(n).unwrap_or(max))
}

fn uint64(key: &'static str, value: &Value<'_>, min: u32) -> Result<u64, Kind> {
    let n = in_range(key, value, min.into(), i64::MAX)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn boolean(key: &'static str, value: &Value<'_>) -> Result<bool, Kind> {
    match *value {
        Value::Boolean(b) => Ok(b),
        _ => Err(wrong_type(key, ValueType::Boolean, value)),
    }
}

fn string<'a>(key: &'static str, value: &Value<'a>) -> Result<TomlStr<'a>, Kind> {
    match *value {
        Value::String(s) => Ok(s),
        _ => Err(wrong_type(key, ValueType::String, value)),
    }
}

fn strings<'a>(key: &'static str, value: &Value<'a>) -> Result<Array<'a>, Kind> {
    match *value {
        Value::Array(array) => Ok(array),
        _ => Err(wrong_type(key, ValueType::Array, value)),
    }
}

/// An element of an array of strings, with its line.
fn string_element<'a>(
    key: &'static str,
    element: Result<(u32, Value<'a>), ConfigError>,
) -> Result<(u32, TomlStr<'a>), ConfigError> {
    let (line, value) = element?;
    match value {
        Value::String(s) => Ok((line, s)),
        other => Err(ConfigError::new(
            line,
            Kind::WrongElementType {
                key,
                found: value_type(&other),
            },
        )),
    }
}

fn span(start: usize, end: usize) -> Result<Span, Kind> {
    let start16 = u16::try_from(start).map_err(|_| Kind::ArenaFull)?;
    let len = u16::try_from(end.saturating_sub(start)).map_err(|_| Kind::ArenaFull)?;
    Ok(Span {
        start: start16,
        len,
    })
}

/// Copies a string's value, unescaped, to the end of the arena.
fn intern(arena: &mut Arena, s: TomlStr<'_>) -> Result<Span, Kind> {
    let start = arena.len();
    for c in s.chars() {
        arena.push(c).map_err(|_| Kind::ArenaFull)?;
    }
    span(start, arena.len())
}

/// A string value, copied into the arena.
fn string_value(arena: &mut Arena, key: &'static str, value: &Value<'_>) -> Result<Span, Kind> {
    intern(arena, string(key, value)?)
}

fn absolute_path(key: &'static str, value: &Value<'_>, arena: &mut Arena) -> Result<Span, Kind> {
    let span = string_value(arena, key, value)?;
    if span.get(arena).starts_with('/') {
        Ok(span)
    } else {
        Err(Kind::NotAbsolute { key })
    }
}

/// A user or group: a name, or an id below `u32::MAX`.
fn principal(
    key: &'static str,
    value: &Value<'_>,
    arena: &mut Arena,
) -> Result<PrincipalRecord, Kind> {
    match *value {
        Value::Integer(_) => Ok(PrincipalRecord::Id(uint32(key, value, 0, u32::MAX - 1)?)),
        Value::String(s) => {
            let span = intern(arena, s)?;
            let name = span.get(arena);
            let valid = (1..=MAX_PRINCIPAL_LEN).contains(&name.len())
                && !name.starts_with('-')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if valid {
                Ok(PrincipalRecord::Name(span))
            } else {
                Err(Kind::InvalidPrincipal { key })
            }
        }
        _ => Err(wrong_type(key, ValueType::StringOrInteger, value)),
    }
}

fn is_command_name(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_param_name(name: &str) -> bool {
    (1..=MAX_PARAM_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The parameter an `args` element stands for, if it is exactly `{name}`.
fn placeholder(element: &str) -> Option<&str> {
    element
        .strip_prefix('{')?
        .strip_suffix('}')
        .filter(|name| is_param_name(name))
}

/// The variable an `env` entry sets, if it is `KEY=VALUE` with a valid key.
fn env_key(entry: &str) -> Option<&str> {
    let (key, _) = entry.split_once('=')?;
    let mut bytes = key.bytes();
    let first = bytes.next()?;
    let valid = (first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    valid.then_some(key)
}
