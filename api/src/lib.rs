//! The Portless API: the HTTP/JSON interface of a `portless` daemon (and, with the same
//! routes, of anything that answers for many of them), defined once.
//!
//! - The JSON types of every request and answer ([`vms`], [`executions`], [`audit`],
//!   [`daemon`], [`session`]), the follow stream of one execution ([`events`]), the event
//!   stream of many VMs and executions ([`stream`]), and the error body ([`ErrorBody`]). Servers serialize these types; clients deserialize them. Nothing else
//!   declares them.
//! - [`OPENAPI`]: the OpenAPI 3.1 document of the API, checked against these types and
//!   against the daemon's routes by tests.
//! - [`Client`]: an async client over a unix socket or TCP, and [`blocking::Client`], its
//!   blocking face for programs without a runtime.
//!
//! # Versioning
//!
//! Every route is under `/v1`. Within `/v1` changes are additive only: a field, a state, a
//! parameter kind or a route may be added; none is removed, renamed or given another meaning
//! or type. Clients tolerate what they do not know: unknown fields are ignored, absent
//! optional fields take their defaults, and an unknown state (of a VM, an execution, a push)
//! or parameter kind deserializes as the enum's `Unknown`/`Other` variant (an unknown
//! execution state counts as final). Anything else is a new version, `/v2`, served beside
//! `/v1` for as long as clients of `/v1` remain.
//!
//! The crate depends on serde and an HTTP client only: no storage, no server, no channel to
//! a guest.

pub mod audit;
pub mod blocking;
mod client;
pub mod daemon;
pub mod events;
pub mod executions;
pub mod feed;
pub mod fleet;
pub mod session;
pub mod stream;
pub mod vms;

use serde::{Deserialize, Serialize};

pub use audit::{AuditEntry, AuditLog, AuditOrder, AuditQuery, AuditRecord};
pub use client::{
    Client, ClientError, Endpoint, Events, Follow, RawResponse, encode, error_message,
};
pub use daemon::DaemonState;
pub use events::{FollowEvent, FollowLine, MAX_FOLLOW_LINE, parse_follow_line};
pub use executions::{
    BadLimit, CancelResponse, Dispatched, ExecRequest, ExecResponse, ExecState, ExecutionId,
    ExecutionList, ExecutionQuery, ExecutionRecord, Limit, OutputChunk, Stream, StreamTotals,
    WAIT_POLL_MS,
};
pub use executions::{MAX_IDEMPOTENCY_KEY, is_command_name};
pub use fleet::{FleetCommand, FleetPush, HostInfo, HostList, Invocation, ProgramInfo};
pub use session::{ConsoleCode, Rights, Whoami};
pub use stream::{Cursor, EventsRequest, OutputEvent, Position, StreamEvent};
pub use vms::{
    AgentCounters, CommandInfo, CommandList, CutOff, Metrics, MetricsResponse, Param, PingResponse,
    PushOutcome, PushRequest, PushResponse, VmInfo, VmList, VmState,
};

/// The OpenAPI 3.1 document of the API (`openapi.json` at the crate root).
pub const OPENAPI: &str = include_str!("../openapi.json");

/// The body of every error answer (4xx and 5xx): what is wrong, for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The message.
    pub error: String,
}

/// The response headers of `GET /v1/executions/{id}/output` that carry the stream's totals
/// (the body is the bytes themselves).
pub mod output_headers {
    /// Bytes of the stream produced.
    pub const TOTAL_LEN: &str = "x-portless-total-len";
    /// Bytes of the stream kept.
    pub const STORED_LEN: &str = "x-portless-stored-len";
    /// `true` when bytes were dropped for the cap.
    pub const TRUNCATED: &str = "x-portless-truncated";

    /// The three headers of a stream with these totals: `(name, value)`.
    pub fn of(totals: &crate::StreamTotals) -> [(&'static str, String); 3] {
        [
            (TOTAL_LEN, totals.total_len.to_string()),
            (STORED_LEN, totals.stored_len.to_string()),
            (TRUNCATED, totals.truncated.to_string()),
        ]
    }
}
