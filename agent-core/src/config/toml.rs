//! A lexer for the subset of TOML that allow-lists are written in, so that the file stays
//! checkable by any TOML tool while the agent needs no general TOML parser (and no allocator).
//!
//! It turns the text into a sequence of [`Item`]s: table headers and `key = value` entries,
//! each with its line. Strings are validated here but unescaped lazily ([`TomlStr::chars`]) so
//! the loader can copy them straight into its arena; arrays are validated here and walked
//! again by the loader ([`Array::elements`]). Whatever TOML allows beyond the subset is
//! recognised well enough to be refused as [`Unsupported`] rather than misread.

use super::error::{ConfigError, ConfigErrorKind, Snippet, Unsupported};

type Kind = ConfigErrorKind;

/// A table header the subset knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Header {
    /// `[agent]`
    Agent,
    /// `[push]`
    Push,
    /// `[[command]]`
    Command,
    /// `[[command.param]]`
    Param,
}

/// One logical line of the file that is not blank or a comment.
#[derive(Debug, Clone, Copy)]
pub(super) enum Item<'a> {
    /// A table header.
    Header(Header),
    /// `key = value`.
    Entry {
        /// The bare key.
        key: &'a str,
        /// The value.
        value: Value<'a>,
    },
}

/// A value of the subset.
#[derive(Debug, Clone, Copy)]
pub(super) enum Value<'a> {
    /// A basic or literal string, validated.
    String(TomlStr<'a>),
    /// A decimal integer.
    Integer(i64),
    /// `true` or `false`.
    Boolean(bool),
    /// An array, validated (never found inside another array).
    Array(Array<'a>),
}

/// A validated string as it appears between its quotes.
#[derive(Debug, Clone, Copy)]
pub(super) struct TomlStr<'a> {
    raw: &'a str,
    literal: bool,
}

impl<'a> TomlStr<'a> {
    /// The characters of the string's value, escapes resolved.
    pub(super) fn chars(&self) -> StrChars<'a> {
        StrChars {
            raw: self.raw.chars(),
            literal: self.literal,
        }
    }
}

/// The unescaped characters of a [`TomlStr`].
pub(super) struct StrChars<'a> {
    raw: core::str::Chars<'a>,
    literal: bool,
}

impl StrChars<'_> {
    fn hex(&mut self, digits: usize) -> char {
        let mut value = 0u32;
        for _ in 0..digits {
            let digit = self.raw.next().and_then(|c| c.to_digit(16)).unwrap_or(0);
            value = value.wrapping_mul(16).wrapping_add(digit);
        }
        char::from_u32(value).unwrap_or(char::REPLACEMENT_CHARACTER)
    }
}

impl Iterator for StrChars<'_> {
    type Item = char;

    fn next(&mut self) -> Option<char> {
        let c = self.raw.next()?;
        if self.literal || c != '\\' {
            return Some(c);
        }
        // The lexer has validated every escape; anything else cannot occur.
        Some(match self.raw.next()? {
            'b' => '\u{8}',
            't' => '\t',
            'n' => '\n',
            'f' => '\u{c}',
            'r' => '\r',
            'u' => self.hex(4),
            'U' => self.hex(8),
            other => other,
        })
    }
}

/// A validated array: where its elements start, to walk them again.
#[derive(Debug, Clone, Copy)]
pub(super) struct Array<'a> {
    src: &'a str,
    /// Byte position just after the opening `[`.
    start: usize,
    /// Line of the opening `[`.
    line: u32,
}

impl<'a> Array<'a> {
    /// The elements, each with its line.
    pub(super) fn elements(&self) -> Elements<'a> {
        Elements {
            cur: Cursor {
                src: self.src,
                pos: self.start,
                line: self.line,
            },
            open_line: self.line,
            state: ElementState::Start,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ElementState {
    Start,
    AfterValue,
    AfterComma,
    Done,
}

/// The elements of an [`Array`]: `(line, value)`, or the error that ends the walk.
pub(super) struct Elements<'a> {
    cur: Cursor<'a>,
    open_line: u32,
    state: ElementState,
}

impl<'a> Elements<'a> {
    fn step(&mut self) -> Result<Option<(u32, Value<'a>)>, ConfigError> {
        loop {
            if self.state == ElementState::Done {
                return Ok(None);
            }
            self.cur.skip_blank_lines(self.open_line)?;
            let next = self.cur.peek();
            match (self.state, next) {
                (_, Some(b']')) => {
                    self.cur.pos += 1;
                    self.state = ElementState::Done;
                    return Ok(None);
                }
                (ElementState::AfterValue, Some(b',')) => {
                    self.cur.pos += 1;
                    self.state = ElementState::AfterComma;
                }
                (ElementState::AfterValue, _) => {
                    return Err(self.cur.error(Kind::ExpectedComma));
                }
                (_, Some(b'[')) => {
                    return Err(self.cur.error(Kind::Unsupported(Unsupported::NestedArray)));
                }
                _ => {
                    let line = self.cur.line;
                    let value = self.cur.scalar()?;
                    self.state = ElementState::AfterValue;
                    return Ok(Some((line, value)));
                }
            }
        }
    }
}

impl<'a> Iterator for Elements<'a> {
    type Item = Result<(u32, Value<'a>), ConfigError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.state == ElementState::Done {
            return None;
        }
        let step = self.step();
        if step.is_err() {
            self.state = ElementState::Done;
        }
        step.transpose()
    }
}

/// Splits the text into [`Item`]s.
pub(super) struct Lexer<'a> {
    cur: Cursor<'a>,
}

impl<'a> Lexer<'a> {
    pub(super) const fn new(src: &'a str) -> Self {
        Self {
            cur: Cursor {
                src,
                pos: 0,
                line: 1,
            },
        }
    }

    /// The next header or entry with its line, or `None` at the end of the text.
    pub(super) fn next_item(&mut self) -> Result<Option<(u32, Item<'a>)>, ConfigError> {
        loop {
            self.cur.skip_ws();
            let line = self.cur.line;
            let item = match self.cur.peek() {
                None => return Ok(None),
                Some(b'#') => {
                    self.cur.end_of_line()?;
                    continue;
                }
                Some(b'\n' | b'\r') => {
                    if !self.cur.newline() {
                        return Err(self.cur.error(Kind::ControlCharacter));
                    }
                    continue;
                }
                Some(b'[') => Item::Header(self.cur.header()?),
                Some(_) => self.cur.entry()?,
            };
            self.cur.end_of_line()?;
            return Ok(Some((line, item)));
        }
    }
}

/// A position in the text. Every byte it steps over one at a time is ASCII; the others are
/// skipped as whole characters, so `pos` always sits on a character boundary.
#[derive(Debug, Clone, Copy)]
struct Cursor<'a> {
    src: &'a str,
    pos: usize,
    line: u32,
}

const fn is_bare_key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Control characters TOML forbids in strings and comments (everything below space except
/// tab, and DEL).
const fn is_forbidden_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.src.as_bytes().get(self.pos).copied()
    }

    fn peek_at(&self, ahead: usize) -> Option<u8> {
        self.src
            .as_bytes()
            .get(self.pos.saturating_add(ahead))
            .copied()
    }

    fn rest(&self) -> &'a str {
        self.src.get(self.pos..).unwrap_or("")
    }

    const fn error(&self, kind: Kind) -> ConfigError {
        ConfigError::new(self.line, kind)
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.pos += 1;
        }
    }

    /// Consumes a line break (LF or CRLF) if one is next.
    fn newline(&mut self) -> bool {
        let len = match (self.peek(), self.peek_at(1)) {
            (Some(b'\n'), _) => 1,
            (Some(b'\r'), Some(b'\n')) => 2,
            _ => return false,
        };
        self.pos += len;
        self.line = self.line.saturating_add(1);
        true
    }

    /// Skips a comment up to (not including) its line break.
    fn comment(&mut self) -> Result<(), ConfigError> {
        // Precondition: at '#'.
        self.pos += 1;
        while let Some(b) = self.peek() {
            match b {
                b'\n' => break,
                b'\r' if self.peek_at(1) == Some(b'\n') => break,
                b if is_forbidden_control(b) => return Err(self.error(Kind::ControlCharacter)),
                _ => self.pos += 1,
            }
        }
        Ok(())
    }

    /// After an item: optional whitespace and comment, then a line break or the end.
    fn end_of_line(&mut self) -> Result<(), ConfigError> {
        self.skip_ws();
        if self.peek() == Some(b'#') {
            self.comment()?;
        }
        match self.peek() {
            None => Ok(()),
            Some(b'\n' | b'\r') if self.newline() => Ok(()),
            Some(b'\r') => Err(self.error(Kind::ControlCharacter)),
            Some(_) => Err(self.error(Kind::TrailingCharacters)),
        }
    }

    /// Inside an array: skips whitespace, comments and line breaks.
    fn skip_blank_lines(&mut self, open_line: u32) -> Result<(), ConfigError> {
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'#') => self.comment()?,
                Some(b'\n' | b'\r') => {
                    if !self.newline() {
                        return Err(self.error(Kind::ControlCharacter));
                    }
                }
                None => return Err(ConfigError::new(open_line, Kind::UnterminatedArray)),
                Some(_) => return Ok(()),
            }
        }
    }

    fn bare_key(&mut self) -> &'a str {
        let start = self.pos;
        while self.peek().is_some_and(is_bare_key_byte) {
            self.pos += 1;
        }
        self.src.get(start..self.pos).unwrap_or("")
    }

    /// One part of a header's key, with the whitespace around it.
    fn header_key_part(&mut self) -> Result<&'a str, ConfigError> {
        self.skip_ws();
        if matches!(self.peek(), Some(b'"' | b'\'')) {
            return Err(self.error(Kind::Unsupported(Unsupported::QuotedKey)));
        }
        let part = self.bare_key();
        if part.is_empty() {
            return Err(self.error(Kind::InvalidHeader));
        }
        self.skip_ws();
        Ok(part)
    }

    fn header(&mut self) -> Result<Header, ConfigError> {
        // Precondition: at '['.
        self.pos += 1;
        let double = self.peek() == Some(b'[');
        if double {
            self.pos += 1;
        }
        let name_start = self.pos;
        let mut parts: [&str; 2] = ["", ""];
        let mut count = 0usize;
        loop {
            let part = self.header_key_part()?;
            if let Some(slot) = parts.get_mut(count) {
                *slot = part;
            }
            count += 1;
            if self.peek() == Some(b'.') {
                self.pos += 1;
            } else {
                break;
            }
        }
        let name = self.src.get(name_start..self.pos).unwrap_or("").trim();
        let close: &[u8] = if double { b"]]" } else { b"]" };
        if !self.rest().as_bytes().starts_with(close) {
            return Err(self.error(Kind::InvalidHeader));
        }
        self.pos += close.len();
        match (double, count, parts) {
            (false, 1, ["agent", _]) => Ok(Header::Agent),
            (false, 1, ["push", _]) => Ok(Header::Push),
            (true, 1, ["command", _]) => Ok(Header::Command),
            (true, 2, ["command", "param"]) => Ok(Header::Param),
            (false, ..) => {
                Err(self.error(Kind::Unsupported(Unsupported::Table(Snippet::new(name)))))
            }
            (true, ..) => Err(self.error(Kind::Unsupported(Unsupported::ArrayOfTables(
                Snippet::new(name),
            )))),
        }
    }

    fn entry(&mut self) -> Result<Item<'a>, ConfigError> {
        if matches!(self.peek(), Some(b'"' | b'\'')) {
            return Err(self.error(Kind::Unsupported(Unsupported::QuotedKey)));
        }
        let key = self.bare_key();
        if key.is_empty() {
            return Err(self.error(Kind::InvalidKey));
        }
        self.skip_ws();
        match self.peek() {
            Some(b'=') => self.pos += 1,
            Some(b'.') => return Err(self.error(Kind::Unsupported(Unsupported::DottedKey))),
            _ => return Err(self.error(Kind::ExpectedEquals)),
        }
        self.skip_ws();
        let value = if self.peek() == Some(b'[') {
            self.pos += 1;
            let array = Array {
                src: self.src,
                start: self.pos,
                line: self.line,
            };
            let mut elements = array.elements();
            for element in &mut elements {
                element?;
            }
            *self = elements.cur;
            Value::Array(array)
        } else {
            self.scalar()?
        };
        Ok(Item::Entry { key, value })
    }

    /// A string, integer or boolean (or a recognised unsupported value).
    fn scalar(&mut self) -> Result<Value<'a>, ConfigError> {
        let rest = self.rest();
        match self.peek() {
            Some(b'"') if rest.starts_with("\"\"\"") => {
                Err(self.error(Kind::Unsupported(Unsupported::MultiLineString)))
            }
            Some(b'\'') if rest.starts_with("'''") => {
                Err(self.error(Kind::Unsupported(Unsupported::MultiLineString)))
            }
            Some(b'"') => self.basic_string(),
            Some(b'\'') => self.literal_string(),
            Some(b'{') => Err(self.error(Kind::Unsupported(Unsupported::InlineTable))),
            _ => self.bare_value(),
        }
    }

    fn basic_string(&mut self) -> Result<Value<'a>, ConfigError> {
        // Precondition: at '"'.
        self.pos += 1;
        let start = self.pos;
        loop {
            let Some(b) = self.peek() else {
                return Err(self.error(Kind::UnterminatedString));
            };
            match b {
                b'"' => break,
                b'\\' => self.escape()?,
                b'\n' => return Err(self.error(Kind::UnterminatedString)),
                b'\r' if self.peek_at(1) == Some(b'\n') => {
                    return Err(self.error(Kind::UnterminatedString));
                }
                b if is_forbidden_control(b) => return Err(self.error(Kind::ControlCharacter)),
                _ => self.pos += 1,
            }
        }
        let raw = self.src.get(start..self.pos).unwrap_or("");
        self.pos += 1;
        Ok(Value::String(TomlStr {
            raw,
            literal: false,
        }))
    }

    /// Validates one escape sequence and steps over it.
    fn escape(&mut self) -> Result<(), ConfigError> {
        // Precondition: at '\'.
        let digits = match self.peek_at(1) {
            Some(b'b' | b't' | b'n' | b'f' | b'r' | b'"' | b'\\') => {
                self.pos += 2;
                return Ok(());
            }
            Some(b'u') => 4,
            Some(b'U') => 8,
            None => return Err(self.error(Kind::UnterminatedString)),
            Some(_) => return Err(self.error(Kind::InvalidEscape)),
        };
        let hex = self
            .src
            .get(self.pos + 2..self.pos + 2 + digits)
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| self.error(Kind::InvalidEscape))?;
        let value = u32::from_str_radix(hex, 16).map_err(|_| self.error(Kind::InvalidEscape))?;
        match char::from_u32(value) {
            None => Err(self.error(Kind::InvalidEscape)),
            Some('\0') => Err(self.error(Kind::NulCharacter)),
            Some(_) => {
                self.pos += 2 + digits;
                Ok(())
            }
        }
    }

    fn literal_string(&mut self) -> Result<Value<'a>, ConfigError> {
        // Precondition: at '\''.
        self.pos += 1;
        let start = self.pos;
        loop {
            let Some(b) = self.peek() else {
                return Err(self.error(Kind::UnterminatedString));
            };
            match b {
                b'\'' => break,
                b'\n' => return Err(self.error(Kind::UnterminatedString)),
                b'\r' if self.peek_at(1) == Some(b'\n') => {
                    return Err(self.error(Kind::UnterminatedString));
                }
                b if is_forbidden_control(b) => return Err(self.error(Kind::ControlCharacter)),
                _ => self.pos += 1,
            }
        }
        let raw = self.src.get(start..self.pos).unwrap_or("");
        self.pos += 1;
        Ok(Value::String(TomlStr { raw, literal: true }))
    }

    /// Booleans and numbers: everything up to the next delimiter, then classified.
    fn bare_value(&mut self) -> Result<Value<'a>, ConfigError> {
        let start = self.pos;
        while self.peek().is_some_and(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.' | b':')
        }) {
            self.pos += 1;
        }
        let token = self.src.get(start..self.pos).unwrap_or("");
        classify(token).map_err(|kind| self.error(kind))
    }
}

/// What a bare token is: a boolean, a decimal integer, or something refused.
fn classify(token: &str) -> Result<Value<'_>, Kind> {
    match token {
        "true" => return Ok(Value::Boolean(true)),
        "false" => return Ok(Value::Boolean(false)),
        _ => {}
    }
    let unsigned = token.strip_prefix(['+', '-']).unwrap_or(token);
    if matches!(unsigned, "inf" | "nan") {
        return Err(Kind::Unsupported(Unsupported::Float));
    }
    if !unsigned.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(Kind::ExpectedValue);
    }
    if ["0x", "0o", "0b"].iter().any(|p| unsigned.starts_with(p)) {
        return Err(Kind::Unsupported(Unsupported::NonDecimalInteger));
    }
    let has = |set: &[char]| unsigned.contains(set);
    if has(&['e', 'E']) {
        return Err(Kind::Unsupported(Unsupported::Float));
    }
    if has(&['-', ':']) {
        return Err(Kind::Unsupported(Unsupported::DateTime));
    }
    if has(&['.']) {
        return Err(Kind::Unsupported(Unsupported::Float));
    }
    decimal(token).map(Value::Integer)
}

/// A TOML decimal integer: optional sign, no leading zero, `_` only between digits.
fn decimal(token: &str) -> Result<i64, Kind> {
    let (negative, digits) = match token.as_bytes().first() {
        Some(b'-') => (true, token.get(1..).unwrap_or("")),
        Some(b'+') => (false, token.get(1..).unwrap_or("")),
        _ => (false, token),
    };
    let bytes = digits.as_bytes();
    if bytes.len() > 1 && bytes.first() == Some(&b'0') {
        return Err(Kind::InvalidInteger);
    }
    let mut magnitude: u64 = 0;
    let mut previous_digit = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'0'..=b'9' => {
                magnitude = magnitude
                    .checked_mul(10)
                    .and_then(|m| m.checked_add(u64::from(b - b'0')))
                    .ok_or(Kind::IntegerOverflow)?;
                previous_digit = true;
            }
            b'_' if previous_digit && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                previous_digit = false;
            }
            _ => return Err(Kind::InvalidInteger),
        }
    }
    if !previous_digit {
        return Err(Kind::InvalidInteger);
    }
    if negative {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
    .ok_or(Kind::IntegerOverflow)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::String;
    use std::vec::Vec;

    fn items(src: &str) -> Result<Vec<(u32, Item<'_>)>, ConfigError> {
        let mut lexer = Lexer::new(src);
        let mut out = Vec::new();
        while let Some(item) = lexer.next_item()? {
            out.push(item);
        }
        Ok(out)
    }

    fn value(src: &str) -> Result<Value<'_>, ConfigError> {
        match items(src)?.as_slice() {
            [(_, Item::Entry { value, .. })] => Ok(*value),
            other => panic!("not one entry: {other:?}"),
        }
    }

    fn string(src: &str) -> Result<String, ConfigError> {
        match value(src)? {
            Value::String(s) => Ok(s.chars().collect()),
            other => panic!("not a string: {other:?}"),
        }
    }

    fn integer(src: &str) -> Result<i64, ConfigError> {
        match value(src)? {
            Value::Integer(i) => Ok(i),
            other => panic!("not an integer: {other:?}"),
        }
    }

    fn kind<T: core::fmt::Debug>(r: Result<T, ConfigError>) -> ConfigErrorKind {
        r.unwrap_err().kind
    }

    #[test]
    fn headers() {
        let got = items("[agent]\n[ push ]\n[[command]]\n[[ command . param ]]\n[[command.param]]")
            .unwrap();
        let headers: Vec<_> = got
            .iter()
            .map(|(line, item)| match item {
                Item::Header(h) => (*line, *h),
                Item::Entry { .. } => panic!(),
            })
            .collect();
        assert_eq!(
            headers,
            [
                (1, Header::Agent),
                (2, Header::Push),
                (3, Header::Command),
                (4, Header::Param),
                (5, Header::Param)
            ]
        );
        assert_eq!(
            kind(items("[agents]")),
            Kind::Unsupported(Unsupported::Table(Snippet::new("agents")))
        );
        assert_eq!(
            kind(items("[command]")),
            Kind::Unsupported(Unsupported::Table(Snippet::new("command")))
        );
        assert_eq!(
            kind(items("[[agent]]")),
            Kind::Unsupported(Unsupported::ArrayOfTables(Snippet::new("agent")))
        );
        assert_eq!(
            kind(items("[[command.param.x]]")),
            Kind::Unsupported(Unsupported::ArrayOfTables(Snippet::new("command.param.x")))
        );
        assert_eq!(
            kind(items("[agent.x]")),
            Kind::Unsupported(Unsupported::Table(Snippet::new("agent.x")))
        );
        assert_eq!(
            kind(items("[\"agent\"]")),
            Kind::Unsupported(Unsupported::QuotedKey)
        );
        for bad in [
            "[agent",
            "[]",
            "[[command]",
            "[ [command]]",
            "[[command] ]",
            "[agent.]",
        ] {
            assert_eq!(kind(items(bad)), Kind::InvalidHeader, "{bad}");
        }
        assert_eq!(kind(items("[agent] x")), Kind::TrailingCharacters);
        assert!(items("[agent] # comment").is_ok());
    }

    #[test]
    fn entries_and_lines() {
        let got = items("# c\n\n  a = 1 # one\r\nb-c_D9 = true\n\t\te=false").unwrap();
        let summary: Vec<_> = got
            .iter()
            .map(|(line, item)| match item {
                Item::Entry { key, .. } => (*line, *key),
                Item::Header(_) => panic!(),
            })
            .collect();
        assert_eq!(summary, [(3, "a"), (4, "b-c_D9"), (5, "e")]);
        assert_eq!(kind(items("a 1")), Kind::ExpectedEquals);
        assert_eq!(kind(items("a")), Kind::ExpectedEquals);
        assert_eq!(kind(items("= 1")), Kind::InvalidKey);
        assert_eq!(kind(items("$ = 1")), Kind::InvalidKey);
        assert_eq!(
            kind(items("a.b = 1")),
            Kind::Unsupported(Unsupported::DottedKey)
        );
        assert_eq!(
            kind(items("a . b = 1")),
            Kind::Unsupported(Unsupported::DottedKey)
        );
        assert_eq!(
            kind(items("\"a\" = 1")),
            Kind::Unsupported(Unsupported::QuotedKey)
        );
        assert_eq!(
            kind(items("'a' = 1")),
            Kind::Unsupported(Unsupported::QuotedKey)
        );
        assert_eq!(kind(items("a = 1 b = 2")), Kind::TrailingCharacters);
        assert_eq!(kind(items("a = ")), Kind::ExpectedValue);
        assert_eq!(kind(items("a = nginx")), Kind::ExpectedValue);
        let err = items("a = 1\n\nb = x").unwrap_err();
        assert_eq!(err.line, 3);
    }

    #[test]
    fn line_breaks_and_comments() {
        assert!(items("a = 1\r\n\r\nb = 2\r\n").is_ok());
        assert_eq!(kind(items("a = 1\rb = 2")), Kind::ControlCharacter);
        assert_eq!(kind(items("\r")), Kind::ControlCharacter);
        assert_eq!(kind(items("# bell \u{7}")), Kind::ControlCharacter);
        assert_eq!(kind(items("# del \u{7f}")), Kind::ControlCharacter);
        assert_eq!(kind(items("# cr \r here")), Kind::ControlCharacter);
        assert!(items("# tab\t and ünïcödé\n").is_ok());
        assert!(items("").is_ok());
    }

    #[test]
    fn basic_strings() {
        assert_eq!(string(r#"a = "plain""#).unwrap(), "plain");
        assert_eq!(string(r#"a = """#).unwrap(), "");
        assert_eq!(
            string(r#"a = "\b\t\n\f\r\"\\ \u00e9 \U0001F600""#).unwrap(),
            "\u{8}\t\n\u{c}\r\"\\ é 😀"
        );
        assert_eq!(
            string("a = \"tab\there # not a comment\"").unwrap(),
            "tab\there # not a comment"
        );
        assert_eq!(string("a = \"ünï\"").unwrap(), "ünï");
        for bad in [
            r#"a = "\x""#,
            r#"a = "\e""#,
            r#"a = "\u12""#,
            r#"a = "\u12G4""#,
            r#"a = "\uD800""#,
            r#"a = "\U00110000""#,
            r#"a = "\ ""#,
        ] {
            assert_eq!(kind(items(bad)), Kind::InvalidEscape, "{bad}");
        }
        assert_eq!(kind(items(r#"a = "\u0000""#)), Kind::NulCharacter);
        assert_eq!(kind(items("a = \"open")), Kind::UnterminatedString);
        assert_eq!(kind(items("a = \"open\nb\"")), Kind::UnterminatedString);
        assert_eq!(kind(items("a = \"open\r\n\"")), Kind::UnterminatedString);
        assert_eq!(kind(items("a = \"ends in \\")), Kind::UnterminatedString);
        assert_eq!(kind(items("a = \"bell \u{7}\"")), Kind::ControlCharacter);
        assert_eq!(kind(items("a = \"nul \0\"")), Kind::ControlCharacter);
        assert_eq!(kind(items("a = \"cr \r\"")), Kind::ControlCharacter);
        assert_eq!(
            kind(items("a = \"\"\"x\"\"\"")),
            Kind::Unsupported(Unsupported::MultiLineString)
        );
        assert_eq!(kind(items("a = \"x\" y")), Kind::TrailingCharacters);
    }

    #[test]
    fn literal_strings() {
        assert_eq!(string(r"a = 'C:\no\escapes'").unwrap(), r"C:\no\escapes");
        assert_eq!(string("a = ''").unwrap(), "");
        assert_eq!(string("a = 'say \"hi\"'").unwrap(), "say \"hi\"");
        assert_eq!(kind(items("a = 'open")), Kind::UnterminatedString);
        assert_eq!(kind(items("a = 'open\n'")), Kind::UnterminatedString);
        assert_eq!(kind(items("a = 'bell \u{7}'")), Kind::ControlCharacter);
        assert_eq!(
            kind(items("a = '''x'''")),
            Kind::Unsupported(Unsupported::MultiLineString)
        );
    }

    #[test]
    fn integers() {
        for (src, want) in [
            ("0", 0),
            ("+0", 0),
            ("-0", 0),
            ("42", 42),
            ("+42", 42),
            ("-17", -17),
            ("1_000", 1000),
            ("5_349_221", 5_349_221),
            ("1_2_3", 123),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
        ] {
            assert_eq!(integer(&std::format!("a = {src}")).unwrap(), want, "{src}");
        }
        for bad in [
            "01", "-01", "00", "0_0", "1__0", "_1", "1_", "+_1", "1a", "+", "-", "12abc", "++1",
        ] {
            let got = kind(items(&std::format!("a = {bad}")));
            assert!(
                matches!(got, Kind::InvalidInteger | Kind::ExpectedValue),
                "{bad}: {got:?}"
            );
        }
        assert_eq!(kind(items("a = 01")), Kind::InvalidInteger);
        assert_eq!(kind(items("a = 1__0")), Kind::InvalidInteger);
        assert_eq!(
            kind(items("a = 9223372036854775808")),
            Kind::IntegerOverflow
        );
        assert_eq!(
            kind(items("a = -9223372036854775809")),
            Kind::IntegerOverflow
        );
        assert_eq!(
            kind(items("a = 99999999999999999999999")),
            Kind::IntegerOverflow
        );
    }

    #[test]
    fn unsupported_values() {
        let float = Kind::Unsupported(Unsupported::Float);
        let date = Kind::Unsupported(Unsupported::DateTime);
        for (src, want) in [
            ("1.5", &float),
            ("-0.1", &float),
            ("1e3", &float),
            ("1E-3", &float),
            ("inf", &float),
            ("-nan", &float),
            ("+inf", &float),
            ("1979-05-27", &date),
            ("1979-05-27T07:32:00Z", &date),
            ("1979-05-27 07:32:00", &date),
            ("07:32:00", &date),
            ("1979-05-27T00:32:00.999999-07:00", &date),
        ] {
            assert_eq!(&kind(items(&std::format!("a = {src}"))), want, "{src}");
        }
        assert_eq!(
            kind(items("a = 0xff")),
            Kind::Unsupported(Unsupported::NonDecimalInteger)
        );
        assert_eq!(
            kind(items("a = 0o7")),
            Kind::Unsupported(Unsupported::NonDecimalInteger)
        );
        assert_eq!(
            kind(items("a = 0b1")),
            Kind::Unsupported(Unsupported::NonDecimalInteger)
        );
        assert_eq!(
            kind(items("a = { x = 1 }")),
            Kind::Unsupported(Unsupported::InlineTable)
        );
        assert_eq!(kind(items("a = True")), Kind::ExpectedValue);
    }

    fn elements(src: &str) -> Result<Vec<(u32, String)>, ConfigError> {
        let Value::Array(array) = value(src)? else {
            panic!("not an array")
        };
        array
            .elements()
            .map(|e| {
                e.map(|(line, v)| {
                    let text = match v {
                        Value::String(s) => s.chars().collect(),
                        Value::Integer(i) => std::format!("{i}"),
                        Value::Boolean(b) => std::format!("{b}"),
                        Value::Array(_) => panic!("nested"),
                    };
                    (line, text)
                })
            })
            .collect()
    }

    #[test]
    fn arrays() {
        assert_eq!(elements("a = []").unwrap(), []);
        assert_eq!(elements("a = [ ]").unwrap(), []);
        assert_eq!(
            elements("a = [\"x\", 'y', 3, true]").unwrap(),
            [
                (1, "x".into()),
                (1, "y".into()),
                (1, "3".into()),
                (1, "true".into())
            ]
        );
        let multi = "a = [ # opening comment\n  \"one\", # first\r\n\n  # a whole comment line\n  \"two\",\n]\nb = 1";
        assert_eq!(
            elements(multi.split_once("\nb").unwrap().0).unwrap(),
            [(2, "one".into()), (5, "two".into())]
        );
        let got = items(multi).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, 7);
        assert_eq!(elements("a = [1,]").unwrap(), [(1, "1".into())]);
        assert_eq!(
            elements("a = [\n1\n,\n2\n]").unwrap(),
            [(2, "1".into()), (4, "2".into())]
        );
        assert_eq!(kind(items("a = [,]")), Kind::ExpectedValue);
        assert_eq!(kind(items("a = [1,,]")), Kind::ExpectedValue);
        assert_eq!(kind(items("a = [1 2]")), Kind::ExpectedComma);
        assert_eq!(
            kind(items("a = [[1]]")),
            Kind::Unsupported(Unsupported::NestedArray)
        );
        assert_eq!(
            kind(items("a = [1, [2]]")),
            Kind::Unsupported(Unsupported::NestedArray)
        );
        assert_eq!(
            kind(items("a = [{}]")),
            Kind::Unsupported(Unsupported::InlineTable)
        );
        let open = items("x = 1\na = [1,\n2\n").unwrap_err();
        assert_eq!((open.line, open.kind), (2, Kind::UnterminatedArray));
        assert_eq!(kind(items("a = [\"x\n\"]")), Kind::UnterminatedString);
        assert_eq!(kind(items("a = [1] 2")), Kind::TrailingCharacters);
        assert_eq!(kind(items("a = [1 # c \u{1}\n]")), Kind::ControlCharacter);
        assert_eq!(kind(items("a = [1\r]")), Kind::ControlCharacter);
        let bad = items("a = [\n1,\n01]").unwrap_err();
        assert_eq!((bad.line, bad.kind), (3, Kind::InvalidInteger));
    }
}
