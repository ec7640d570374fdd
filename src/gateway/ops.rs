//! The operators' routes and the rules every request meets: `/healthz`, `/readyz`, `/metrics`,
//! the dashboard and chat pages, JSON 404 and 405, and the request-head limit (431).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::extract::Admin;
use super::{ApiError, AppState};
use crate::metrics::{metrics as global_metrics, LiveGauges, Rejection};

/// Largest request head accepted (request line and header lines, counted as `name: value`
/// lines); a larger one gets 431. The HTTP parser's buffer is this size too (see
/// `server::accept_loop`), but how much it takes in depends on how the client's bytes arrive,
/// so the exact limit is checked here, on the parsed head.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The size of a request's head as it would be written on the wire, with single spaces.
fn head_bytes(req: &Request) -> usize {
    let uri = req.uri();
    let target = uri.path_and_query().map_or(1, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, |s| s.len() + "://".len());
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + ": ".len() + v.len() + "\r\n".len())
        .sum();
    line + headers + "\r\n".len()
}

/// Refuses a request whose head is over [`MAX_HEAD_BYTES`], before any handler sees it.
pub(super) async fn limit_head(req: Request, next: Next) -> Response {
    if head_bytes(&req) > MAX_HEAD_BYTES {
        global_metrics().handshake_rejected(Rejection::InvalidRequest);
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request",
            format!("request head over {MAX_HEAD_BYTES} bytes"),
        )
        .into_response();
    }
    next.run(req).await
}

/// A route that exists, with a method it does not take (axum adds the `Allow` header).
pub(super) async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed",
    )
}

pub(super) async fn no_route() -> ApiError {
    ApiError::not_found()
}

const DASHBOARD_HTML: &str = include_str!("../../assets/dashboard.html");
const CHAT_HTML: &str = include_str!("../../assets/chat.html");

pub(super) async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD_HTML)
}

pub(super) async fn chat() -> Html<&'static str> {
    Html(CHAT_HTML)
}

pub(super) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub(super) async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    if st.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    let store_ok = tokio::time::timeout(Duration::from_secs(2), st.store.ping())
        .await
        .is_ok_and(|r| r.is_ok());
    let broker_ok = tokio::time::timeout(Duration::from_secs(2), st.broker.ping())
        .await
        .unwrap_or(false);
    if store_ok && broker_ok {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "store": store_ok, "broker": broker_ok})),
        )
            .into_response()
    }
}

/// Prometheus text; behind the admin token when `TETHER_METRICS_REQUIRE_ADMIN` is set.
pub(super) async fn metrics(
    State(st): State<Arc<AppState>>,
    admin: Result<Admin, ApiError>,
) -> Result<Response, ApiError> {
    if st.config.auth.metrics_require_admin {
        admin?;
    }
    let s = st.registry.stats(0);
    let live = LiveGauges {
        connections: s.connections,
        managers: s.managers,
        users: s.users,
        managers_per_user_avg: s.managers_per_user_avg,
        managers_per_user_max: s.managers_per_user_max,
        draining: st.is_draining(),
        tasks_alive: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as u64,
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        global_metrics().render(&live),
    )
        .into_response())
}
