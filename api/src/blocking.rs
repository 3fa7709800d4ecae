//! The client's blocking face, for programs that have no async runtime (tools, tests,
//! scripts): each call runs the async [`crate::Client`]'s on a runtime of the client's own.
//!
//! ```no_run
//! use portless_api::blocking::Client;
//!
//! let client = Client::new("/run/portless/portless.sock")?;
//! for vm in client.vms()? {
//!     println!("{} {}", vm.name, vm.state);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io;
use std::path::PathBuf;

use crate::{
    AuditQuery, AuditRecord, CancelResponse, ClientError, CommandList, ConsoleCode, Cursor,
    DaemonState, Endpoint, EventsRequest, ExecRequest, ExecResponse, ExecutionId, ExecutionQuery,
    ExecutionRecord, FollowEvent, MetricsResponse, OutputChunk, PingResponse, PushRequest,
    PushResponse, RawResponse, Stream, StreamEvent, VmInfo, Whoami,
};

/// A blocking client of one daemon. It owns a tokio runtime with one worker thread: a call
/// runs on the caller's thread, while the connections it opened are driven (and, once
/// dropped, closed) by the worker, so that a [`Follow`] let go of ends its stream at once.
/// Not for use inside an async runtime (it would block a worker): use [`crate::Client`]
/// there.
#[derive(Debug)]
pub struct Client {
    inner: crate::Client,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    /// A client of the daemon listening on unix socket `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> io::Result<Self> {
        Self::from_async(crate::Client::new(socket))
    }

    /// A client of the daemon at `endpoint`.
    pub fn at(endpoint: Endpoint) -> io::Result<Self> {
        Self::from_async(crate::Client::at(endpoint))
    }

    /// The blocking face of `client` (its endpoint and token).
    pub fn from_async(client: crate::Client) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("portless-api-client")
            .enable_io()
            .enable_time()
            .build()?;
        Ok(Self {
            inner: client,
            runtime,
        })
    }

    /// The same client, presenting `token` as a bearer token.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.inner = self.inner.with_token(token);
        self
    }

    /// [`crate::Client::with_ca_pem`].
    pub fn with_ca_pem(mut self, pem: &[u8]) -> Result<Self, String> {
        self.inner = self.inner.with_ca_pem(pem)?;
        Ok(self)
    }

    /// The async client it drives.
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// [`crate::Client::vms`].
    pub fn vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.runtime.block_on(self.inner.vms())
    }

    /// [`crate::Client::commands`].
    pub fn commands(&self, vm: &str) -> Result<CommandList, ClientError> {
        self.runtime.block_on(self.inner.commands(vm))
    }

    /// [`crate::Client::exec`].
    pub fn exec(&self, request: &ExecRequest) -> Result<ExecResponse, ClientError> {
        self.runtime.block_on(self.inner.exec(request))
    }

    /// [`crate::Client::executions`].
    pub fn executions(&self, query: &ExecutionQuery) -> Result<Vec<ExecutionRecord>, ClientError> {
        self.runtime.block_on(self.inner.executions(query))
    }

    /// [`crate::Client::execution`].
    pub fn execution(&self, id: ExecutionId) -> Result<ExecutionRecord, ClientError> {
        self.runtime.block_on(self.inner.execution(id))
    }

    /// [`crate::Client::wait`].
    pub fn wait(
        &self,
        id: ExecutionId,
        timeout_ms: Option<u32>,
    ) -> Result<ExecutionRecord, ClientError> {
        self.runtime.block_on(self.inner.wait(id, timeout_ms))
    }

    /// [`crate::Client::wait_final`].
    pub fn wait_final(&self, id: ExecutionId) -> Result<ExecutionRecord, ClientError> {
        self.runtime.block_on(self.inner.wait_final(id))
    }

    /// [`crate::Client::output`].
    pub fn output(
        &self,
        id: ExecutionId,
        stream: Stream,
        offset: u64,
        limit: Option<usize>,
    ) -> Result<OutputChunk, ClientError> {
        self.runtime
            .block_on(self.inner.output(id, stream, offset, limit))
    }

    /// [`crate::Client::follow`], as an iterator of events.
    pub fn follow(&self, id: ExecutionId) -> Result<Follow<'_>, ClientError> {
        let inner = self.runtime.block_on(self.inner.follow(id))?;
        Ok(Follow {
            inner,
            runtime: &self.runtime,
            done: false,
        })
    }

    /// [`crate::Client::cancel`].
    pub fn cancel(&self, id: ExecutionId) -> Result<CancelResponse, ClientError> {
        self.runtime.block_on(self.inner.cancel(id))
    }

    /// [`crate::Client::push`].
    pub fn push(&self, push: PushRequest<'_>) -> Result<PushResponse, ClientError> {
        self.runtime.block_on(self.inner.push(push))
    }

    /// [`crate::Client::ping`].
    pub fn ping(&self, vm: &str) -> Result<PingResponse, ClientError> {
        self.runtime.block_on(self.inner.ping(vm))
    }

    /// [`crate::Client::metrics`].
    pub fn metrics(&self, vm: &str) -> Result<MetricsResponse, ClientError> {
        self.runtime.block_on(self.inner.metrics(vm))
    }

    /// [`crate::Client::audit`].
    pub fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, ClientError> {
        self.runtime.block_on(self.inner.audit(query))
    }

    /// [`crate::Client::events`].
    pub fn events(&self, request: &EventsRequest) -> Result<Events<'_>, ClientError> {
        let inner = self.runtime.block_on(self.inner.events(request))?;
        Ok(Events {
            inner,
            runtime: &self.runtime,
            done: false,
        })
    }

    /// [`crate::Client::whoami`].
    pub fn whoami(&self) -> Result<Whoami, ClientError> {
        self.runtime.block_on(self.inner.whoami())
    }

    /// [`crate::Client::console_code`].
    pub fn console_code(&self) -> Result<ConsoleCode, ClientError> {
        self.runtime.block_on(self.inner.console_code())
    }

    /// [`crate::Client::daemon`].
    pub fn daemon(&self) -> Result<DaemonState, ClientError> {
        self.runtime.block_on(self.inner.daemon())
    }

    /// [`crate::Client::raw`].
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<RawResponse, ClientError> {
        self.runtime
            .block_on(self.inner.raw(method, path, headers, body))
    }
}

/// A follow stream read by blocking: each item is the next event, until the execution's
/// end; a stream that breaks off yields its error, then ends.
#[derive(Debug)]
pub struct Follow<'c> {
    inner: crate::Follow,
    runtime: &'c tokio::runtime::Runtime,
    done: bool,
}

impl Iterator for Follow<'_> {
    type Item = Result<FollowEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.runtime.block_on(self.inner.next()).transpose();
        self.done = !matches!(item, Some(Ok(_)));
        item
    }
}

/// An event stream read by blocking: each item is the next event with the cursor in force
/// after it, until the daemon ends the stream; a stream that breaks off yields its error,
/// then ends.
#[derive(Debug)]
pub struct Events<'c> {
    inner: crate::Events,
    runtime: &'c tokio::runtime::Runtime,
    done: bool,
}

impl Iterator for Events<'_> {
    type Item = Result<(StreamEvent, Option<Cursor>), ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.runtime.block_on(self.inner.next()).transpose();
        self.done = !matches!(item, Some(Ok(_)));
        item
    }
}
