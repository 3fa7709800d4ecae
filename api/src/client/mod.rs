//! The client side of the API: what the `portless` CLI (and anything else in Rust) uses to
//! talk to a daemon, over its unix socket or its TCP listener.
//!
//! One HTTP/1.1 connection per request. Each route is a typed method of [`Client`]; the
//! JSON it answers is deserialized into the crate's types, which tolerate absent optional
//! fields and ignore unknown ones. A call the daemon refuses comes back as
//! [`ClientError::Api`] with the HTTP status and the daemon's `error` message.
//!
//! The methods need a tokio runtime: each connection is driven by a task of its own.
//! [`crate::blocking::Client`] brings its own.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::events::{FollowEvent, MAX_FOLLOW_LINE, parse_follow_line};
use crate::executions::{
    CancelResponse, ExecRequest, ExecResponse, ExecutionId, ExecutionList, ExecutionQuery,
    ExecutionRecord, OutputChunk, Stream, WAIT_POLL_MS,
};
use crate::session::{ConsoleCode, Whoami};
use crate::stream::{Cursor, EventsRequest, SseDecoder, StreamEvent};
use crate::vms::{
    CommandList, MetricsResponse, PingResponse, PushRequest, PushResponse, VmInfo, VmList,
};
use crate::{AuditQuery, AuditRecord, DaemonState, ErrorBody, output_headers};

/// Where a daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Its unix socket (callers are identified by their credentials).
    Unix(PathBuf),
    /// Its TCP listener, as `host:port` (callers present a bearer token). Plain HTTP: for
    /// a listener on loopback, or one reached through a TLS-terminating tunnel.
    Tcp(String),
    /// Its TCP listener over TLS, as `host:port`: a daemon with `tls_cert`, or a control
    /// plane. The server's certificate must name `host` and chain to a root of the
    /// system's store or to a CA given to the client ([`Client::with_ca_pem`]).
    Https(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "{}", path.display()),
            Self::Tcp(addr) => write!(f, "http://{addr}"),
            Self::Https(addr) => write!(f, "https://{addr}"),
        }
    }
}

/// What can go wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon could not be connected to: it is not running, or the address is wrong,
    /// or the caller may not use it.
    #[error(
        "cannot connect to the daemon at {endpoint}: {source}{}",
        connect_hint(endpoint)
    )]
    Connect {
        /// Where.
        endpoint: Endpoint,
        /// Why.
        source: io::Error,
    },
    /// The HTTP exchange failed (the daemon closed the connection, say).
    #[error("talking to the daemon at {endpoint}: {source}")]
    Http {
        /// Where.
        endpoint: Endpoint,
        /// Why.
        source: hyper::Error,
    },
    /// The daemon answered with an error status.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The daemon's `error` message (or the body, or the status's reason, when the body
        /// is not the usual JSON).
        message: String,
    },
    /// A follow stream stopped before the execution's end (the daemon went away).
    #[error("{request}: the stream ended before the execution did")]
    StreamEnded {
        /// The request.
        request: String,
    },
    /// The daemon's answer is not what the API promises.
    #[error("unexpected answer from the daemon to {request}: {detail}")]
    Protocol {
        /// The request (`GET /v1/vms`).
        request: String,
        /// What is wrong with the answer.
        detail: String,
    },
}

fn connect_hint(endpoint: &Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Unix(_) => {
            "; `portless serve` must be running (or pass --socket PATH, or set PORTLESS_SOCKET)"
        }
        Endpoint::Tcp(_) => "; the daemon's `tcp_listen` must be set and reachable",
        Endpoint::Https(_) => {
            "; the server must be reachable, and its certificate name the host and chain to a \
             trusted root (the system's, or --ca FILE / PORTLESS_CA)"
        }
    }
}

impl ClientError {
    /// The HTTP status of an error answer from the daemon.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the daemon could not be reached or the connection broke: the kind of error
    /// that a restart of the daemon causes and that may go away if the call is repeated.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Http { .. } | Self::StreamEnded { .. }
        )
    }
}

/// An answer as it came, whatever its status ([`Client::raw`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// The HTTP status.
    pub status: u16,
    /// The headers, names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A client of one daemon. Cheap to clone; holds no connection.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    token: Option<String>,
    /// The TLS configuration of an [`Endpoint::Https`]; `None`: the system's roots.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    /// A client of the daemon listening on unix socket `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self::at(Endpoint::Unix(socket.into()))
    }

    /// A client of the daemon at `endpoint`.
    pub fn at(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            token: None,
            tls: None,
        }
    }

    /// The same client, trusting the CA certificates of `pem` (PEM text) as well as the
    /// system's roots, for an [`Endpoint::Https`] whose certificate a private CA signed
    /// (or that is self-signed). An error says what is wrong with the text.
    pub fn with_ca_pem(mut self, pem: &[u8]) -> Result<Self, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("no certificate in it".into());
        }
        let mut roots = system_roots();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("not a usable CA certificate: {e}"))?;
        }
        self.tls = Some(tls_config(roots));
        Ok(self)
    }

    /// The same client, presenting `token` as `Authorization: Bearer <token>` (what the TCP
    /// listener needs; on the unix socket it stands in for the caller's credentials).
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Where the daemon listens.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `GET /v1/vms`: every VM the caller may see, with its state.
    pub async fn vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        let list: VmList = self.get_json("/v1/vms").await?;
        Ok(list.vms)
    }

    /// `GET /v1/vms/{vm}/commands`: the VM's allow-list.
    pub async fn commands(&self, vm: &str) -> Result<CommandList, ClientError> {
        self.get_json(&format!("/v1/vms/{}/commands", encode(vm)))
            .await
    }

    /// `POST /v1/exec`: runs a command on a target; answers once every execution is
    /// accepted or refused.
    pub async fn exec(&self, request: &ExecRequest) -> Result<ExecResponse, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Protocol {
            request: "POST /v1/exec".into(),
            detail: format!("cannot encode the request: {e}"),
        })?;
        self.call_json(
            Method::POST,
            "/v1/exec",
            Some((Bytes::from(body), "application/json")),
        )
        .await
    }

    /// `GET /v1/executions`: the newest executions the caller may see that match `query`.
    pub async fn executions(
        &self,
        query: &ExecutionQuery,
    ) -> Result<Vec<ExecutionRecord>, ClientError> {
        let mut q = Query::default();
        for (key, value) in query.pairs() {
            q.push(key, &value);
        }
        let path = match q.0.as_str() {
            "" => "/v1/executions".to_owned(),
            query => format!("/v1/executions?{query}"),
        };
        let list: ExecutionList = self.get_json(&path).await?;
        Ok(list.executions)
    }

    /// `GET /v1/executions/{id}`: an execution's record.
    pub async fn execution(&self, id: ExecutionId) -> Result<ExecutionRecord, ClientError> {
        self.get_json(&format!("/v1/executions/{id}")).await
    }

    /// `GET /v1/executions/{id}/wait`: the record once the execution has ended, or as it
    /// is after `timeout_ms` (the daemon's default when `None`).
    pub async fn wait(
        &self,
        id: ExecutionId,
        timeout_ms: Option<u32>,
    ) -> Result<ExecutionRecord, ClientError> {
        let path = match timeout_ms {
            Some(ms) => format!("/v1/executions/{id}/wait?timeout_ms={ms}"),
            None => format!("/v1/executions/{id}/wait"),
        };
        self.get_json(&path).await
    }

    /// Waits, as long as it takes, until the execution has ended; returns its final record.
    pub async fn wait_final(&self, id: ExecutionId) -> Result<ExecutionRecord, ClientError> {
        loop {
            let record = self.wait(id, Some(WAIT_POLL_MS)).await?;
            if record.state.is_final() {
                return Ok(record);
            }
        }
    }

    /// `GET /v1/executions/{id}/output`: up to `limit` bytes (the daemon's default when
    /// `None`) of a stream's kept output from `offset`, with the stream's totals.
    pub async fn output(
        &self,
        id: ExecutionId,
        stream: Stream,
        offset: u64,
        limit: Option<usize>,
    ) -> Result<OutputChunk, ClientError> {
        let mut path = format!("/v1/executions/{id}/output?stream={stream}&offset={offset}");
        if let Some(limit) = limit {
            path += &format!("&limit={limit}");
        }
        let response = self.call(Method::GET, &path, None).await?;
        let request = format!("GET {path}");
        let headers = response.headers().clone();
        let data = read_body(response, &self.endpoint).await?;
        Ok(OutputChunk {
            data: data.to_vec(),
            stored_len: header_u64(&headers, output_headers::STORED_LEN, &request)?,
            total_len: header_u64(&headers, output_headers::TOTAL_LEN, &request)?,
            truncated: header_bool(&headers, output_headers::TRUNCATED, &request)?,
        })
    }

    /// `GET /v1/executions/{id}/follow`: the execution's output as it arrives (what is
    /// already stored first), then its final record.
    pub async fn follow(&self, id: ExecutionId) -> Result<Follow, ClientError> {
        let path = format!("/v1/executions/{id}/follow");
        let (response, sender) = self.exchange(Method::GET, &path, &[], None).await?;
        let response = check_status(response, &self.endpoint).await?;
        Ok(Follow {
            body: response.into_body(),
            _sender: sender,
            buf: Vec::new(),
            ended: false,
            endpoint: self.endpoint.clone(),
            request: format!("GET {path}"),
        })
    }

    /// `GET /v1/events`: VM states and executions' output and ends as they happen, over
    /// one connection, from `request.cursor` when resuming.
    pub async fn events(&self, request: &EventsRequest) -> Result<Events, ClientError> {
        let path = request.path();
        let cursor = request.cursor.as_ref().map(ToString::to_string);
        let headers: Vec<(&str, &str)> = cursor
            .as_deref()
            .map(|c| ("last-event-id", c))
            .into_iter()
            .collect();
        let (response, sender) = self.exchange(Method::GET, &path, &headers, None).await?;
        let response = check_status(response, &self.endpoint).await?;
        Ok(Events {
            body: response.into_body(),
            _sender: sender,
            decoder: SseDecoder::default(),
            endpoint: self.endpoint.clone(),
            request: format!("GET {path}"),
        })
    }

    /// `GET /v1/whoami`: the caller's principal and rights.
    pub async fn whoami(&self) -> Result<Whoami, ClientError> {
        self.get_json("/v1/whoami").await
    }

    /// `POST /v1/console/codes`: a one-time login code (and URL) for the web console.
    pub async fn console_code(&self) -> Result<ConsoleCode, ClientError> {
        self.call_json(Method::POST, "/v1/console/codes", None)
            .await
    }

    /// `POST /v1/executions/{id}/cancel`: asks the agent to kill a running execution.
    pub async fn cancel(&self, id: ExecutionId) -> Result<CancelResponse, ClientError> {
        self.call_json(Method::POST, &format!("/v1/executions/{id}/cancel"), None)
            .await
    }

    /// `POST /v1/vms/{vm}/push`: stores a program in the guest, and runs it if asked.
    pub async fn push(&self, push: PushRequest<'_>) -> Result<PushResponse, ClientError> {
        let mut q = Query::default();
        q.push("name", push.name);
        q.push("run", if push.run { "true" } else { "false" });
        if let Some(ms) = push.timeout_ms {
            q.push("timeout_ms", &ms.to_string());
        }
        let path = format!("/v1/vms/{}/push?{}", encode(push.vm), q.0);
        self.call_json(
            Method::POST,
            &path,
            Some((Bytes::from(push.program), "application/octet-stream")),
        )
        .await
    }

    /// `POST /v1/vms/{vm}/ping`: one round trip through the VM's agent.
    pub async fn ping(&self, vm: &str) -> Result<PingResponse, ClientError> {
        self.call_json(Method::POST, &format!("/v1/vms/{}/ping", encode(vm)), None)
            .await
    }

    /// `GET /v1/vms/{vm}/metrics`: the guest's figures.
    pub async fn metrics(&self, vm: &str) -> Result<MetricsResponse, ClientError> {
        self.get_json(&format!("/v1/vms/{}/metrics", encode(vm)))
            .await
    }

    /// `GET /v1/audit`: audit entries.
    pub async fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, ClientError> {
        let log: crate::AuditLog = self
            .get_json(&format!("/v1/audit?{}", query.query_string()))
            .await?;
        Ok(log.entries)
    }

    /// `GET /v1/daemon`: the daemon's own state.
    pub async fn daemon(&self) -> Result<DaemonState, ClientError> {
        self.get_json("/v1/daemon").await
    }

    /// Any request, answered as it comes whatever its status: `path` with its query,
    /// extra `headers` (beside `Host`, `Content-Length` and the client's token), and a
    /// body sent as `application/json` unless a `Content-Type` is among `headers`. For
    /// what the typed methods do not cover (and for tests of the server's answers).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<RawResponse, ClientError> {
        let request = format!("{method} {path}");
        let method = Method::from_bytes(method.as_bytes()).map_err(|e| ClientError::Protocol {
            request: request.clone(),
            detail: format!("not a method: {e}"),
        })?;
        let typed = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        let content_type = if typed { "" } else { "application/json" };
        let body = Some((Bytes::from(body), content_type));
        let (response, _sender) = self.exchange(method, path, headers, body).await?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = read_body(response, &self.endpoint).await?.to_vec();
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }

    async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call_json(Method::GET, path, None).await
    }

    async fn call_json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<T, ClientError> {
        let request = format!("{method} {path}");
        let response = self.call(method, path, body).await?;
        let bytes = read_body(response, &self.endpoint).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            request,
            detail: e.to_string(),
        })
    }

    /// One request; an error status becomes [`ClientError::Api`].
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
    ) -> Result<Response<Incoming>, ClientError> {
        let (response, _sender) = self.exchange(method, path, &[], body).await?;
        check_status(response, &self.endpoint).await
    }

    /// Connects, sends one request and returns the response with the connection's sender
    /// (the connection lives while either is held or the body is being read). An empty
    /// content type sends the body without one.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(Bytes, &str)>,
    ) -> Result<(Response<Incoming>, SendRequest<Full<Bytes>>), ClientError> {
        let http = |source| ClientError::Http {
            endpoint: self.endpoint.clone(),
            source,
        };
        let connect = |source| ClientError::Connect {
            endpoint: self.endpoint.clone(),
            source,
        };
        let (mut sender, host) = match &self.endpoint {
            Endpoint::Unix(socket) => {
                let stream = tokio::net::UnixStream::connect(socket)
                    .await
                    .map_err(connect)?;
                (handshake(stream).await.map_err(http)?, "portless")
            }
            Endpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(connect)?;
                // Requests are small and answered at once: no need to wait to fill packets.
                let _ = stream.set_nodelay(true);
                (handshake(stream).await.map_err(http)?, addr.as_str())
            }
            Endpoint::Https(addr) => {
                let stream = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(connect)?;
                let _ = stream.set_nodelay(true);
                let name = server_name(addr).map_err(connect)?;
                let config = match &self.tls {
                    Some(c) => c.clone(),
                    None => SYSTEM_TLS
                        .get_or_init(|| tls_config(system_roots()))
                        .clone(),
                };
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .map_err(connect)?;
                (handshake(stream).await.map_err(http)?, addr.as_str())
            }
        };
        let bad = |detail: String| ClientError::Protocol {
            request: format!("{method} {path}"),
            detail,
        };
        let mut builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, host);
        if let Some(token) = &self.token {
            builder = builder.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| bad(format!("header {name:?}: {e}")))?;
            let value =
                HeaderValue::from_str(value).map_err(|e| bad(format!("header {name}: {e}")))?;
            builder = builder.header(name, value);
        }
        let body = match body {
            Some((bytes, content_type)) => {
                if !content_type.is_empty() {
                    builder = builder.header(CONTENT_TYPE, content_type);
                }
                bytes
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(body))
            .map_err(|e| bad(format!("cannot build the request: {e}")))?;
        let response = sender.send_request(request).await.map_err(http)?;
        Ok((response, sender))
    }
}

/// The client TLS configuration of the system's roots, made once.
static SYSTEM_TLS: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();

/// The roots of the system's certificate store (none if it cannot be read: a server is
/// then trusted only through a CA given to the client).
fn system_roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    let _ = roots.add_parsable_certificates(found.certs);
    roots
}

/// rustls's safe defaults (TLS 1.2 and 1.3) with `roots`, speaking HTTP/1.1.
fn tls_config(roots: rustls::RootCertStore) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| {
            // The ring provider supports the default versions; this is never reached.
            rustls::ClientConfig::builder_with_protocol_versions(rustls::DEFAULT_VERSIONS)
        });
    let mut config = builder.with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// The name the server's certificate must carry: the host of `host:port` (a DNS name or an
/// IP address, `[v6]` without its brackets).
fn server_name(addr: &str) -> Result<rustls::pki_types::ServerName<'static>, io::Error> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a host name: {e}"),
        )
    })
}

/// The HTTP/1.1 handshake on a new connection, whose task then drives it.
async fn handshake<S>(stream: S) -> Result<SendRequest<Full<Bytes>>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Errors surface through the request or the body, where they are reported.
        let _ = connection.await;
    });
    Ok(sender)
}

/// A follow stream (`GET /v1/executions/{id}/follow`), read event by event.
#[derive(Debug)]
pub struct Follow {
    body: Incoming,
    _sender: SendRequest<Full<Bytes>>,
    buf: Vec<u8>,
    ended: bool,
    endpoint: Endpoint,
    request: String,
}

impl Follow {
    /// The next event; `None` once the stream is over. A stream that stops before its
    /// `end` event (the daemon went away) is an error.
    pub async fn next(&mut self) -> Result<Option<FollowEvent>, ClientError> {
        loop {
            if let Some(line) = take_line(&mut self.buf) {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if self.ended {
                    return Err(self.protocol("data after the end event".into()));
                }
                let event = parse_follow_line(&line).map_err(|d| self.protocol(d))?;
                self.ended = matches!(event, FollowEvent::End(_));
                return Ok(Some(event));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.buf.len() + data.len() > MAX_FOLLOW_LINE {
                            return Err(self.protocol("a line longer than the limit".into()));
                        }
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(source)) => {
                    return Err(ClientError::Http {
                        endpoint: self.endpoint.clone(),
                        source,
                    });
                }
                None if self.ended && self.buf.iter().all(u8::is_ascii_whitespace) => {
                    return Ok(None);
                }
                None if !self.buf.is_empty() => {
                    // The last line may lack its newline.
                    self.buf.push(b'\n');
                }
                None => {
                    return Err(ClientError::StreamEnded {
                        request: self.request.clone(),
                    });
                }
            }
        }
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol {
            request: self.request.clone(),
            detail,
        }
    }
}

/// An event stream (`GET /v1/events`), read event by event.
#[derive(Debug)]
pub struct Events {
    body: Incoming,
    _sender: SendRequest<Full<Bytes>>,
    decoder: SseDecoder,
    endpoint: Endpoint,
    request: String,
}

impl Events {
    /// The next event with the id in force after it (the cursor to resume from); `None`
    /// when the daemon ended the stream (every execution it follows has ended). Events of
    /// kinds this client does not know are skipped.
    pub async fn next(&mut self) -> Result<Option<(StreamEvent, Option<Cursor>)>, ClientError> {
        loop {
            while let Some(frame) = self.decoder.next_frame() {
                let event =
                    StreamEvent::parse(&frame.name, &frame.data).map_err(|d| self.protocol(d))?;
                let Some(event) = event else { continue };
                let cursor = match frame.id.as_deref() {
                    Some(id) => Some(Cursor::parse(id).map_err(|d| self.protocol(d))?),
                    None => None,
                };
                return Ok(Some((event, cursor)));
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.feed(&data).map_err(|d| self.protocol(d))?;
                    }
                }
                Some(Err(source)) => {
                    return Err(ClientError::Http {
                        endpoint: self.endpoint.clone(),
                        source,
                    });
                }
                None => return Ok(None),
            }
        }
    }

    fn protocol(&self, detail: String) -> ClientError {
        ClientError::Protocol {
            request: self.request.clone(),
            detail,
        }
    }
}

/// Removes and returns the first complete line of `buf`, without its newline.
fn take_line(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let mut line: Vec<u8> = buf.drain(..=end).collect();
    line.pop();
    Some(line)
}

/// Passes a success through; turns an error status into [`ClientError::Api`] with the
/// daemon's message.
async fn check_status(
    response: Response<Incoming>,
    endpoint: &Endpoint,
) -> Result<Response<Incoming>, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = read_body(response, endpoint).await.unwrap_or_default();
    Err(ClientError::Api {
        status: status.as_u16(),
        message: error_message(status, &body),
    })
}

/// The message of an error answer: the JSON `error`, else the body's first line, else the
/// status.
pub fn error_message(status: StatusCode, body: &[u8]) -> String {
    if let Ok(ErrorBody { error }) = serde_json::from_slice(body) {
        return error;
    }
    let text = String::from_utf8_lossy(body);
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => format!("{line} ({status})"),
        None => format!("the daemon answered {status}"),
    }
}

async fn read_body(
    response: Response<Incoming>,
    endpoint: &Endpoint,
) -> Result<Bytes, ClientError> {
    let collected = response
        .into_body()
        .collect()
        .await
        .map_err(|source| ClientError::Http {
            endpoint: endpoint.clone(),
            source,
        })?;
    Ok(collected.to_bytes())
}

fn header<'h>(headers: &'h HeaderMap, name: &str, request: &str) -> Result<&'h str, ClientError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .ok_or_else(|| ClientError::Protocol {
            request: request.to_owned(),
            detail: format!("no valid {name} header"),
        })
}

fn header_u64(headers: &HeaderMap, name: &str, request: &str) -> Result<u64, ClientError> {
    let value = header(headers, name, request)?;
    value.parse().map_err(|_| ClientError::Protocol {
        request: request.to_owned(),
        detail: format!("{name}: {value:?} is not a number"),
    })
}

fn header_bool(headers: &HeaderMap, name: &str, request: &str) -> Result<bool, ClientError> {
    match header(headers, name, request)? {
        "true" => Ok(true),
        "false" => Ok(false),
        value => Err(ClientError::Protocol {
            request: request.to_owned(),
            detail: format!("{name}: {value:?} is not true or false"),
        }),
    }
}

/// A query string under construction.
#[derive(Default)]
pub(crate) struct Query(pub(crate) String);

impl Query {
    pub(crate) fn push(&mut self, key: &str, value: &str) {
        if !self.0.is_empty() {
            self.0.push('&');
        }
        self.0 += &encode(key);
        self.0.push('=');
        self.0 += &encode(value);
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for a path segment or a
/// query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests;
