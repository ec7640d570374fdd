//! The connection task: one per WebSocket, from its registry slot to its last byte.
//!
//! [`Connection::run`] takes the guards (registry slot, thread row, audit row), sends
//! `connection_established` and the replay, then runs the frame loop until something ends the
//! connection ([`End`]). Whatever ends it (close, reset, error, panic, shutdown) drops the guards
//! and so releases everything. Client requests are handled in `requests`, one function each.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::sleep_until;

use super::end::{abnormal_end, End};
use super::rate::{FrameRate, RateCheck};
use crate::context::UserExecutionContext;
use crate::gateway::AppState;
use crate::metrics::{metrics, OutKind};
use crate::protocol::{self, CloseCode, CloseReason, ErrorCode, FrameMeta};
use crate::registry::{ConnHandle, ConnShared, OutFrame, OutQueue, RegistryGuard};
use crate::session::StagedWrite;
use crate::store::Store;

/// How long one write may block before the peer counts as stalled.
const WRITE_STALL: Duration = Duration::from_secs(10);
/// Frames taken from the outbound queue for one write.
const WRITE_BATCH_FRAMES: usize = 32;

/// How long a pending write may still take once a close was requested.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The same for a slow consumer: its write is most likely stuck behind a peer that stopped
/// reading, and it must be gone within a second of its queue overflowing.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_millis(200);

fn close_grace(reason: &CloseReason) -> Duration {
    if *reason == CloseReason::SlowConsumer {
        SLOW_CONSUMER_GRACE
    } else {
        CLOSE_GRACE
    }
}

/// How long the socket is kept after a close frame the server sent (see [`linger`]).
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// After the server sent a close frame: keep the socket up to [`CLOSE_LINGER`], reading and
/// discarding what the peer still sends, until its close reply.
///
/// Dropping a socket with unread input makes the kernel answer with RST, and a peer that gets an
/// RST loses what it has not read yet, the close frame included: a client flooding pings or
/// streaming an oversized message would see "connection reset" instead of 4029 or 1009
/// (tests/hostile). After a frame error the stream yields nothing more (tungstenite fuses it), so
/// then only the deadline applies. Holds no registry slot or audit row.
async fn linger(stream: &mut SplitStream<WebSocket>) {
    let deadline = tokio::time::Instant::now() + CLOSE_LINGER;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            // The deadline, the peer's close reply, or a failed socket: done.
            Err(_) | Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) => return,
            Ok(Some(Ok(_))) => {}
            // Fused by an earlier frame error: give the peer the time to read the close frame.
            Ok(None) => return sleep_until(deadline).await,
        }
    }
}

/// Records the connection's audit row as closed when dropped (as abnormal unless told otherwise).
struct AuditGuard {
    store: Arc<dyn Store>,
    connection_id: Arc<str>,
    outcome: Option<(u16, String)>,
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        let (code, reason) = self.outcome.take().unwrap_or_else(abnormal_end);
        metrics().connection_closed(code);
        self.store
            .audit_close(self.connection_id.clone(), code, reason);
    }
}

/// One WebSocket connection: owns its guards and runs its frame loop.
pub(super) struct Connection {
    pub(super) st: Arc<AppState>,
    pub(super) ctx: UserExecutionContext,
    sink: SplitSink<WebSocket, Message>,
    shared: Arc<ConnShared>,
    last_sent_seq: u64,
    pub(super) rate: FrameRate,
}

impl Connection {
    /// The whole life of a connection, after the upgrade.
    pub(super) async fn run(
        st: Arc<AppState>,
        ctx: UserExecutionContext,
        sink: SplitSink<WebSocket, Message>,
        mut stream: SplitStream<WebSocket>,
        since: Option<u64>,
        last_seq: u64,
    ) {
        let (handle, mut rx, shared) = ConnHandle::channel(st.config.limits.outbound_queue.get());
        let mut conn = Connection {
            rate: FrameRate::new(st.config.limits.message_rate),
            st,
            ctx,
            sink,
            shared,
            last_sent_seq: 0,
        };
        let registered = conn.st.registry.register(&conn.ctx, handle);
        if registered.is_ok() {
            tracing::info!(isolation_key = %conn.ctx.isolation_key(), "connection accepted: registry slot taken");
        }
        let _slot: RegistryGuard = match registered {
            Ok(g) => g,
            Err(limit) => {
                tracing::warn!(reason = %limit, "connection refused: per-user limit");
                let reason = CloseReason::UserLimit(limit.to_string());
                metrics().connection_closed(reason.code());
                Box::pin(conn.close(&reason)).await;
                Box::pin(linger(&mut stream)).await;
                return;
            }
        };
        let Some(mut audit) = Box::pin(conn.open_rows()).await else {
            return;
        };
        tracing::info!(resumed = conn.ctx.resumed(), "connection opened");

        let end = conn.serve(&mut rx, &mut stream, since, last_seq).await;
        let server_closed = end.close_reason().is_some();
        if let Some(reason) = end.close_reason() {
            Box::pin(conn.close(reason)).await;
        } else if let End::ClientClosed(..) = end {
            // Complete the close handshake (tungstenite queued the echo).
            let echoed = Box::pin(tokio::time::timeout(
                Duration::from_secs(1),
                conn.sink.close(),
            ))
            .await;
            if !matches!(echoed, Ok(Ok(()))) {
                tracing::debug!("close echo not written");
            }
        }
        let (code, reason) = end.recorded();
        tracing::info!(code, reason = %reason, "connection closed");
        audit.outcome = Some((code, reason));
        // Registry slot released and audit row closed here, before any lingering.
        drop(audit);
        drop(_slot);
        if server_closed {
            Box::pin(linger(&mut stream)).await;
        }
    }

    /// The thread row (for a new thread) and the audit row; on failure the connection is closed
    /// with 1011 and `None` returned.
    async fn open_rows(&mut self) -> Option<AuditGuard> {
        if !self.ctx.resumed() {
            let mut session = self.st.sessions.create_session_from_context(&self.ctx);
            session.stage(StagedWrite::CreateThread);
            if let Err(e) = Box::pin(session.commit()).await {
                tracing::error!(error = %e, "cannot create the thread");
                metrics().connection_closed(CloseCode::Internal.as_u16());
                Box::pin(self.close(&CloseReason::Internal)).await;
                return None;
            }
        }
        if let Err(e) = Box::pin(self.st.store.audit_open(&self.ctx)).await {
            tracing::error!(error = %e, "cannot open the audit row");
            metrics().connection_closed(CloseCode::Internal.as_u16());
            Box::pin(self.close(&CloseReason::Internal)).await;
            return None;
        }
        Some(AuditGuard {
            store: self.st.store.clone(),
            connection_id: self.ctx.connection_id_arc().clone(),
            outcome: None,
        })
    }

    /// Send a close frame (best effort, bounded in time).
    async fn close(&mut self, reason: &CloseReason) {
        let frame = CloseFrame {
            code: reason.code(),
            reason: reason.reason().into(),
        };
        let sent = tokio::time::timeout(
            Duration::from_secs(1),
            self.sink.send(Message::Close(Some(frame))),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::debug!("close frame not written");
        }
    }

    /// Send one frame. A write that cannot finish within [`WRITE_STALL`] means the peer stopped
    /// reading. If a close is requested while the write is pending (queue overflow, admin
    /// disconnect), the write gets [`CLOSE_GRACE`] more to finish, so the close frame can
    /// follow it; otherwise the connection is dropped at once, without a close frame.
    async fn send(&mut self, msg: Message) -> Result<(), End> {
        self.send_all(std::iter::once(msg)).await
    }

    /// [`Connection::send`] for several frames, flushed once: one write for a burst.
    async fn send_all(&mut self, msgs: impl Iterator<Item = Message>) -> Result<(), End> {
        let shared = self.shared.clone();
        let mut msgs = futures_util::stream::iter(msgs.map(Ok));
        let write = tokio::time::timeout(WRITE_STALL, self.sink.send_all(&mut msgs));
        tokio::pin!(write);
        let stalled = |r: Result<Result<(), axum::Error>, tokio::time::error::Elapsed>| match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(End::Lost),
            Err(_) => Err(End::Dropped(CloseReason::SlowConsumer)),
        };
        tokio::select! {
            biased;
            r = &mut write => stalled(r),
            req = shared.closed() => match tokio::time::timeout(close_grace(&req), &mut write).await {
                // Written: the frame loop sees the close request next and sends the close frame.
                Ok(r) => stalled(r),
                Err(_) => Err(End::Dropped(req)),
            },
        }
    }

    pub(super) async fn send_text(&mut self, text: String, kind: OutKind) -> Result<(), End> {
        metrics().message_out(kind);
        self.send(Message::Text(text.into())).await
    }

    /// The envelope of a frame on this connection's thread.
    pub(super) fn meta<'a>(&'a self, reply_to: Option<&'a str>) -> FrameMeta<'a> {
        FrameMeta {
            thread_id: Some(self.ctx.thread_id()),
            ..Default::default()
        }
        .with_reply(reply_to)
    }

    pub(super) async fn send_error(
        &mut self,
        reply_to: Option<&str>,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), End> {
        let text = protocol::error_frame(self.ctx.thread_id(), reply_to, code, message);
        self.send_text(text, OutKind::Error).await
    }

    /// The frame loop: close requests, shutdown, heartbeats, outbound frames and client frames,
    /// until one of them ends the connection.
    async fn serve(
        &mut self,
        rx: &mut OutQueue,
        stream: &mut SplitStream<WebSocket>,
        since: Option<u64>,
        last_seq: u64,
    ) -> End {
        // Every await but the idle `select!` is boxed: an async fn's state is as large as its
        // largest await point, and each idle connection would otherwise carry the (rarely live)
        // state of sends, replays and message handling. Memory per idle connection is a target.
        match Box::pin(self.start(since, last_seq)).await {
            Ok(()) => {}
            Err(end) => return end,
        }
        let hb_interval = self.st.config.limits.heartbeat_interval;
        let pong_timeout = self.st.config.limits.pong_timeout;
        let mut ping_sent: Option<tokio::time::Instant> = None;
        let mut next_ping = tokio::time::Instant::now() + hb_interval;
        let shared = self.shared.clone();
        let shutdown = self.st.shutdown.clone();
        loop {
            let deadline = ping_sent.map_or(next_ping, |t| t + pong_timeout);
            let step = tokio::select! {
                biased;
                req = shared.closed() => Err(End::Close(req)),
                _ = shutdown.cancelled() => Err(End::Close(CloseReason::ShuttingDown)),
                _ = sleep_until(deadline) => {
                    if ping_sent.is_some() {
                        metrics().heartbeat_timeouts.inc();
                        Err(End::Close(CloseReason::HeartbeatTimeout))
                    } else {
                        ping_sent = Some(tokio::time::Instant::now());
                        next_ping = tokio::time::Instant::now() + hb_interval;
                        Box::pin(self.send(Message::Ping(Default::default()))).await
                    }
                }
                f = rx.recv() => Box::pin(self.forward(f, rx)).await,
                msg = stream.next() => match msg {
                    None => Err(End::Lost),
                    Some(Err(e)) => Err(End::from_ws_error(e, self.st.config.limits.max_message_bytes.get())),
                    Some(Ok(Message::Text(t))) => Box::pin(self.on_text(t.as_str())).await,
                    Some(Ok(Message::Binary(_))) => Err(End::Close(CloseReason::Binary)),
                    Some(Ok(Message::Ping(_))) => match self.rate.check() {
                        RateCheck::Exceeded => Err(self.rate_exceeded()),
                        RateCheck::Allowed | RateCheck::Refused => Ok(()),
                    },
                    Some(Ok(Message::Pong(_))) => {
                        ping_sent = None;
                        Ok(())
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame.map_or((None, String::new()), |f| (Some(f.code), f.reason.to_string()));
                        Err(End::ClientClosed(code, reason))
                    }
                },
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// The close for a client that stayed over its frame rate.
    pub(super) fn rate_exceeded(&self) -> End {
        End::Close(CloseReason::RateLimited {
            per_second: self.st.config.limits.message_rate.get(),
        })
    }

    /// `connection_established`, then the replay of `since`.
    async fn start(&mut self, since: Option<u64>, last_seq: u64) -> Result<(), End> {
        let cfg = &self.st.config.limits;
        let data = json!({
            "connection_id": self.ctx.connection_id(),
            "user_id": self.ctx.user_id(),
            "thread_id": self.ctx.thread_id(),
            "run_id": self.ctx.run_id(),
            "request_id": self.ctx.request_id(),
            "server_time": protocol::now_rfc3339(),
            "protocol": protocol::PROTOCOL,
            "resumed": self.ctx.resumed(),
            "last_seq": last_seq,
            "limits": {
                "max_message_bytes": cfg.max_message_bytes.get(),
                "heartbeat_interval_ms": cfg.heartbeat_interval.as_millis() as u64,
                "max_connections_per_user": cfg.max_connections_per_user.get(),
                "max_managers_per_user": cfg.max_managers_per_user.get(),
                "message_rate_per_second": cfg.message_rate.get(),
            },
        });
        let text = protocol::frame("connection_established", self.meta(None), &data);
        self.send_text(text, OutKind::ConnectionEstablished).await?;
        let Some(since) = since else { return Ok(()) };
        self.replay(since).await
    }

    /// Every stored event after `since`, page by page. The connection is registered before the
    /// first read, so nothing committed from then on is missed; frames that arrive live with a
    /// seq the replay already sent are dropped in [`Connection::forward`].
    async fn replay(&mut self, since: u64) -> Result<(), End> {
        let mut cursor = since;
        loop {
            let page = match self
                .st
                .store
                .events_since(self.ctx.thread_id(), cursor, protocol::MAX_HISTORY_LIMIT)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "replay failed");
                    return Err(End::Close(CloseReason::Internal));
                }
            };
            let n = page.events.len();
            if n == 0 {
                // `since` beyond the end: continue from the real end, so live events pass.
                cursor = cursor.min(page.last_seq);
            }
            for (seq, text) in page.events {
                cursor = seq;
                metrics().message_out(OutKind::ThreadEvent);
                self.send(Message::Text(text.into())).await?;
            }
            if n < protocol::MAX_HISTORY_LIMIT as usize {
                break;
            }
        }
        self.last_sent_seq = cursor;
        Ok(())
    }

    /// Forward a queued frame and whatever else is queued behind it (at most
    /// [`WRITE_BATCH_FRAMES`]) in one write, dropping thread events the replay already sent.
    /// A run's frames usually arrive together, after one commit: one syscall instead of eight.
    async fn forward(&mut self, first: OutFrame, rx: &mut OutQueue) -> Result<(), End> {
        let mut batch = Vec::new();
        let mut next = Some(first);
        while let Some(f) = next.take() {
            if f.seq == 0 || f.seq > self.last_sent_seq {
                if f.seq > 0 {
                    self.last_sent_seq = f.seq;
                }
                metrics().message_out(if f.droppable {
                    OutKind::TextDelta
                } else {
                    OutKind::ThreadEvent
                });
                batch.push(Message::Text(f.text));
            }
            if batch.len() < WRITE_BATCH_FRAMES {
                next = rx.try_recv();
            }
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.send_all(batch.into_iter()).await
    }
}
