//! The event stream of `GET /v1/events`: server-sent events (`text/event-stream`) that
//! carry VM state changes and the output and ends of executions, so that a page (or any
//! client) watches many VMs and executions over one connection.
//!
//! An output or end event's `id` is a [`Cursor`]: where every execution of the stream is,
//! in output offsets. A client that lost the connection sends the last id it saw as
//! `Last-Event-ID` (a browser's `EventSource` does so by itself), and the stream resumes
//! exactly there: no output is lost or sent twice.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::executions::{ExecutionId, ExecutionRecord, Stream};
use crate::vms::VmInfo;

/// The most executions one event stream follows (a cursor names each of them in every
/// event id, so it stays short).
pub const MAX_STREAM_EXECUTIONS: usize = 64;

/// The longest cursor a server accepts as `Last-Event-ID` or `cursor`.
pub const MAX_CURSOR_LEN: usize = MAX_STREAM_EXECUTIONS * 64;

/// Seconds between the keep-alive comments of an idle stream.
pub const KEEP_ALIVE_S: u64 = 15;

/// The reconnection delay a stream asks of `EventSource` (`retry:`), in milliseconds.
pub const RETRY_MS: u64 = 1000;

/// The data of an `output` event: a piece of an execution's kept output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputEvent {
    /// The execution.
    pub execution: ExecutionId,
    /// Which stream.
    pub stream: Stream,
    /// Where `data` starts in the stream.
    pub offset: u64,
    /// The bytes, in standard base64 with padding.
    pub data: String,
}

/// One event of `GET /v1/events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// `vm`: a VM's state (every visible VM once at the start, then on each change).
    Vm(Box<VmInfo>),
    /// `execution`: an execution's record (each once at the start, then on each change of
    /// state before its end).
    Execution(Box<ExecutionRecord>),
    /// `output`: a piece of output; its bytes decoded.
    Output {
        /// The execution.
        execution: ExecutionId,
        /// Which stream.
        stream: Stream,
        /// Where `data` starts in the stream.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// `end`: an execution's final record; nothing more comes for it.
    End(Box<ExecutionRecord>),
}

impl StreamEvent {
    /// The event's name, its `event:` field.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Vm(_) => "vm",
            Self::Execution(_) => "execution",
            Self::Output { .. } => "output",
            Self::End(_) => "end",
        }
    }

    /// The event as sent: `event:`, `id:` when given, and one `data:` line of JSON.
    pub fn to_sse(&self, id: Option<&Cursor>) -> String {
        // Serializing these types cannot fail: no map has non-string keys.
        let data = match self {
            Self::Vm(vm) => serde_json::to_string(vm),
            Self::Execution(rec) | Self::End(rec) => serde_json::to_string(rec),
            Self::Output {
                execution,
                stream,
                offset,
                data,
            } => serde_json::to_string(&OutputEvent {
                execution: *execution,
                stream: *stream,
                offset: *offset,
                data: base64::engine::general_purpose::STANDARD.encode(data),
            }),
        }
        .unwrap_or_default();
        let mut out = format!("event: {}\n", self.name());
        if let Some(id) = id {
            out.push_str("id: ");
            out.push_str(&id.to_string());
            out.push('\n');
        }
        out.push_str("data: ");
        out.push_str(&data);
        out.push_str("\n\n");
        out
    }

    /// Decodes an event from its name and data. An unknown name is `Ok(None)`: new event
    /// kinds may be added within `/v1`.
    pub fn parse(name: &str, data: &str) -> Result<Option<Self>, String> {
        let err = |e: serde_json::Error| format!("{name} event: {e}");
        Ok(Some(match name {
            "vm" => Self::Vm(Box::new(serde_json::from_str(data).map_err(err)?)),
            "execution" => Self::Execution(Box::new(serde_json::from_str(data).map_err(err)?)),
            "end" => Self::End(Box::new(serde_json::from_str(data).map_err(err)?)),
            "output" => {
                let o: OutputEvent = serde_json::from_str(data).map_err(err)?;
                Self::Output {
                    execution: o.execution,
                    stream: o.stream,
                    offset: o.offset,
                    data: base64::engine::general_purpose::STANDARD
                        .decode(o.data)
                        .map_err(|e| format!("output data is not base64: {e}"))?,
                }
            }
            _ => return Ok(None),
        }))
    }
}

/// Where one execution of a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// Output sent up to these offsets of stdout and stderr; the end not yet.
    At {
        /// Bytes of stdout sent.
        stdout: u64,
        /// Bytes of stderr sent.
        stderr: u64,
    },
    /// Its end was sent: nothing more comes.
    Ended,
}

impl Position {
    /// Bytes of `stream` sent (0 once ended: nothing more is sent).
    pub fn offset(self, stream: Stream) -> u64 {
        match (self, stream) {
            (Self::At { stdout, .. }, Stream::Stdout) => stdout,
            (Self::At { stderr, .. }, Stream::Stderr) => stderr,
            (Self::Ended, _) => 0,
        }
    }
}

/// The `id` of an output or end event: the position of every execution of the stream,
/// written `ID:STDOUT:STDERR` or `ID:end`, joined by commas (`12:120:0,13:end`). An
/// execution a cursor does not name starts at offset 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(pub BTreeMap<ExecutionId, Position>);

impl Cursor {
    /// The position of `id` (the start when the cursor does not name it).
    pub fn position(&self, id: ExecutionId) -> Position {
        self.0.get(&id).copied().unwrap_or(Position::At {
            stdout: 0,
            stderr: 0,
        })
    }

    /// Parses a cursor, refusing anything else: a bad cursor is a bad request, not a
    /// restart from zero.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() > MAX_CURSOR_LEN {
            return Err(format!("a cursor is at most {MAX_CURSOR_LEN} bytes"));
        }
        let mut map = BTreeMap::new();
        if s.trim().is_empty() {
            return Ok(Self(map));
        }
        for part in s.split(',') {
            let mut fields = part.split(':');
            let bad = || format!("cursor entry {part:?} is not ID:STDOUT:STDERR or ID:end");
            let number = |f: Option<&str>| -> Result<u64, String> {
                f.filter(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|f| f.parse().ok())
                    .ok_or_else(bad)
            };
            let id = ExecutionId(number(fields.next())?);
            let position = match (fields.next(), fields.next(), fields.next()) {
                (Some("end"), None, None) => Position::Ended,
                (Some(out), Some(err), None) => Position::At {
                    stdout: number(Some(out))?,
                    stderr: number(Some(err))?,
                },
                _ => return Err(bad()),
            };
            if map.insert(id, position).is_some() {
                return Err(format!("cursor names execution {id} twice"));
            }
            if map.len() > MAX_STREAM_EXECUTIONS {
                return Err(format!(
                    "a cursor names at most {MAX_STREAM_EXECUTIONS} executions"
                ));
            }
        }
        Ok(Self(map))
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, (id, position)) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            match position {
                Position::At { stdout, stderr } => write!(f, "{id}:{stdout}:{stderr}")?,
                Position::Ended => write!(f, "{id}:end")?,
            }
        }
        Ok(())
    }
}

/// What to watch (`GET /v1/events`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsRequest {
    /// Send the VMs' states (`vms=true`).
    pub vms: bool,
    /// The executions to follow, at most [`MAX_STREAM_EXECUTIONS`].
    pub executions: Vec<ExecutionId>,
    /// Resume here (sent as `Last-Event-ID`).
    pub cursor: Option<Cursor>,
}

impl EventsRequest {
    /// The request of a query string (`vms=true&execution=3&cursor=...`), or what is
    /// wrong with it.
    pub fn from_query(query: &str) -> Result<Self, String> {
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query).map_err(|e| format!("query: {e}"))?;
        let mut ask = Self::default();
        for (key, value) in pairs {
            match key.as_str() {
                "vms" => {
                    ask.vms = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(format!("vms is true or false, not {value:?}")),
                    };
                }
                "execution" => {
                    let id = value
                        .parse::<u64>()
                        .map_err(|_| format!("execution {value:?} is not an id"))?;
                    if !ask.executions.contains(&ExecutionId(id)) {
                        ask.executions.push(ExecutionId(id));
                    }
                }
                "cursor" => {
                    ask.cursor = Some(Cursor::parse(&value).map_err(|e| format!("cursor: {e}"))?);
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (vms, execution, cursor)"
                    ));
                }
            }
        }
        if ask.executions.len() > MAX_STREAM_EXECUTIONS {
            return Err(format!(
                "at most {MAX_STREAM_EXECUTIONS} executions per stream, not {}",
                ask.executions.len()
            ));
        }
        Ok(ask)
    }

    /// Where the stream starts: the `Last-Event-ID` header's cursor when there is one
    /// (a reconnecting `EventSource`), else the query's, else the beginning.
    pub fn start(&self, last_event_id: Option<&str>) -> Result<Cursor, String> {
        let cursor = match last_event_id {
            Some(id) => Cursor::parse(id).map_err(|e| format!("cursor: {e}"))?,
            None => self.cursor.clone().unwrap_or_default(),
        };
        Ok(Cursor(
            self.executions
                .iter()
                .map(|id| (*id, cursor.position(*id)))
                .collect(),
        ))
    }

    /// [`start`](Self::start) with the `Last-Event-ID` of a request's `headers`.
    pub fn start_at(&self, headers: &hyper::HeaderMap) -> Result<Cursor, String> {
        let last_id = headers
            .get("last-event-id")
            .map(|v| v.to_str())
            .transpose()
            .map_err(|_| "Last-Event-ID is not text".to_owned())?;
        self.start(last_id)
    }

    /// The route with its query string.
    pub fn path(&self) -> String {
        let mut q = Vec::new();
        if self.vms {
            q.push("vms=true".to_owned());
        }
        for id in &self.executions {
            q.push(format!("execution={id}"));
        }
        if q.is_empty() {
            "/v1/events".to_owned()
        } else {
            format!("/v1/events?{}", q.join("&"))
        }
    }
}

/// The longest event a client accepts (an output event carries at most 64 KiB of output,
/// base64-encoded; a record is far smaller).
pub const MAX_EVENT_LEN: usize = 1 << 20;

/// A decoder of `text/event-stream`: feed it bytes, take events. It keeps the last event id
/// as the stream defines it (an event without `id:` keeps the previous one).
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    name: String,
    data: String,
    id: Option<String>,
    /// The id in force after the last event taken.
    pub last_id: Option<String>,
}

/// A raw event: its name, data and the id in force after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseFrame {
    /// `event:`, `message` when absent.
    pub name: String,
    /// The `data:` lines joined by newlines.
    pub data: String,
    /// The last event id after this event.
    pub id: Option<String>,
}

impl SseDecoder {
    /// Adds received bytes; an error when an event grows past [`MAX_EVENT_LEN`].
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        if self.buf.len() + bytes.len() + self.data.len() > MAX_EVENT_LEN {
            return Err(format!(
                "an event longer than {MAX_EVENT_LEN} bytes: not a Portless stream"
            ));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// The next complete event, if one is buffered.
    pub fn next_frame(&mut self) -> Option<SseFrame> {
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if line.is_empty() {
                if self.data.is_empty() && self.name.is_empty() {
                    if let Some(id) = self.id.take() {
                        self.last_id = Some(id);
                    }
                    continue;
                }
                if let Some(id) = self.id.take() {
                    self.last_id = Some(id);
                }
                let name = std::mem::take(&mut self.name);
                let frame = SseFrame {
                    name: if name.is_empty() {
                        "message".into()
                    } else {
                        name
                    },
                    data: std::mem::take(&mut self.data),
                    id: self.last_id.clone(),
                };
                return Some(frame);
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f.to_owned(), v.strip_prefix(' ').unwrap_or(v).to_owned()),
                None => (line.clone(), String::new()),
            };
            match field.as_str() {
                "event" => self.name = value,
                "data" => {
                    if !self.data.is_empty() {
                        self.data.push('\n');
                    }
                    self.data.push_str(&value);
                }
                "id" if !value.contains('\0') => self.id = Some(value),
                _ => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_queries_parse_or_say_what_is_wrong() {
        use super::*;
        let a =
            EventsRequest::from_query("vms=true&execution=3&execution=4&execution=3").expect("ok");
        assert!(a.vms);
        assert_eq!(a.executions, vec![ExecutionId(3), ExecutionId(4)]);
        let a = EventsRequest::from_query("execution=3&cursor=3%3A10%3A0").expect("ok");
        assert_eq!(
            a.start(None)
                .expect("start")
                .position(ExecutionId(3))
                .offset(Stream::Stdout),
            10
        );
        assert!(EventsRequest::from_query("").is_ok());
        for bad in [
            "vms=yes",
            "execution=x",
            "execution=-1",
            "what=1",
            "cursor=!",
        ] {
            assert!(EventsRequest::from_query(bad).is_err(), "{bad}");
        }
        let many = (0..=MAX_STREAM_EXECUTIONS)
            .map(|i| format!("execution={i}"))
            .collect::<Vec<_>>()
            .join("&");
        assert!(EventsRequest::from_query(&many).is_err());
    }

    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = Cursor::parse("12:120:0,13:end").expect("parse");
        assert_eq!(
            c.position(ExecutionId(12)),
            Position::At {
                stdout: 120,
                stderr: 0
            }
        );
        assert_eq!(c.position(ExecutionId(13)), Position::Ended);
        assert_eq!(
            c.position(ExecutionId(14)),
            Position::At {
                stdout: 0,
                stderr: 0
            }
        );
        assert_eq!(c.to_string(), "12:120:0,13:end");
        assert_eq!(Cursor::parse("").expect("empty"), Cursor::default());
        for bad in [
            "12",
            "12:1",
            "12:1:2:3",
            "x:1:2",
            "12:-1:0",
            "12:1:2,12:end",
            "12:+1:0",
            ":1:2",
            "12:END",
        ] {
            assert!(Cursor::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = (0..=MAX_STREAM_EXECUTIONS as u64)
            .map(|i| format!("{i}:end"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(Cursor::parse(&long).is_err());
        assert!(Cursor::parse(&"1".repeat(MAX_CURSOR_LEN + 1)).is_err());
    }

    #[test]
    fn events_encode_and_decode() {
        let mut cursor = Cursor::default();
        cursor.0.insert(
            ExecutionId(3),
            Position::At {
                stdout: 2,
                stderr: 0,
            },
        );
        let ev = StreamEvent::Output {
            execution: ExecutionId(3),
            stream: Stream::Stdout,
            offset: 0,
            data: b"hi".to_vec(),
        };
        let text = ev.to_sse(Some(&cursor)) + ": keep-alive\n\n" + "event: future\ndata: {}\n\n";
        let mut d = SseDecoder::default();
        // Fed a byte at a time, the events come out whole.
        for b in text.as_bytes() {
            d.feed(&[*b]).expect("feed");
        }
        let f = d.next_frame().expect("frame");
        assert_eq!(
            (f.name.as_str(), f.id.as_deref()),
            ("output", Some("3:2:0"))
        );
        assert_eq!(StreamEvent::parse(&f.name, &f.data), Ok(Some(ev)));
        let f = d.next_frame().expect("second frame");
        assert_eq!(f.name, "future");
        assert_eq!(
            f.id.as_deref(),
            Some("3:2:0"),
            "an id-less event keeps the id"
        );
        assert_eq!(StreamEvent::parse(&f.name, &f.data), Ok(None));
        assert!(d.next_frame().is_none());
        assert!(StreamEvent::parse("output", r#"{"execution":1}"#).is_err());
    }

    #[test]
    fn the_request_path_lists_what_is_watched() {
        let r = EventsRequest {
            vms: true,
            executions: vec![ExecutionId(4), ExecutionId(9)],
            cursor: None,
        };
        assert_eq!(r.path(), "/v1/events?vms=true&execution=4&execution=9");
        assert_eq!(EventsRequest::default().path(), "/v1/events");
    }
}
