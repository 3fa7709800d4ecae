//! Agent messages copied out of the frame buffer (so that handling one may send), and the
//! allow-list entries of a listing in the API's form.

use ring_protocol::message::{
    AgentToHost, ExecState, ExecutionId as AgentExecId, Finished, Metrics, ParamKind, PushOutcome,
    Rejection, Stream,
};

use super::{CommandInfo, Param};

/// A listed command in the API's form.
pub(super) fn describe(info: &ring_protocol::message::CommandInfo<'_>) -> CommandInfo {
    let params = info
        .params
        .iter()
        .map(|p| match p.kind {
            ParamKind::Integer { min, max } => Param::Integer {
                name: p.name.to_owned(),
                min,
                max,
            },
            ParamKind::OneOf { choices } => Param::Choice {
                name: p.name.to_owned(),
                choices: choices.split('|').map(str::to_owned).collect(),
            },
            ParamKind::Text {
                class,
                min_len,
                max_len,
            } => Param::String {
                name: p.name.to_owned(),
                charset: class.to_owned(),
                min_len,
                max_len,
            },
        })
        .collect();
    CommandInfo {
        name: info.name.to_owned(),
        description: info.description.to_owned(),
        params,
        timeout_ms: info.timeout_ms,
        max_output: info.max_output,
    }
}

pub(super) enum OwnedMsg {
    Hello {
        generation: u32,
        software: String,
        config_revision: u32,
        reply: bool,
    },
    Pong {
        nonce: u64,
    },
    Command {
        request_id: u64,
        info: CommandInfo,
    },
    CommandsEnd {
        request_id: u64,
        next: Option<u16>,
    },
    Accepted {
        request_id: u64,
        execution: AgentExecId,
    },
    Rejected {
        request_id: u64,
        reason: Rejection,
    },
    Output {
        execution: AgentExecId,
        stream: Stream,
        offset: u64,
        data: Vec<u8>,
    },
    /// `Exit` or `Ended` (`leftovers` 0 for `Exit`).
    Exit {
        execution: AgentExecId,
        finished: Finished,
        leftovers: u32,
    },
    Status {
        request_id: u64,
        execution: AgentExecId,
        state: ExecState,
    },
    PushResult {
        push_id: u64,
        outcome: PushOutcome,
    },
    Metrics {
        request_id: u64,
        metrics: Metrics,
    },
    CommandsChanged {
        config_revision: u32,
    },
    Error(String),
}

impl OwnedMsg {
    pub(super) fn from(msg: &AgentToHost<'_>) -> Self {
        match msg {
            AgentToHost::Hello(h) => Self::Hello {
                generation: h.generation,
                software: h.software.to_owned(),
                config_revision: h.config_revision,
                reply: h.reply,
            },
            AgentToHost::Pong { nonce } => Self::Pong { nonce: *nonce },
            AgentToHost::Command {
                request_id, info, ..
            } => Self::Command {
                request_id: *request_id,
                info: describe(info),
            },
            AgentToHost::CommandsEnd {
                request_id, next, ..
            } => Self::CommandsEnd {
                request_id: *request_id,
                next: *next,
            },
            AgentToHost::Accepted {
                request_id,
                execution,
            } => Self::Accepted {
                request_id: *request_id,
                execution: *execution,
            },
            AgentToHost::Rejected { request_id, reason } => Self::Rejected {
                request_id: *request_id,
                reason: *reason,
            },
            AgentToHost::Output {
                execution,
                stream,
                offset,
                data,
            } => Self::Output {
                execution: *execution,
                stream: *stream,
                offset: *offset,
                data: data.to_vec(),
            },
            AgentToHost::Exit {
                execution,
                finished,
            } => Self::Exit {
                execution: *execution,
                finished: *finished,
                leftovers: 0,
            },
            AgentToHost::Ended {
                execution,
                finished,
                leftovers,
            } => Self::Exit {
                execution: *execution,
                finished: *finished,
                leftovers: *leftovers,
            },
            AgentToHost::Status {
                request_id,
                execution,
                state,
            } => Self::Status {
                request_id: *request_id,
                execution: *execution,
                state: *state,
            },
            AgentToHost::PushResult { push_id, outcome } => Self::PushResult {
                push_id: *push_id,
                outcome: *outcome,
            },
            AgentToHost::Metrics {
                request_id,
                metrics,
            } => Self::Metrics {
                request_id: *request_id,
                metrics: *metrics,
            },
            AgentToHost::CommandsChanged { config_revision } => Self::CommandsChanged {
                config_revision: *config_revision,
            },
            AgentToHost::Error(e) => Self::Error(e.detail.to_owned()),
        }
    }
}

/// Bytes a listed command takes in memory, roughly: its strings and a fixed part.
pub(super) fn listing_cost(c: &CommandInfo) -> usize {
    let params: usize = c
        .params
        .iter()
        .map(|p| match p {
            Param::Integer { name, .. } => name.len() + 32,
            Param::Choice { name, choices } => {
                name.len() + choices.iter().map(|c| c.len() + 24).sum::<usize>() + 32
            }
            Param::String { name, charset, .. } => name.len() + charset.len() + 32,
            Param::Other => 32,
        })
        .sum();
    c.name.len() + c.description.len() + params + 64
}
