//! The character classes of string parameters (`charset = "a-zA-Z0-9._/-"`): their syntax,
//! checked once when the config loads, and membership, checked for every argument.
//!
//! A class is a sequence of single characters and ranges `a-z`. A `-` is literal only as the
//! first or last character; `\` makes the next character literal (`\-`, `\\`). Nothing else is
//! special, and there is no negation. The class is kept as written and interpreted on each
//! check, so it needs no storage of its own; both walks share one iterator, so what loads is
//! exactly what is enforced.

use core::fmt;
use core::str::Chars;

/// Why a class does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CharsetError {
    /// The class allows no character.
    Empty,
    /// A `\` at the end escapes nothing.
    TrailingBackslash,
    /// A `-` that is neither first, last, escaped nor between the ends of a range.
    MisplacedDash,
    /// A range whose end comes before its start (`z-a`).
    ReversedRange {
        /// The start as written.
        low: char,
        /// The end as written.
        high: char,
    },
}

impl fmt::Display for CharsetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Empty => f.write_str("the class is empty"),
            Self::TrailingBackslash => f.write_str("'\\' at the end escapes nothing"),
            Self::MisplacedDash => {
                f.write_str("a literal '-' must come first or last, or be escaped as '\\-'")
            }
            Self::ReversedRange { low, high } => write!(
                f,
                "range '{}-{}' ends before it starts",
                low.escape_debug(),
                high.escape_debug()
            ),
        }
    }
}

impl core::error::Error for CharsetError {}

/// A validated character class, borrowing its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charset<'a> {
    class: &'a str,
}

impl<'a> Charset<'a> {
    /// Checks the syntax of `class`.
    pub fn parse(class: &'a str) -> Result<Self, CharsetError> {
        if class.is_empty() {
            return Err(CharsetError::Empty);
        }
        for item in Items::new(class) {
            item?;
        }
        Ok(Self { class })
    }

    /// The class as written.
    pub const fn as_str(&self) -> &'a str {
        self.class
    }

    /// Whether `c` is in the class.
    pub fn contains(&self, c: char) -> bool {
        Items::new(self.class).any(|item| match item {
            Ok(Item::Single(x)) => x == c,
            Ok(Item::Range(low, high)) => (low..=high).contains(&c),
            Err(_) => false,
        })
    }

    /// Whether every character of `s` is in the class.
    pub fn matches(&self, s: &str) -> bool {
        s.chars().all(|c| self.contains(c))
    }
}

/// One element of a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Item {
    Single(char),
    Range(char, char),
}

/// Walks a class element by element.
struct Items<'a> {
    rest: Chars<'a>,
    at_start: bool,
    failed: bool,
}

impl<'a> Items<'a> {
    fn new(class: &'a str) -> Self {
        Self {
            rest: class.chars(),
            at_start: true,
            failed: false,
        }
    }

    fn item(&mut self) -> Option<Result<Item, CharsetError>> {
        let c = self.rest.next()?;
        let first = core::mem::replace(&mut self.at_start, false);
        let low = match c {
            '\\' => match self.rest.next() {
                Some(escaped) => escaped,
                None => return Some(Err(CharsetError::TrailingBackslash)),
            },
            '-' if first || self.rest.as_str().is_empty() => return Some(Ok(Item::Single('-'))),
            '-' => return Some(Err(CharsetError::MisplacedDash)),
            c => c,
        };
        // A '-' followed by something makes a range; a '-' at the very end is literal and
        // comes back as the next item.
        match self.rest.as_str().strip_prefix('-') {
            Some(after) if !after.is_empty() => {
                self.rest.next();
                let high = match self.rest.next() {
                    Some('\\') => match self.rest.next() {
                        Some(escaped) => escaped,
                        None => return Some(Err(CharsetError::TrailingBackslash)),
                    },
                    Some('-') | None => return Some(Err(CharsetError::MisplacedDash)),
                    Some(high) => high,
                };
                if high < low {
                    return Some(Err(CharsetError::ReversedRange { low, high }));
                }
                Some(Ok(Item::Range(low, high)))
            }
            _ => Some(Ok(Item::Single(low))),
        }
    }
}

impl Iterator for Items<'_> {
    type Item = Result<Item, CharsetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let item = self.item();
        if matches!(item, Some(Err(_))) {
            self.failed = true;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(class: &str) -> std::vec::Vec<Result<Item, CharsetError>> {
        Items::new(class).collect()
    }

    #[test]
    fn singles_ranges_and_dashes() {
        use Item::*;
        assert_eq!(
            items("a-zA-Z0-9._/-"),
            [
                Ok(Range('a', 'z')),
                Ok(Range('A', 'Z')),
                Ok(Range('0', '9')),
                Ok(Single('.')),
                Ok(Single('_')),
                Ok(Single('/')),
                Ok(Single('-')),
            ]
        );
        assert_eq!(items("-a"), [Ok(Single('-')), Ok(Single('a'))]);
        assert_eq!(items("-"), [Ok(Single('-'))]);
        assert_eq!(items("--"), [Ok(Single('-')), Ok(Single('-'))]);
        assert_eq!(items("-a-c"), [Ok(Single('-')), Ok(Range('a', 'c'))]);
        assert_eq!(items("a-"), [Ok(Single('a')), Ok(Single('-'))]);
        assert_eq!(
            items("a\\-z"),
            [Ok(Single('a')), Ok(Single('-')), Ok(Single('z'))]
        );
        assert_eq!(items("\\\\"), [Ok(Single('\\'))]);
        assert_eq!(items("\\--/"), [Ok(Range('-', '/'))]);
        assert_eq!(items("a-\\z"), [Ok(Range('a', 'z'))]);
        assert_eq!(items("é-ü"), [Ok(Range('é', 'ü'))]);
    }

    #[test]
    fn syntax_errors() {
        assert_eq!(Charset::parse(""), Err(CharsetError::Empty));
        assert_eq!(Charset::parse("a\\"), Err(CharsetError::TrailingBackslash));
        assert_eq!(Charset::parse("a-\\"), Err(CharsetError::TrailingBackslash));
        assert_eq!(Charset::parse("a-z-9"), Err(CharsetError::MisplacedDash));
        assert_eq!(Charset::parse("a--"), Err(CharsetError::MisplacedDash));
        assert_eq!(Charset::parse("--a"), Err(CharsetError::MisplacedDash));
        assert_eq!(
            Charset::parse("z-a"),
            Err(CharsetError::ReversedRange {
                low: 'z',
                high: 'a'
            })
        );
        assert!(Charset::parse("a-a").is_ok());
    }

    #[test]
    fn membership() {
        let class = Charset::parse("a-z0-9._/-").unwrap();
        assert!(class.matches("var/log-1.txt"));
        assert!(class.matches(""));
        assert!(!class.contains('A'));
        assert!(!class.contains(' '));
        assert!(!class.contains('\\'));
        let escaped = Charset::parse("\\\\x").unwrap();
        assert!(escaped.contains('\\'));
        assert!(escaped.contains('x'));
        assert!(!escaped.contains('y'));
        assert_eq!(escaped.as_str(), "\\\\x");
    }

    #[test]
    fn error_display() {
        let e = CharsetError::ReversedRange {
            low: 'z',
            high: 'a',
        };
        assert_eq!(std::format!("{e}"), "range 'z-a' ends before it starts");
    }
}
