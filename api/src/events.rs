//! The event stream of `GET /v1/executions/{id}/follow`: newline-delimited JSON, one
//! [`FollowLine`] per line, output first (what is kept already, then what arrives) and the
//! execution's final record last.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::executions::{ExecutionRecord, Stream};

/// The longest line of a follow stream a client accepts (a line carries one piece of
/// output, base64-encoded, or the final record).
pub const MAX_FOLLOW_LINE: usize = 64 * 1024 * 1024;

/// The largest piece of output one line carries.
pub const FOLLOW_CHUNK: usize = 64 * 1024;

/// One line of a follow stream, as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FollowLine {
    /// A piece of kept output.
    Output {
        /// Which stream.
        stream: Stream,
        /// Where `data` starts in the stream.
        offset: u64,
        /// The bytes, in standard base64 with padding.
        data: String,
    },
    /// The execution ended; nothing follows.
    End {
        /// Its final record.
        execution: Box<ExecutionRecord>,
    },
}

impl FollowLine {
    /// The line of `data` at `offset` of `stream`.
    pub fn output(stream: Stream, offset: u64, data: &[u8]) -> Self {
        Self::Output {
            stream,
            offset,
            data: base64::engine::general_purpose::STANDARD.encode(data),
        }
    }

    /// The line that ends the stream.
    pub fn end(execution: ExecutionRecord) -> Self {
        Self::End {
            execution: Box::new(execution),
        }
    }

    /// The line as sent: its JSON and a newline.
    pub fn to_line(&self) -> String {
        // Serializing these types cannot fail: no map has non-string keys.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}

/// One event of a follow stream, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowEvent {
    /// Output bytes at `offset` of `stream`.
    Output {
        /// Which stream.
        stream: Stream,
        /// Where `data` starts in the stream.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The execution ended; nothing follows.
    End(Box<ExecutionRecord>),
}

/// Decodes one line of a follow stream (without its newline).
pub fn parse_follow_line(line: &[u8]) -> Result<FollowEvent, String> {
    let parsed: FollowLine = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    Ok(match parsed {
        FollowLine::Output {
            stream,
            offset,
            data,
        } => FollowEvent::Output {
            stream,
            offset,
            data: base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| format!("output data is not base64: {e}"))?,
        },
        FollowLine::End { execution } => FollowEvent::End(execution),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executions::ExecState;

    #[test]
    fn follow_lines_decode() {
        let e =
            parse_follow_line(br#"{"type":"output","stream":"stderr","offset":5,"data":"aGk="}"#)
                .expect("output");
        assert_eq!(
            e,
            FollowEvent::Output {
                stream: Stream::Stderr,
                offset: 5,
                data: b"hi".to_vec()
            }
        );
        assert!(
            parse_follow_line(br#"{"type":"output","stream":"stdout","offset":0,"data":"!"}"#)
                .is_err()
        );
        let end = parse_follow_line(
            br#"{"type":"end","execution":{"id":3,"vm":"vm1","command":"uname","state":"succeeded","exit_code":0}}"#,
        )
        .expect("end");
        match end {
            FollowEvent::End(r) => {
                assert_eq!(
                    (r.id.0, r.state, r.exit_code),
                    (3, ExecState::Succeeded, Some(0))
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lines_round_trip() {
        let line = FollowLine::output(Stream::Stdout, 7, b"hello\n").to_line();
        assert!(line.ends_with('\n'));
        assert_eq!(
            parse_follow_line(line.trim_end().as_bytes()),
            Ok(FollowEvent::Output {
                stream: Stream::Stdout,
                offset: 7,
                data: b"hello\n".to_vec()
            })
        );
    }
}
