//! Why an allow-list was refused, precisely enough that an operator can fix the file from the
//! message alone (`line 12: unknown key "tiemout_ms" in [[command]]`).
//!
//! Errors own their data (short copies of the offending names, see [`Snippet`]) so that they
//! outlive the text they were found in and can be logged after the buffer is gone.

use core::fmt;

use super::charset::CharsetError;

/// A load error: the 1-based line it was found on and what is wrong.
///
/// `Display` gives `line N: ...`; the caller prefixes the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// 1-based line of the offending key, header or character.
    pub line: u32,
    /// What is wrong.
    pub kind: ConfigErrorKind,
}

impl ConfigError {
    pub(super) const fn new(line: u32, kind: ConfigErrorKind) -> Self {
        Self { line, kind }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.kind)
    }
}

impl core::error::Error for ConfigError {}

/// Most bytes of offending text kept in a [`Snippet`].
pub const SNIPPET_BYTES: usize = 40;

/// A short copy of offending text (a key, a name, an entry) kept in an error: at most
/// [`SNIPPET_BYTES`] bytes, cut at a character boundary.
///
/// `Display` quotes and escapes it, and marks a cut with `...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snippet {
    text: heapless::String<SNIPPET_BYTES>,
    truncated: bool,
}

impl Snippet {
    /// Copies as much of `text` as fits.
    pub fn new(text: &str) -> Self {
        let mut kept = heapless::String::new();
        let mut truncated = false;
        for c in text.chars() {
            if kept.push(c).is_err() {
                truncated = true;
                break;
            }
        }
        Self {
            text: kept,
            truncated,
        }
    }

    /// The text kept.
    pub fn as_str(&self) -> &str {
        self.text.as_str()
    }

    /// Whether the original was longer than what is kept.
    pub const fn is_truncated(&self) -> bool {
        self.truncated
    }
}

impl fmt::Display for Snippet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}", self.text.escape_debug())?;
        if self.truncated {
            f.write_str("...")?;
        }
        f.write_str("\"")
    }
}

/// The table a key or header belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Before any header.
    Root,
    /// `[agent]`.
    Agent,
    /// `[push]`.
    Push,
    /// `[[command]]`.
    Command,
    /// `[[command.param]]`.
    Param,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Root => "the top level (before any table header)",
            Self::Agent => "[agent]",
            Self::Push => "[push]",
            Self::Command => "[[command]]",
            Self::Param => "[[command.param]]",
        })
    }
}

/// A TOML feature outside the Portless subset.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unsupported {
    /// `"""..."""` or `'''...'''`.
    MultiLineString,
    /// `1.5`, `1e3`, `inf`, `nan`.
    Float,
    /// Offset and local dates and times.
    DateTime,
    /// `0x..`, `0o..`, `0b..`.
    NonDecimalInteger,
    /// `{ ... }`.
    InlineTable,
    /// An array inside an array.
    NestedArray,
    /// `a.b = 1`.
    DottedKey,
    /// `"a" = 1`, `['a']`.
    QuotedKey,
    /// A `[table]` other than `[agent]` and `[push]`.
    Table(Snippet),
    /// An `[[array of tables]]` other than `[[command]]` and `[[command.param]]`.
    ArrayOfTables(Snippet),
}

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MultiLineString => f.write_str("a multi-line string"),
            Self::Float => f.write_str("a floating-point number"),
            Self::DateTime => f.write_str("a date or time"),
            Self::NonDecimalInteger => f.write_str("a hexadecimal, octal or binary integer"),
            Self::InlineTable => f.write_str("an inline table"),
            Self::NestedArray => f.write_str("an array inside an array"),
            Self::DottedKey => f.write_str("a dotted key"),
            Self::QuotedKey => f.write_str("a quoted key"),
            Self::Table(name) => write!(
                f,
                "table [{}] (the tables are [agent], [push], [[command]] and [[command.param]])",
                name.as_str().escape_debug()
            ),
            Self::ArrayOfTables(name) => write!(
                f,
                "array of tables [[{}]] (the tables are [agent], [push], [[command]] and \
                 [[command.param]])",
                name.as_str().escape_debug()
            ),
        }
    }
}

/// The type a key's value must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// A string.
    String,
    /// An integer.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// An array.
    Array,
    /// A string (a name) or an integer (an id).
    StringOrInteger,
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::String => "a string",
            Self::Integer => "an integer",
            Self::Boolean => "a boolean",
            Self::Array => "an array",
            Self::StringOrInteger => "a string (a name) or an integer (an id)",
        })
    }
}

/// A fixed capacity of the config (see the constants in [`crate::config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    /// [`MAX_COMMANDS`](super::MAX_COMMANDS) commands.
    Commands,
    /// [`MAX_PARAMS`](super::MAX_PARAMS) parameters per command.
    Params,
    /// [`MAX_ARGV`](super::MAX_ARGV) `args` elements per command.
    Args,
    /// [`MAX_ENV`](super::MAX_ENV) `env` entries per command.
    Env,
}

impl Capacity {
    /// The limit.
    pub const fn max(self) -> usize {
        match self {
            Self::Commands => super::MAX_COMMANDS,
            Self::Params => super::MAX_PARAMS,
            Self::Args => super::MAX_ARGV,
            Self::Env => super::MAX_ENV,
        }
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Commands => write!(f, "too many commands (at most {})", self.max()),
            Self::Params => write!(
                f,
                "too many parameters in one command (at most {})",
                self.max()
            ),
            Self::Args => write!(f, "too many \"args\" elements (at most {})", self.max()),
            Self::Env => write!(f, "too many \"env\" entries (at most {})", self.max()),
        }
    }
}

/// What is wrong with an allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    // --- Lexical ---
    /// A control character (other than tab) in a string or comment, or a lone carriage return.
    ControlCharacter,
    /// A string holds U+0000, which no path, argument or name can carry.
    NulCharacter,
    /// A backslash escape TOML does not define, or a `\u`/`\U` that is not a Unicode scalar.
    InvalidEscape,
    /// A string not closed on its line.
    UnterminatedString,
    /// An array not closed before the end of the file.
    UnterminatedArray,
    /// Inside an array, something other than `,` or `]` after an element.
    ExpectedComma,
    /// A key not followed by `=`.
    ExpectedEquals,
    /// No valid value after `=` (a bare word, say).
    ExpectedValue,
    /// More on the line after a complete value or header.
    TrailingCharacters,
    /// A line that starts with neither a key, a header nor a comment.
    InvalidKey,
    /// A table header that is not well formed.
    InvalidHeader,
    /// An integer with a leading zero, a misplaced underscore or a stray character.
    InvalidInteger,
    /// An integer outside the 64-bit signed range.
    IntegerOverflow,
    /// TOML that the Portless subset does not accept.
    Unsupported(Unsupported),

    // --- Structure ---
    /// `[agent]` or `[push]` appears twice.
    DuplicateTable(Table),
    /// `[[command.param]]` before any `[[command]]`.
    ParamOutsideCommand,
    /// A key the table does not have.
    UnknownKey {
        /// The key as written.
        key: Snippet,
        /// Where it was found.
        table: Table,
    },
    /// A key given twice in one table.
    DuplicateKey {
        /// The key.
        key: &'static str,
        /// The table.
        table: Table,
    },
    /// A required key is absent; reported at the table's header.
    MissingKey {
        /// The key.
        key: &'static str,
        /// The table.
        table: Table,
    },
    /// A value of the wrong type.
    WrongType {
        /// The key.
        key: &'static str,
        /// What it must be.
        expected: ValueType,
        /// What it is.
        found: ValueType,
    },
    /// An array element of the wrong type (all arrays of the subset hold strings).
    WrongElementType {
        /// The key.
        key: &'static str,
        /// What the element is.
        found: ValueType,
    },

    // --- Meaning ---
    /// A number outside the key's range.
    OutOfRange {
        /// The key.
        key: &'static str,
        /// The value given.
        value: i64,
        /// Smallest value allowed.
        min: i64,
        /// Largest value allowed.
        max: i64,
    },
    /// A string longer than the key allows.
    TooLong {
        /// The key.
        key: &'static str,
        /// Most bytes allowed.
        max: usize,
    },
    /// A fixed capacity would be exceeded.
    TooMany(Capacity),
    /// All strings of the config together exceed [`ARENA_BYTES`](super::ARENA_BYTES).
    ArenaFull,
    /// A command name that is not 1..=64 of `[A-Za-z0-9._-]`.
    InvalidCommandName(Snippet),
    /// Two commands with one name.
    DuplicateCommand(Snippet),
    /// A path that must be absolute is not.
    NotAbsolute {
        /// The key.
        key: &'static str,
    },
    /// A user or group name that is not 1..=32 of `[A-Za-z0-9._-]` starting with no `-`.
    InvalidPrincipal {
        /// The key.
        key: &'static str,
    },
    /// An `env` entry that is not `KEY=VALUE` with `KEY` matching `[A-Za-z_][A-Za-z0-9_]*`.
    InvalidEnv(Snippet),
    /// One variable set twice in `env`.
    DuplicateEnv(Snippet),
    /// An `args` element `{name}` that names no declared parameter.
    UnknownPlaceholder(Snippet),
    /// A declared parameter that no `args` element uses; reported at its header.
    UnusedParam(Snippet),
    /// A parameter used by more than one `args` element.
    ParamUsedTwice(Snippet),
    /// A parameter name that is not 1..=32 of `[a-z0-9_]`.
    InvalidParamName(Snippet),
    /// Two parameters of one command with one name.
    DuplicateParam(Snippet),
    /// A `kind` other than `"integer"`, `"choice"` and `"string"`.
    UnknownParamKind(Snippet),
    /// A parameter key that its kind does not use (`choices` on an integer, say).
    KeyNotForKind {
        /// The key.
        key: &'static str,
        /// The parameter's kind.
        kind: &'static str,
    },
    /// An integer parameter with `min > max`.
    MinAboveMax {
        /// `min` as given.
        min: i64,
        /// `max` as given.
        max: i64,
    },
    /// A string parameter with `min_len > max_len`.
    MinLenAboveMaxLen {
        /// `min_len` as given.
        min_len: u16,
        /// `max_len` as given.
        max_len: u16,
    },
    /// An empty `choices` array.
    NoChoices,
    /// A choice that is empty, longer than 64 characters or contains `|`.
    InvalidChoice(Snippet),
    /// One choice listed twice.
    DuplicateChoice(Snippet),
    /// A `charset` that does not parse.
    InvalidCharset(CharsetError),
    /// A command's listing would carry more than
    /// [`MAX_LISTING_TEXT`](super::MAX_LISTING_TEXT) bytes of text.
    ListingTooLarge {
        /// Bytes of text (at least; counting stops at the first excess).
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

impl fmt::Display for ConfigErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ControlCharacter => {
                f.write_str("control character (other than tab) or lone carriage return")
            }
            Self::NulCharacter => f.write_str("strings may not contain U+0000"),
            Self::InvalidEscape => f.write_str(
                "invalid escape sequence (TOML allows \\b \\t \\n \\f \\r \\\" \\\\ \\uXXXX \
                 \\UXXXXXXXX)",
            ),
            Self::UnterminatedString => f.write_str("string is not closed on its line"),
            Self::UnterminatedArray => f.write_str("array is not closed with ']'"),
            Self::ExpectedComma => f.write_str("expected ',' or ']' after an array element"),
            Self::ExpectedEquals => f.write_str("expected '=' after the key"),
            Self::ExpectedValue => f.write_str(
                "expected a value: a quoted string, an integer, true, false or an array",
            ),
            Self::TrailingCharacters => {
                f.write_str("unexpected characters after the value or header")
            }
            Self::InvalidKey => {
                f.write_str("expected a key (letters, digits, '_' and '-'), a header or a comment")
            }
            Self::InvalidHeader => f.write_str("malformed table header"),
            Self::InvalidInteger => f.write_str(
                "invalid integer (a leading zero, a misplaced '_' or a stray character)",
            ),
            Self::IntegerOverflow => f.write_str("integer does not fit in 64 bits"),
            Self::Unsupported(what) => {
                write!(f, "{what} is not supported by the Portless config subset")
            }
            Self::DuplicateTable(table) => write!(f, "{table} appears more than once"),
            Self::ParamOutsideCommand => f.write_str("[[command.param]] before any [[command]]"),
            Self::UnknownKey { key, table } => write!(f, "unknown key {key} in {table}"),
            Self::DuplicateKey { key, table } => write!(f, "duplicate key \"{key}\" in {table}"),
            Self::MissingKey { key, table } => {
                write!(f, "missing required key \"{key}\" in {table}")
            }
            Self::WrongType {
                key,
                expected,
                found,
            } => write!(f, "\"{key}\" must be {expected}, not {found}"),
            Self::WrongElementType { key, found } => {
                write!(
                    f,
                    "every element of \"{key}\" must be a string, not {found}"
                )
            }
            Self::OutOfRange {
                key,
                value,
                min,
                max,
            } => write!(f, "\"{key}\" = {value} is outside {min}..={max}"),
            Self::TooLong { key, max } => write!(f, "\"{key}\" is longer than {max} bytes"),
            Self::TooMany(capacity) => write!(f, "{capacity}"),
            Self::ArenaFull => write!(
                f,
                "the config's strings exceed {} bytes in all",
                super::ARENA_BYTES
            ),
            Self::InvalidCommandName(name) => write!(
                f,
                "command name {name} must be 1 to {} of A-Z a-z 0-9 . _ -",
                super::MAX_NAME_LEN
            ),
            Self::DuplicateCommand(name) => write!(f, "command {name} is defined twice"),
            Self::NotAbsolute { key } => write!(f, "\"{key}\" must be an absolute path"),
            Self::InvalidPrincipal { key } => write!(
                f,
                "\"{key}\" must be a name of 1 to {} of A-Z a-z 0-9 . _ - (not starting with '-') \
                 or a numeric id",
                super::MAX_PRINCIPAL_LEN
            ),
            Self::InvalidEnv(entry) => write!(
                f,
                "env entry {entry} is not KEY=VALUE with KEY matching [A-Za-z_][A-Za-z0-9_]*"
            ),
            Self::DuplicateEnv(key) => write!(f, "env variable {key} is set twice"),
            Self::UnknownPlaceholder(name) => {
                write!(f, "\"args\" element {name} names no declared parameter")
            }
            Self::UnusedParam(name) => {
                write!(f, "parameter {name} is used by no \"args\" element")
            }
            Self::ParamUsedTwice(name) => {
                write!(
                    f,
                    "parameter {name} is used by more than one \"args\" element"
                )
            }
            Self::InvalidParamName(name) => write!(
                f,
                "parameter name {name} must be 1 to {} of a-z 0-9 _",
                super::MAX_PARAM_NAME_LEN
            ),
            Self::DuplicateParam(name) => write!(f, "parameter {name} is declared twice"),
            Self::UnknownParamKind(kind) => write!(
                f,
                "unknown parameter kind {kind} (expected \"integer\", \"choice\" or \"string\")"
            ),
            Self::KeyNotForKind { key, kind } => {
                write!(
                    f,
                    "\"{key}\" does not apply to a parameter of kind \"{kind}\""
                )
            }
            Self::MinAboveMax { min, max } => {
                write!(f, "\"min\" ({min}) is greater than \"max\" ({max})")
            }
            Self::MinLenAboveMaxLen { min_len, max_len } => write!(
                f,
                "\"min_len\" ({min_len}) is greater than \"max_len\" ({max_len})"
            ),
            Self::NoChoices => f.write_str("\"choices\" must list at least one choice"),
            Self::InvalidChoice(choice) => write!(
                f,
                "choice {choice} must be 1 to {} characters without '|'",
                super::MAX_CHOICE_LEN
            ),
            Self::DuplicateChoice(choice) => write!(f, "choice {choice} is listed twice"),
            Self::InvalidCharset(e) => write!(f, "invalid \"charset\": {e}"),
            Self::ListingTooLarge { bytes, max } => write!(
                f,
                "the command's name, description, parameter names, choices and charsets take \
                 {bytes} bytes, more than the {max} that fit its listing"
            ),
        }
    }
}
