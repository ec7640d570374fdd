//! A small `tether.v1` client: what the load tool and the integration tests speak with.
//!
//! Owns nothing of the server; it only knows the wire protocol. Every wait has a deadline, so a
//! test or benchmark that goes wrong fails instead of hanging.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub use tokio_tungstenite::tungstenite::Error as WsError;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("websocket: {0}")]
    Ws(#[from] WsError),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("connection closed: {0:?}")]
    Closed(Option<(u16, String)>),
    #[error("invalid frame from server: {0}")]
    BadFrame(String),
}

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Sent as `Authorization: Bearer`.
    pub token: Option<String>,
    pub thread_id: Option<String>,
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

impl Client {
    /// Connect; an HTTP refusal comes back as `ClientError::Ws(Http(..))`.
    pub async fn connect(base: &str, opts: &ConnectOptions) -> Result<Self, ClientError> {
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
        let (ws, _resp) = tokio_tungstenite::connect_async(req).await?;
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
                    self.close = Some(f.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.to_string())
                    }));
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
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
        Ok(())
    }

    /// Reset the TCP connection (RST, no close frame): an abrupt disconnect.
    pub fn abort(self) {
        if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            let _ = socket_linger_zero(s);
        }
        drop(self.ws);
    }
}

/// SO_LINGER 0: closing the socket sends RST instead of FIN.
#[allow(deprecated)]
fn socket_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    s.set_linger(Some(Duration::ZERO))
}
