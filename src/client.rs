//! A small `tether.v1` client: what the load tool and the integration tests speak with.
//!
//! Owns nothing of the server; it only knows the wire protocol. Every wait has a deadline, so a
//! test or benchmark that goes wrong fails instead of hanging.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use tokio_tungstenite::tungstenite::Error as WsError;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    Ws(#[from] WsError),
    /// Nothing arrived in time; the text says what was awaited.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The server closed the connection (code and reason, if it sent a close frame).
    #[error("connection closed: {0:?}")]
    Closed(Option<(u16, String)>),
    /// A frame that is not the JSON the protocol promises.
    #[error("invalid frame from server: {0}")]
    BadFrame(String),
}

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// Resume this thread (`?thread_id=`).
    pub thread_id: Option<String>,
    /// Replay events after this `seq` (`?since=`).
    pub since: Option<u64>,
    /// Extra raw query string (e.g. `ticket=...`).
    pub query: Option<String>,
    /// Subprotocols to offer (besides none).
    pub protocols: Vec<String>,
}

/// One client connection.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// How the connection was closed, once it was.
    pub close: Option<(u16, String)>,
}

/// Build the `/ws` URL for `base` (`ws://127.0.0.1:8787`).
pub fn ws_url(base: &str, opts: &ConnectOptions) -> String {
    let mut q: Vec<String> = Vec::new();
    if let Some(t) = &opts.thread_id {
        q.push(format!("thread_id={t}"));
    }
    if let Some(s) = opts.since {
        q.push(format!("since={s}"));
    }
    if let Some(extra) = &opts.query {
        q.push(extra.clone());
    }
    if q.is_empty() {
        format!("{base}/ws")
    } else {
        format!("{base}/ws?{}", q.join("&"))
    }
}

/// How the TCP socket under a connection is set up: the load tool's knobs (see
/// [`Client::connect_with`]). The default is what [`Client::connect`] does.
#[derive(Debug, Clone, Default)]
pub struct SocketOptions {
    /// Bind the socket to this local address (port 0) before connecting. Spreading connections
    /// over 127.0.0.2-127.0.0.254 gives each source address its own ephemeral port range, so
    /// more than ~28,000 connections (or a churn of TIME_WAIT sockets) fit on loopback.
    pub bind: Option<IpAddr>,
    /// Disable Nagle's algorithm, so a small frame leaves at once.
    pub nodelay: bool,
    /// The client's read buffer (tungstenite's default is 128 KiB); small for many idle
    /// connections, so the load tool does not use more memory than the server it measures.
    pub read_buffer_size: Option<usize>,
}

/// The upgrade request for `base` and `opts`.
fn request(base: &str, opts: &ConnectOptions) -> Result<Request, ClientError> {
    let mut req = ws_url(base, opts).into_client_request()?;
    if let Some(t) = &opts.token {
        let v = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|e| ClientError::BadFrame(e.to_string()))?;
        req.headers_mut().insert("authorization", v);
    }
    if !opts.protocols.is_empty() {
        let v = HeaderValue::from_str(&opts.protocols.join(", "))
            .map_err(|e| ClientError::BadFrame(e.to_string()))?;
        req.headers_mut().insert("sec-websocket-protocol", v);
    }
    Ok(req)
}

fn io_error(kind: std::io::ErrorKind, msg: &str) -> ClientError {
    ClientError::Ws(WsError::Io(std::io::Error::new(kind, msg.to_string())))
}

impl Client {
    /// Connect; an HTTP refusal comes back as `ClientError::Ws(Http(..))`.
    pub async fn connect(base: &str, opts: &ConnectOptions) -> Result<Self, ClientError> {
        let req = request(base, opts)?;
        let (ws, _resp) = tokio_tungstenite::connect_async(req).await?;
        Ok(Self { ws, close: None })
    }

    /// Connect with explicit socket options (source address, Nagle, read buffer). Plain
    /// `ws://` only: the load tool talks to loopback.
    pub async fn connect_with(
        base: &str,
        opts: &ConnectOptions,
        sock: &SocketOptions,
    ) -> Result<Self, ClientError> {
        use std::io::ErrorKind;
        let req = request(base, opts)?;
        if req.uri().scheme_str() != Some("ws") {
            return Err(io_error(
                ErrorKind::Unsupported,
                "connect_with supports ws:// only",
            ));
        }
        let host = req
            .uri()
            .host()
            .ok_or_else(|| io_error(ErrorKind::InvalidInput, "URL without a host"))?;
        // `[::1]` comes back with its brackets; the resolver wants them off.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = req.uri().port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| ClientError::Ws(WsError::Io(e)))?
            .find(|a| sock.bind.is_none_or(|b| b.is_ipv4() == a.is_ipv4()))
            .ok_or_else(|| io_error(ErrorKind::AddrNotAvailable, "no address for the host"))?;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| ClientError::Ws(WsError::Io(e)))?;
        if let Some(ip) = sock.bind {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| ClientError::Ws(WsError::Io(e)))?;
        }
        let stream = socket
            .connect(addr)
            .await
            .map_err(|e| ClientError::Ws(WsError::Io(e)))?;
        if sock.nodelay {
            stream
                .set_nodelay(true)
                .map_err(|e| ClientError::Ws(WsError::Io(e)))?;
        }
        let mut config = WebSocketConfig::default();
        if let Some(n) = sock.read_buffer_size {
            config = config.read_buffer_size(n);
        }
        let (ws, _resp) = tokio_tungstenite::client_async_with_config(
            req,
            MaybeTlsStream::Plain(stream),
            Some(config),
        )
        .await?;
        Ok(Self { ws, close: None })
    }

    /// Send a JSON value as a text frame.
    pub async fn send_json(&mut self, v: &Value) -> Result<(), ClientError> {
        self.ws.send(Message::Text(v.to_string().into())).await?;
        Ok(())
    }

    /// Send a raw message.
    pub async fn send_raw(&mut self, m: Message) -> Result<(), ClientError> {
        self.ws.send(m).await?;
        Ok(())
    }

    /// The next JSON frame (answering pings on the way), within `timeout`.
    pub async fn next_json(&mut self, timeout: Duration) -> Result<Value, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| ClientError::Timeout("a frame".into()))?;
            match msg {
                None => return Err(ClientError::Closed(self.close.clone())),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(t.as_str())
                        .map_err(|e| ClientError::BadFrame(e.to_string()))
                }
                Some(Ok(Message::Close(f))) => {
                    self.close = Some(f.map_or(
                        (crate::protocol::CloseCode::NoStatus.as_u16(), String::new()),
                        |f| (u16::from(f.code), f.reason.to_string()),
                    ));
                    return Err(ClientError::Closed(self.close.clone()));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Frames until one of type `kind` (inclusive), within `timeout`.
    pub async fn until(
        &mut self,
        kind: &str,
        timeout: Duration,
    ) -> Result<Vec<Value>, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.next_json(left).await.map_err(|e| match e {
                ClientError::Timeout(_) => ClientError::Timeout(kind.to_string()),
                e => e,
            })?;
            let done = v["type"] == kind;
            seen.push(v);
            if done {
                return Ok(seen);
            }
        }
    }

    /// Wait for the server's close frame; returns its code and reason.
    pub async fn closed(&mut self, timeout: Duration) -> Result<(u16, String), ClientError> {
        loop {
            match self.next_json(timeout).await {
                Ok(_) => continue,
                Err(ClientError::Closed(Some(c))) => return Ok(c),
                Err(e) => return Err(e),
            }
        }
    }

    /// Close normally (1000).
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await?;
        // Drain until the server's close echo.
        // Best effort: a server that never echoes still gets closed.
        let _drained = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
        Ok(())
    }

    /// Reset the TCP connection (RST, no close frame): an abrupt disconnect.
    pub fn abort(self) {
        if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            // Best effort: without it the close is an ordinary FIN.
            let _reset = socket_linger_zero(s);
        }
        drop(self.ws);
    }
}

/// SO_LINGER 0: closing the socket sends RST instead of FIN.
#[allow(deprecated)]
fn socket_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    s.set_linger(Some(Duration::ZERO))
}
