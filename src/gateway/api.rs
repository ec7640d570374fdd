//! The `/api/*` handlers: tickets, thread lists and events, admin publish and disconnect, stats,
//! and the development token.
//!
//! Authentication is in the extractors ([`AuthUser`], [`Admin`]); each handler validates its
//! own parameters and answers with an [`ApiError`] for anything it refuses.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::extract::{Admin, ApiJson, ApiQuery, AuthUser};
use super::{ApiError, AppState};
use crate::auth::TICKET_TTL;
use crate::ids;
use crate::metrics::{metrics, OutKind};
use crate::protocol::{self, CloseReason, FrameMeta};
use crate::registry::OutFrame;

pub(super) async fn create_ticket(
    State(st): State<Arc<AppState>>,
    AuthUser(user): AuthUser,
) -> Result<Json<Value>, ApiError> {
    let ticket = st.auth.issue_ticket(&user)?;
    Ok(Json(
        json!({"ticket": ticket, "expires_in": TICKET_TTL.as_secs()}),
    ))
}

#[derive(Deserialize)]
pub(super) struct PageQuery {
    since: Option<String>,
    limit: Option<String>,
}

fn parse_limit(limit: Option<&str>) -> Result<u32, ApiError> {
    match limit {
        None | Some("") => Ok(protocol::DEFAULT_HISTORY_LIMIT),
        Some(s) => match s.parse::<u32>() {
            Ok(n) if (1..=protocol::MAX_HISTORY_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid(format!(
                "limit must be an integer from 1 to {}",
                protocol::MAX_HISTORY_LIMIT
            ))),
        },
    }
}

/// Digits only: `u64`'s parser would also take `+5`, which is not how a `seq` is written.
pub(super) fn parse_since(since: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(s) = since else { return Ok(None) };
    match s.parse::<u64>() {
        Ok(n) if s.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(n)),
        _ => Err(ApiError::invalid("since must be a non-negative integer")),
    }
}

pub(super) async fn list_threads(
    State(st): State<Arc<AppState>>,
    AuthUser(user): AuthUser,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = parse_limit(q.limit.as_deref())?;
    let threads = st
        .store
        .list_threads(&user, limit)
        .await
        .map_err(|e| ApiError::store(&e))?;
    Ok(Json(json!({ "threads": threads })))
}

pub(super) async fn thread_events(
    State(st): State<Arc<AppState>>,
    AuthUser(user): AuthUser,
    path: Result<Path<String>, PathRejection>,
    q: Result<ApiQuery<PageQuery>, ApiError>,
) -> Result<Response, ApiError> {
    // A path that does not even decode (invalid percent-encoded UTF-8) names no thread: the same
    // 403 as any other thread that is not the caller's.
    let Ok(Path(thread_id)) = path else {
        return Err(ApiError::forbidden_thread());
    };
    let ApiQuery(q) = q?;
    let since = parse_since(q.since.as_deref())?.unwrap_or(0);
    let limit = parse_limit(q.limit.as_deref())?;
    if ids::parse(&thread_id).map(|p| p.prefix) != Ok("thread") {
        return Err(ApiError::forbidden_thread());
    }
    let owned = st
        .store
        .find_thread(&user, &thread_id)
        .await
        .map_err(|e| ApiError::store(&e))?;
    if owned.is_none() {
        return Err(ApiError::forbidden_thread());
    }
    let page = st
        .store
        .events_since(&thread_id, since, limit)
        .await
        .map_err(|e| ApiError::store(&e))?;
    // The stored frames are JSON already: splice them in without re-parsing.
    let mut body =
        String::with_capacity(64 + page.events.iter().map(|(_, e)| e.len() + 1).sum::<usize>());
    body.push_str("{\"thread_id\":");
    body.push_str(&serde_json::to_string(&thread_id).unwrap_or_default());
    body.push_str(",\"events\":[");
    for (i, (_, e)) in page.events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(e);
    }
    body.push_str("],\"last_seq\":");
    body.push_str(&page.last_seq.to_string());
    body.push('}');
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Deserialize)]
pub(super) struct PublishBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    thread_id: Option<String>,
}

pub(super) async fn publish_user_event(
    State(st): State<Arc<AppState>>,
    // The path before the token, as before the extractors: a path that does not decode gets
    // axum's 400 whoever asks.
    Path(user_id): Path<String>,
    _: Admin,
    ApiJson(body): ApiJson<PublishBody>,
) -> Result<Json<Value>, ApiError> {
    if body.kind.is_empty() || body.kind.len() > 64 {
        return Err(ApiError::invalid("type must be 1 to 64 bytes"));
    }
    let data = match body.data {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(ApiError::invalid("data must be an object")),
    };
    let text = protocol::frame(
        &body.kind,
        FrameMeta {
            thread_id: body.thread_id.as_deref(),
            ..Default::default()
        },
        &data,
    );
    let delivered = st
        .broker
        .publish_to_user(&user_id, body.thread_id.as_deref(), OutFrame::new(0, text))
        .await;
    metrics().message_out_n(OutKind::ServerEvent, delivered as u64);
    Ok(Json(json!({ "delivered": delivered })))
}

pub(super) async fn disconnect_user(
    State(st): State<Arc<AppState>>,
    Path(user_id): Path<String>,
    _: Admin,
) -> Result<Json<Value>, ApiError> {
    let closed = st
        .broker
        .disconnect_user(&user_id, CloseReason::DisconnectedByServer)
        .await;
    Ok(Json(json!({ "closed": closed })))
}

pub(super) async fn stats(
    State(st): State<Arc<AppState>>,
    _: Admin,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(st.stats_json().await))
}

#[derive(Deserialize)]
pub(super) struct DevTokenBody {
    user_id: String,
}

pub(super) async fn dev_token(
    State(st): State<Arc<AppState>>,
    body: Result<ApiJson<DevTokenBody>, ApiError>,
) -> Result<Json<Value>, ApiError> {
    if !st.config.auth.dev_mode {
        return Err(ApiError::not_found());
    }
    let ApiJson(body) = body?;
    let token = st.auth.mint(&body.user_id, Duration::from_secs(3600))?;
    Ok(Json(json!({ "token": token })))
}
