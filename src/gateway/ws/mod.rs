//! The WebSocket accept path (`GET /ws`) and, below it, the connection task.
//!
//! Before the upgrade, in this order: the handshake itself (RFC 6455), draining, the per-IP
//! connect rate, the query (`since` validation), authentication (header, `jwt.` subprotocol,
//! `?token=`, `?ticket=`: the first present decides), thread ownership (403). Each refusal is an
//! [`ApiError`] and a `handshake_rejected` metric. Then, in the connection task
//! ([`connection`]): [`UserExecutionContext::from_websocket_request`] (the only place a
//! connection's ids are minted), its registry slot, thread row, audit row and frame loop.
//!
//! | module | owns |
//! |---|---|
//! | `connection` | the connection task: its guards, the frame loop, sending, closing, lingering |
//! | `requests` | one function per client request (like mini-redis's `cmd/`) |
//! | `end` | [`end::End`]: why a connection ended, mapped to its close code and audit record |
//! | `rate` | the frame token bucket and the per-IP connect windows, on tokio's clock |

mod connection;
mod end;
mod rate;
mod requests;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::Deserialize;
use tracing::Instrument;

use super::api::parse_since;
use super::extract::ApiQuery;
use super::{ApiError, AppState};
use crate::auth::{bearer, AuthError};
use crate::context::{ThreadChoice, UserExecutionContext};
use crate::ids;
use crate::metrics::{metrics, Rejection};
use crate::protocol;
use connection::Connection;
pub(super) use rate::ConnectRate;

/// tungstenite buffers fed frames up to this size before writing; a flush writes the rest.
const WRITE_BATCH_BYTES: usize = 16 * 1024;

#[derive(Deserialize)]
pub(super) struct WsQuery {
    thread_id: Option<String>,
    since: Option<String>,
    token: Option<String>,
    ticket: Option<String>,
}

fn reject(r: Rejection, e: ApiError) -> Response {
    metrics().handshake_rejected(r);
    e.into_response()
}

/// A WebSocket handshake that is not one (RFC 6455 §4.2.1), as a JSON refusal like every other
/// one before the upgrade: 426 (which names the version this server speaks) for a wrong
/// `Sec-WebSocket-Version` or a connection that cannot be upgraded (HTTP/1.0), 400 otherwise.
fn handshake_refusal(
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: &HeaderMap,
) -> Result<WebSocketUpgrade, ApiError> {
    use base64::Engine as _;
    let ws = match ws {
        Ok(ws) => ws,
        Err(
            e @ (WebSocketUpgradeRejection::InvalidWebSocketVersionHeader(_)
            | WebSocketUpgradeRejection::ConnectionNotUpgradable(_)),
        ) => {
            return Err(ApiError::new(
                StatusCode::UPGRADE_REQUIRED,
                "invalid_request",
                e.body_text(),
            ))
        }
        Err(e) => return Err(ApiError::invalid(e.body_text())),
    };
    // axum only checks that the key is present; the RFC asks for 16 bytes in base64.
    let key_ok = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(k.as_bytes())
                .ok()
        })
        .is_some_and(|k| k.len() == 16);
    if !key_ok {
        return Err(ApiError::invalid(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ));
    }
    Ok(ws)
}

/// Authenticate an upgrade request: the first credential source present decides.
fn authenticate(
    st: &AppState,
    headers: &HeaderMap,
    ws: &WebSocketUpgrade,
    q: &WsQuery,
) -> Result<String, AuthError> {
    if headers.contains_key(header::AUTHORIZATION) {
        return st.auth.verify(bearer(headers).unwrap_or_default());
    }
    let sub_token = ws
        .requested_protocols()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix("jwt."));
    if let Some(t) = sub_token {
        return st.auth.verify(t);
    }
    if let Some(t) = q.token.as_deref() {
        if st.config.auth.allow_query_token {
            return st.auth.verify(t);
        }
    }
    if let Some(t) = q.ticket.as_deref() {
        return st.auth.redeem_ticket(t);
    }
    Err(AuthError::Missing)
}

/// The thread a connection asks for: a new one, or one of the user's (proved by the store).
async fn choose_thread(
    st: &AppState,
    user_id: &str,
    thread_id: Option<&str>,
) -> Result<(ThreadChoice, u64), Response> {
    let Some(t) = thread_id else {
        return Ok((ThreadChoice::New, 0));
    };
    if ids::parse(t).map(|p| p.prefix) != Ok("thread") {
        return Err(reject(
            Rejection::ForbiddenThread,
            ApiError::forbidden_thread(),
        ));
    }
    match st.store.find_thread(user_id, t).await {
        Ok(Some((owned, last))) => Ok((ThreadChoice::Resume(owned), last)),
        Ok(None) => Err(reject(
            Rejection::ForbiddenThread,
            ApiError::forbidden_thread(),
        )),
        Err(e) => {
            tracing::error!(error = %e, "thread lookup failed");
            Err(reject(
                Rejection::Overloaded,
                ApiError::unavailable("overloaded", "store unavailable"),
            ))
        }
    }
}

/// `GET /ws`: every check that can refuse before the upgrade, then the upgrade.
pub(super) async fn ws_handler(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<ApiQuery<WsQuery>, ApiError>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match handshake_refusal(ws, &headers) {
        Ok(ws) => ws,
        Err(e) => return reject(Rejection::InvalidRequest, e),
    };
    if st.is_draining() {
        return reject(
            Rejection::Draining,
            ApiError::unavailable("draining", "server is draining; reconnect to another node"),
        );
    }
    if !st.connect_rate.allow(peer.ip()) {
        return reject(
            Rejection::RateLimited,
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many connections from this address",
            ),
        );
    }
    let q = match q {
        Ok(ApiQuery(q)) => q,
        Err(e) => return reject(Rejection::InvalidRequest, e),
    };
    let since = match parse_since(q.since.as_deref()) {
        Ok(s) => s,
        Err(e) => return reject(Rejection::InvalidRequest, e),
    };
    let user_id = match authenticate(&st, &headers, &ws, &q) {
        Ok(u) => u,
        Err(e) => return reject(Rejection::Unauthorized, e.into()),
    };
    let (thread, last_seq) = match choose_thread(&st, &user_id, q.thread_id.as_deref()).await {
        Ok(t) => t,
        Err(refusal) => return refusal,
    };
    let max = st.config.limits.max_message_bytes.get();
    let tracker = st.tracker.clone();
    ws.protocols([protocol::PROTOCOL])
        .read_buffer_size(st.config.limits.ws_read_buffer_bytes.get())
        // Frames fed in one burst (see `Connection::forward`) leave in one write; a single
        // `send` flushes. The buffer grows to the largest burst written (a run's frames: a few
        // KiB) and keeps that capacity; a connection that never gets a burst never grows it.
        .write_buffer_size(WRITE_BATCH_BYTES)
        .max_write_buffer_size(max + 64 * 1024)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            // Everything synchronous happens before the task's future is built, so that future
            // holds only what the frame loop needs: its size is paid by every idle connection.
            let (sink, stream) = socket.split();
            let conn_id = ids::connection_id();
            let ctx = UserExecutionContext::from_websocket_request(&user_id, &conn_id, thread);
            tracker.track_future(async move {
                match ctx {
                    Ok(ctx) => {
                        let span = ctx.connection_span();
                        Connection::run(st, ctx, sink, stream, since, last_seq)
                            .instrument(span)
                            .await
                    }
                    Err(e) => {
                        // The user id was validated before the upgrade; this cannot happen.
                        tracing::error!(error = %e, "cannot build the connection context");
                    }
                }
            })
        })
}
