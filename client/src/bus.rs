//! The bus client: mTLS channels to the bus and helpers for publishing,
//! querying and tailing. Agents, the operator, the CLI and the benchmark use it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use amoskys_proto::admin_client::AdminClient;
use amoskys_proto::event_bus_client::EventBusClient;
use amoskys_proto::publish_request::Msg as InMsg;
use amoskys_proto::publish_response::Msg as OutMsg;
use amoskys_proto::{
    Batch, Event, Hello, PublishRequest, PublishResponse, QueryRequest, TailRequest, Welcome,
};
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Why talking to the bus failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A TLS file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        #[source]
        source: std::io::Error,
    },
    /// The bus URL is not an `https://host:port` URL.
    #[error("bus URL {url:?}: {message}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        message: String,
    },
    /// The connection or the TLS handshake failed.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The bus URL.
        url: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// The bus answered an RPC with an error status.
    #[error("{0}")]
    Rpc(#[from] tonic::Status),
    /// The Publish stream ended; the text says when.
    #[error("the bus closed the Publish stream: {0}")]
    Closed(String),
    /// The shard reached does not own this agent: publish to the one named.
    #[error(
        "shard {} redirected this agent to shard {} at {:?} (shard map epoch {})",
        .0.from_shard,
        .0.shard,
        .0.url,
        .0.shard_epoch
    )]
    Redirected(amoskys_proto::Redirect),
}

/// How to reach the bus.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `https://host:port` of the bus.
    pub url: String,
    /// Directory with this client's `tls.crt`, `tls.key` and `ca.crt`.
    pub tls_dir: PathBuf,
    /// Name to verify the bus certificate against; defaults to the URL's host.
    pub server_name: Option<String>,
    /// Largest gRPC message sent or accepted.
    pub max_message_bytes: usize,
}

impl ClientOptions {
    /// Options for `url` with the TLS files in `tls_dir` and a 64 MiB
    /// message limit.
    pub fn new(url: impl Into<String>, tls_dir: impl Into<PathBuf>) -> Self {
        Self {
            url: url.into(),
            tls_dir: tls_dir.into(),
            server_name: None,
            max_message_bytes: 64 * 1024 * 1024,
        }
    }
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, ClientError> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|source| ClientError::Read { path, source })
}

/// Opens an mTLS channel, reading the TLS files afresh (so a reconnect after
/// a rotation uses the new certificate).
pub async fn connect_channel(opts: &ClientOptions) -> Result<Channel, ClientError> {
    let pems = Pems {
        ca: read(&opts.tls_dir, "ca.crt")?,
        cert: read(&opts.tls_dir, "tls.crt")?,
        key: read(&opts.tls_dir, "tls.key")?,
    };
    connect_channel_pem(&opts.url, opts.server_name.as_deref(), &pems).await
}

/// A client's TLS material held in memory (the operator reads it from a Secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pems {
    /// The CA certificate(s) the bus's certificate must chain to.
    pub ca: Vec<u8>,
    /// This client's certificate.
    pub cert: Vec<u8>,
    /// This client's private key.
    pub key: Vec<u8>,
}

/// Opens an mTLS channel with in-memory PEMs; `server_name` defaults to the
/// URL's host.
pub async fn connect_channel_pem(
    url: &str,
    server_name: Option<&str>,
    pems: &Pems,
) -> Result<Channel, ClientError> {
    let url_err = |message: String| ClientError::Url {
        url: url.to_string(),
        message,
    };
    let uri: tonic::transport::Uri = url.parse().map_err(|e| url_err(format!("{e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(url_err(
            "must start with https:// (the bus only speaks mTLS)".into(),
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| url_err("has no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pems.ca))
        .identity(Identity::from_pem(&pems.cert, &pems.key))
        .domain_name(server_name.map(str::to_string).unwrap_or(host));
    let connect_err = |source| ClientError::Connect {
        url: url.to_string(),
        source,
    };
    Endpoint::from(uri)
        .tls_config(tls)
        .map_err(connect_err)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(connect_err)
}

/// Typed clients for both services over one channel.
#[derive(Clone)]
pub struct BusClient {
    /// Publish, Query and Tail.
    pub bus: EventBusClient<Channel>,
    /// The Admin service (agents, controls, backups).
    pub admin: AdminClient<Channel>,
}

impl BusClient {
    /// Connects with the TLS files read afresh.
    pub async fn connect(opts: &ClientOptions) -> Result<Self, ClientError> {
        let ch = connect_channel(opts).await?;
        Ok(Self::from_channel(ch, opts.max_message_bytes))
    }

    /// Both clients over an open channel, with `max` as the message limit.
    pub fn from_channel(ch: Channel, max: usize) -> Self {
        Self {
            bus: EventBusClient::new(ch.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            admin: AdminClient::new(ch)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        }
    }

    /// Runs a query and collects every event it returns.
    pub async fn query(&mut self, req: QueryRequest) -> Result<Vec<Event>, ClientError> {
        let mut stream = self.query_stream(req).await?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await? {
            out.extend(chunk.events);
        }
        Ok(out)
    }

    /// Runs one query and hands back its responses as they arrive, for a
    /// reader that handles events as they come rather than all at once.
    pub async fn query_stream(
        &mut self,
        req: QueryRequest,
    ) -> Result<Streaming<amoskys_proto::QueryResponse>, ClientError> {
        Ok(self.bus.query(req).await?.into_inner())
    }

    /// Runs one query and collects its page: the events, and on a sharded
    /// bus the cursor of the next page and the shards left out of a partial
    /// answer.
    pub async fn query_page(&mut self, req: QueryRequest) -> Result<QueryPage, ClientError> {
        let mut stream = self.query_stream(req).await?;
        let mut page = QueryPage::default();
        while let Some(chunk) = stream.message().await? {
            page.events.extend(chunk.events);
            if !chunk.cursor.is_empty() {
                page.cursor = chunk.cursor;
            }
            page.missing_shards.extend(chunk.missing_shards);
        }
        Ok(page)
    }

    /// Runs a query page by page (each up to `req.limit`, capped by the
    /// server) until the range is exhausted, and collects every event. On a
    /// sharded bus each page resumes from the previous page's cursor, and an
    /// event a move stored on two shards is kept once, whichever pages its
    /// copies fell on.
    pub async fn query_all(&mut self, mut req: QueryRequest) -> Result<Vec<Event>, ClientError> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            let page = self.query_page(req.clone()).await?;
            let Some(last) = page.events.last().map(|e| e.offset) else {
                return Ok(out);
            };
            if page.cursor.is_empty() {
                req.from_offset = last + 1;
                out.extend(page.events);
            } else {
                req.cursor = page.cursor;
                out.extend(page.events.into_iter().filter(|e| {
                    e.seq == 0 || seen.insert((e.agent_id.clone(), e.incarnation, e.seq))
                }));
            }
        }
    }

    /// Opens a Tail stream.
    pub async fn tail(
        &mut self,
        req: TailRequest,
    ) -> Result<Streaming<amoskys_proto::QueryResponse>, ClientError> {
        Ok(self.bus.tail(req).await?.into_inner())
    }

    /// Opens a Publish stream: sends the Hello, waits for the Welcome. A
    /// shard that does not own the agent answers with
    /// [`ClientError::Redirected`].
    pub async fn publisher(
        &mut self,
        hello: Hello,
        window: usize,
    ) -> Result<Publisher, ClientError> {
        let (tx, rx) = mpsc::channel(window.max(1));
        tx.send(PublishRequest {
            msg: Some(InMsg::Hello(hello)),
        })
        .await
        .map_err(|_| ClientError::Closed("before hello".into()))?;
        let mut inbound = self
            .bus
            .publish(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let welcome = match inbound.message().await? {
            Some(PublishResponse {
                msg: Some(OutMsg::Welcome(w)),
            }) => w,
            Some(PublishResponse {
                msg: Some(OutMsg::Redirect(r)),
            }) => return Err(ClientError::Redirected(r)),
            other => {
                return Err(ClientError::Closed(format!(
                    "expected a Welcome, got {other:?}"
                )));
            }
        };
        Ok(Publisher {
            tx,
            inbound,
            welcome_acked_seq: welcome.acked_seq,
            welcome,
        })
    }
}

/// One page of a query.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueryPage {
    /// The events, in the bus's order.
    pub events: Vec<Event>,
    /// A sharded bus: where the next page starts (`QueryRequest.cursor`).
    pub cursor: String,
    /// Shards that did not answer a query that allowed partial results.
    pub missing_shards: Vec<u32>,
}

/// One open Publish stream.
pub struct Publisher {
    tx: mpsc::Sender<PublishRequest>,
    /// What the bus sends back: acks and controls.
    pub inbound: Streaming<PublishResponse>,
    /// What the bus already held for this agent when the stream opened.
    pub welcome_acked_seq: u64,
    /// The whole Welcome: also the owning shard and its map epoch.
    pub welcome: Welcome,
}

impl Publisher {
    /// Queues a batch; waits only when the send window is full.
    pub async fn send(&self, events: Vec<Event>) -> Result<(), ClientError> {
        self.send_raw(PublishRequest {
            msg: Some(InMsg::Batch(Batch { events })),
        })
        .await
    }

    /// Queues any request (a control result, a heartbeat).
    pub async fn send_raw(&self, req: PublishRequest) -> Result<(), ClientError> {
        self.tx
            .send(req)
            .await
            .map_err(|_| ClientError::Closed("while sending".into()))
    }

    /// A sender handle for use from another task.
    pub fn sender(&self) -> mpsc::Sender<PublishRequest> {
        self.tx.clone()
    }

    /// The next message from the bus; `None` when the bus ended the stream.
    pub async fn next(&mut self) -> Result<Option<OutMsg>, ClientError> {
        match self.inbound.message().await? {
            Some(PublishResponse { msg }) => Ok(msg),
            None => Ok(None),
        }
    }

    /// Half-closes the stream: the bus acks what it has, then ends it.
    pub fn close(self) -> Streaming<PublishResponse> {
        self.inbound
    }
}
