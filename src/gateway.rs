//! The gateway: HTTP routes, the WebSocket accept path and the connection task.
//!
//! Every request: a head over [`MAX_HEAD_BYTES`] gets 431; every refusal is an [`ApiError`]
//! (JSON body), 405 and 404 included.
//!
//! Accept path (`GET /ws`): the handshake itself (RFC 6455), draining and per-IP rate checks,
//! `since` validation,
//! authentication (header, `jwt.` subprotocol, `?token=`, `?ticket=`, first present decides),
//! thread ownership (403 before the upgrade), upgrade. Then, in the connection task:
//! [`UserExecutionContext::from_websocket_request`] (the only place a connection's ids are
//! minted), registry slot (4008 at a limit), thread row, audit row, `connection_established`,
//! replay, and the frame loop.
//!
//! The connection task owns its guards (registry slot, audit row, span); whatever ends it
//! (close, reset, error, panic, shutdown) drops them and so releases everything. Runs are
//! spawned on the server's task tracker with the connection's child context and outlive the
//! connection (their events are stored and reach the user's other tabs and later replays).
//!
//! Every close code comes from [`CloseReason`], mapped from what happened in one place
//! ([`End::close_reason`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use dashmap::DashMap;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::agent::{drive_run, Agent, RunInput};
use crate::auth::{Auth, AuthError, TICKET_TTL};
use crate::broker::Broker;
use crate::config::{Config, Secret};
use crate::context::{IsolationKey, ThreadChoice, UserExecutionContext};
use crate::ids;
use crate::metrics::{metrics, InKind, LiveGauges, MismatchSource, OutKind, Rejection};
use crate::protocol::{self, ClientRequest, CloseReason, ErrorCode, FrameMeta};
use crate::registry::{ConnHandle, ConnShared, OutFrame, OutQueue, Registry, RegistryGuard};
use crate::session::{AckTo, Gate, NewEvent, Role, SessionFactory, Write};
use crate::store::Store;

/// Everything the routes and connection tasks share.
pub struct AppState {
    pub config: Config,
    pub registry: Registry,
    pub store: Arc<dyn Store>,
    pub sessions: SessionFactory,
    pub broker: Arc<dyn Broker>,
    pub agent: Arc<dyn Agent>,
    pub auth: Auth,
    pub admin_token: Secret,
    /// Cancelled when the node starts draining.
    pub shutdown: CancellationToken,
    /// Cancelled at the end of the grace period: runs still going are cancelled.
    pub runs_cancel: CancellationToken,
    pub tracker: TaskTracker,
    pub draining: AtomicBool,
    pub started: Instant,
    runs: DashMap<String, RunEntry>,
    ip_rate: DashMap<IpAddr, (u64, u64)>,
}

struct RunEntry {
    key: IsolationKey,
    cancel: CancellationToken,
}

/// Removes a run from the active-runs map when the run task ends, however it ends.
struct RunGuard {
    state: Arc<AppState>,
    run_id: String,
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.state.runs.remove(&self.run_id);
    }
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        registry: Registry,
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        agent: Arc<dyn Agent>,
        auth: Auth,
        admin_token: Secret,
        tracker: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            registry,
            sessions: SessionFactory::new(store.clone()),
            store,
            broker,
            agent,
            auth,
            admin_token,
            shutdown: CancellationToken::new(),
            runs_cancel: CancellationToken::new(),
            tracker,
            draining: AtomicBool::new(false),
            started: Instant::now(),
            runs: DashMap::new(),
            ip_rate: DashMap::new(),
        })
    }

    /// Start draining: `/readyz` turns 503, new upgrades get 503, connections close with 1001.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.shutdown.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Per-IP connection rate (fixed one-second windows). `true` if allowed.
    fn allow_connect(&self, ip: IpAddr) -> bool {
        let limit = self.config.connect_rate_per_ip;
        if limit == 0 {
            return true;
        }
        let sec = ids::unix_ms() / 1000;
        let mut e = self.ip_rate.entry(ip).or_insert((sec, 0));
        if e.0 != sec {
            *e = (sec, 0);
        }
        e.1 += 1;
        e.1 <= limit
    }

    /// Periodic housekeeping: the registry backstop, expired tickets, old rate windows.
    pub fn housekeeping(&self) {
        self.registry.reap();
        self.auth.prune_tickets();
        let sec = ids::unix_ms() / 1000;
        self.ip_rate.retain(|_, (s, _)| *s + 2 >= sec);
    }

    fn check_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let given = bearer(headers).unwrap_or_default();
        if constant_time_eq(given.as_bytes(), self.admin_token.expose().as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("admin token required"))
        }
    }

    fn check_user(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let token =
            bearer(headers).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        self.auth.verify(token).map_err(ApiError::from)
    }

    /// The figures of `/api/stats`.
    pub async fn stats_json(&self) -> Value {
        let audit_rows_open = self.store.open_audit_rows().await.ok();
        let s = self.registry.stats(10);
        let m = metrics();
        let q = |p: f64| {
            m.run_duration
                .quantile(p)
                .map(|s| (s * 1000.0 * 10.0).round() / 10.0)
        };
        json!({
            "connections": s.connections,
            "managers": s.managers,
            "users": s.users,
            "sessions_open": m.sessions_open.get(),
            "managers_per_user": {"max": s.managers_per_user_max, "avg": s.managers_per_user_avg, "top": s.top},
            "cleanups": {"attempted": m.cleanups_attempted.get(), "completed": m.cleanups_completed.get()},
            "emergency_cleanups": m.emergency_cleanups.get(),
            "thread_mismatches": m.thread_mismatch_total(),
            "limit_rejections": m.limit_rejection_total(),
            "draining": self.is_draining(),
            "runs": {
                "started": m.runs_started.get(),
                "completed": m.runs_finished(crate::metrics::RunOutcome::Completed),
                "failed": m.runs_finished(crate::metrics::RunOutcome::Failed) + m.runs_finished(crate::metrics::RunOutcome::Cancelled),
                "active": m.runs_active.get(),
                "p50_ms": q(0.5),
                "p99_ms": q(0.99),
            },
            "messages": {"in": m.message_in_total(), "out": m.message_out_total()},
            "sessions": {
                "opened": m.sessions_opened.get(),
                "committed": m.sessions_committed.get(),
                "rolled_back": m.sessions_rolled_back.get(),
            },
            "audit_rows_open": audit_rows_open,
            // Live tokio tasks (connections, runs, HTTP connections, housekeeping) and the ones
            // the shutdown waits for: after churn both return to their idle level.
            "tasks": {
                "alive": tokio::runtime::Handle::current().metrics().num_alive_tasks(),
                "tracked": self.tracker.len(),
            },
            "uptime_s": self.started.elapsed().as_secs(),
            "node_id": self.config.node_id,
            "version": env!("CARGO_PKG_VERSION"),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// An HTTP error: `{"error":{"code","message"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    fn forbidden_thread() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden_thread",
            "thread does not exist or belongs to another user",
        )
    }
    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
    fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "not found")
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::TooManyTickets => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", e.to_string())
            }
            _ => Self::unauthorized(e.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store error in HTTP handler");
        Self::internal()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        let mut r = (self.status, body).into_response();
        if self.status == StatusCode::UPGRADE_REQUIRED {
            // The only upgrade this server offers is WebSocket: a 426 names the version it
            // speaks (RFC 6455 §4.4).
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        r
    }
}

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
async fn limit_head(req: Request, next: Next) -> Response {
    if head_bytes(&req) > MAX_HEAD_BYTES {
        metrics().handshake_rejected(Rejection::InvalidRequest);
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
async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed",
    )
}

async fn no_route() -> ApiError {
    ApiError::not_found()
}

const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");
const CHAT_HTML: &str = include_str!("../assets/chat.html");

/// All routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD_HTML) }))
        .route("/chat", get(|| async { Html(CHAT_HTML) }))
        .route("/ws", get(ws_handler))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/api/tickets", post(create_ticket))
        .route("/api/threads", get(list_threads))
        .route("/api/threads/{id}/events", get(thread_events))
        .route("/api/users/{user_id}/events", post(publish_user_event))
        .route("/api/users/{user_id}/connections", delete(disconnect_user))
        .route("/api/stats", get(stats))
        .route("/api/dev/token", post(dev_token))
        // After every route: it applies to the routes already added.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .layer(axum::middleware::from_fn(limit_head))
        .with_state(state)
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
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

async fn metrics_handler(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if st.config.metrics_require_admin {
        st.check_admin(&headers)?;
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
        metrics().render(&live),
    )
        .into_response())
}

async fn create_ticket(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let user = st.check_user(&headers)?;
    let ticket = st.auth.issue_ticket(&user)?;
    Ok(Json(
        json!({"ticket": ticket, "expires_in": TICKET_TTL.as_secs()}),
    ))
}

#[derive(Deserialize)]
struct PageQuery {
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

/// A query string the extractor refuses (a repeated parameter, say) is a 400 `invalid_request`
/// with the documented JSON body, not axum's plain-text rejection.
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::invalid(e.body_text()))
}

/// Digits only: `u64`'s parser would also take `+5`, which is not how a `seq` is written.
fn parse_since(since: Option<&str>) -> Result<Option<u64>, ApiError> {
    let Some(s) = since else { return Ok(None) };
    match s.parse::<u64>() {
        Ok(n) if s.bytes().all(|b| b.is_ascii_digit()) => Ok(Some(n)),
        _ => Err(ApiError::invalid("since must be a non-negative integer")),
    }
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

async fn list_threads(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let user = st.check_user(&headers)?;
    let q = query(q)?;
    let limit = parse_limit(q.limit.as_deref())?;
    let threads = st.store.list_threads(&user, limit).await?;
    Ok(Json(json!({ "threads": threads })))
}

async fn thread_events(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let user = st.check_user(&headers)?;
    // A path that does not even decode (invalid percent-encoded UTF-8) names no thread: the same
    // 403 as any other thread that is not the caller's.
    let Ok(Path(thread_id)) = path else {
        return Err(ApiError::forbidden_thread());
    };
    let q = query(q)?;
    let since = parse_since(q.since.as_deref())?.unwrap_or(0);
    let limit = parse_limit(q.limit.as_deref())?;
    if ids::parse(&thread_id).map(|p| p.prefix) != Ok("thread") {
        return Err(ApiError::forbidden_thread());
    }
    if st.store.find_thread(&user, &thread_id).await?.is_none() {
        return Err(ApiError::forbidden_thread());
    }
    let page = st.store.events_since(&thread_id, since, limit).await?;
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
struct PublishBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Option<Value>,
    #[serde(default)]
    thread_id: Option<String>,
}

async fn publish_user_event(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
    body: Result<Json<PublishBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    st.check_admin(&headers)?;
    let Json(body) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
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

async fn disconnect_user(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    st.check_admin(&headers)?;
    let reason = CloseReason::DisconnectedByServer;
    let closed = st
        .broker
        .disconnect_user(&user_id, reason.code(), &reason.reason())
        .await;
    Ok(Json(json!({ "closed": closed })))
}

async fn stats(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    st.check_admin(&headers)?;
    Ok(Json(st.stats_json().await))
}

#[derive(Deserialize)]
struct DevTokenBody {
    user_id: String,
}

async fn dev_token(
    State(st): State<Arc<AppState>>,
    body: Result<Json<DevTokenBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    if !st.config.dev_mode {
        return Err(ApiError::not_found());
    }
    let Json(body) = body.map_err(|e| ApiError::invalid(e.body_text()))?;
    let token = st.auth.mint(&body.user_id, Duration::from_secs(3600))?;
    Ok(Json(json!({ "token": token })))
}

#[derive(Deserialize)]
struct WsQuery {
    thread_id: Option<String>,
    since: Option<String>,
    token: Option<String>,
    ticket: Option<String>,
}

fn reject(r: Rejection, e: ApiError) -> Response {
    metrics().handshake_rejected(r);
    e.into_response()
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
        if st.config.allow_query_token {
            return st.auth.verify(t);
        }
    }
    if let Some(t) = q.ticket.as_deref() {
        return st.auth.redeem_ticket(t);
    }
    Err(AuthError::Missing)
}

async fn ws_handler(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    q: Result<Query<WsQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ws = match handshake_refusal(ws, &headers) {
        Ok(ws) => ws,
        Err(e) => return reject(Rejection::InvalidRequest, e),
    };
    if st.is_draining() {
        return reject(
            Rejection::Draining,
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "server is draining; reconnect to another node",
            ),
        );
    }
    if !st.allow_connect(peer.ip()) {
        return reject(
            Rejection::RateLimited,
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many connections from this address",
            ),
        );
    }
    let q = match query(q) {
        Ok(q) => q,
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
    let (thread, last_seq) = match q.thread_id.as_deref() {
        None => (ThreadChoice::New, 0),
        Some(t) => {
            if ids::parse(t).map(|p| p.prefix) != Ok("thread") {
                return reject(Rejection::ForbiddenThread, ApiError::forbidden_thread());
            }
            match st.store.find_thread(&user_id, t).await {
                Ok(Some((owned, last))) => (ThreadChoice::Resume(owned), last),
                Ok(None) => {
                    return reject(Rejection::ForbiddenThread, ApiError::forbidden_thread())
                }
                Err(e) => {
                    tracing::error!(error = %e, "thread lookup failed");
                    return reject(
                        Rejection::Overloaded,
                        ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "overloaded",
                            "store unavailable",
                        ),
                    );
                }
            }
        }
    };
    let max = st.config.max_message_bytes as usize;
    let tracker = st.tracker.clone();
    ws.protocols([protocol::PROTOCOL])
        .read_buffer_size(st.config.ws_read_buffer_bytes as usize)
        // Frames fed in one burst (see `forward`) leave in one write; a single `send` flushes.
        // The buffer grows to the largest burst written (a run's frames: a few KiB) and keeps
        // that capacity; a connection that never gets a burst never grows it.
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

/// Why a connection ended. Mapped to a close code in one place: [`End::close_reason`].
#[derive(Debug)]
enum End {
    /// The server closes with this reason.
    Close(CloseReason),
    /// The client sent a close frame with this code.
    ClientClosed(u16, String),
    /// The socket died (reset, EOF without close frame): nothing can be sent.
    Lost,
    /// The server meant to close with this reason but the peer stopped reading, so the
    /// connection is dropped without a close frame.
    Dropped(CloseReason),
}

impl End {
    fn from_ws_error(err: axum::Error, max: usize) -> Self {
        use tokio_tungstenite::tungstenite::error::{
            CapacityError, Error as WsError, ProtocolError,
        };
        match err.into_inner().downcast::<WsError>() {
            Ok(e) => match *e {
                WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
                    End::Close(CloseReason::TooBig { max })
                }
                WsError::Capacity(_) => End::Close(CloseReason::TooBig { max }),
                // EOF without a close frame (a killed tab sends FIN): the peer is gone; closing
                // it politely would only keep the socket a second longer.
                WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Lost,
                WsError::Protocol(_) => End::Close(CloseReason::ProtocolError),
                WsError::Utf8(_) => End::Close(CloseReason::InvalidUtf8),
                WsError::ConnectionClosed | WsError::AlreadyClosed | WsError::Io(_) => End::Lost,
                _ => End::Close(CloseReason::ProtocolError),
            },
            Err(_) => End::Lost,
        }
    }

    /// The code and reason recorded for the audit trail and metrics; 1006 when no close
    /// handshake happened.
    fn recorded(&self) -> (u16, String) {
        match self {
            End::Close(r) => (r.code(), r.reason()),
            End::ClientClosed(code, reason) => (*code, reason.clone()),
            End::Lost => (1006, "connection lost without close frame".into()),
            End::Dropped(r) => (
                r.code(),
                format!("{} (peer not reading; no close frame)", r.reason()),
            ),
        }
    }

    fn close_reason(&self) -> Option<&CloseReason> {
        match self {
            End::Close(r) => Some(r),
            _ => None,
        }
    }
}

/// Records the connection's audit row as closed when dropped (with 1006 unless told otherwise).
struct AuditGuard {
    store: Arc<dyn Store>,
    connection_id: Arc<str>,
    outcome: Option<(u16, String)>,
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        let (code, reason) = self
            .outcome
            .take()
            .unwrap_or((1006, "connection task ended abnormally".into()));
        metrics().connection_closed(code);
        self.store
            .audit_close(self.connection_id.clone(), code, reason);
    }
}

/// A token bucket of client frames.
struct RateLimiter {
    per_second: f64,
    tokens: f64,
    last: Instant,
    /// Frames refused in a row; another second's worth closes the connection with 4029.
    strikes: u32,
}

impl RateLimiter {
    fn new(per_second: u64) -> Self {
        Self {
            per_second: per_second as f64,
            tokens: per_second as f64,
            last: Instant::now(),
            strikes: 0,
        }
    }

    /// `Ok(true)`: allowed; `Ok(false)`: refuse this frame; `Err(())`: close with 4029.
    fn check(&mut self) -> Result<bool, ()> {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.strikes = 0;
            Ok(true)
        } else {
            self.strikes += 1;
            if f64::from(self.strikes) > self.per_second {
                Err(())
            } else {
                Ok(false)
            }
        }
    }
}

/// How long one write may block before the peer counts as stalled.
const WRITE_STALL: Duration = Duration::from_secs(10);
/// Frames taken from the outbound queue for one write.
const WRITE_BATCH_FRAMES: usize = 32;
/// tungstenite buffers fed frames up to this size before writing; a flush writes the rest.
const WRITE_BATCH_BYTES: usize = 16 * 1024;

/// How long a pending write may still take once a close was requested.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The same for a slow consumer: its write is most likely stuck behind a peer that stopped
/// reading, and it must be gone within a second of its queue overflowing.
const SLOW_CONSUMER_GRACE: Duration = Duration::from_millis(200);

fn close_grace(code: u16) -> Duration {
    if code == CloseReason::SlowConsumer.code() {
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
/// streaming an oversized message saw "connection reset" instead of 4029 or 1009
/// (tests/hostile.rs). After a frame error the stream yields nothing more (tungstenite fuses
/// it), so then only the deadline applies. Holds no registry slot or audit row.
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

/// One WebSocket connection: owns its guards and runs its frame loop.
struct Connection {
    st: Arc<AppState>,
    ctx: UserExecutionContext,
    sink: SplitSink<WebSocket, Message>,
    shared: Arc<ConnShared>,
    last_sent_seq: u64,
    rate: RateLimiter,
}

impl Connection {
    async fn run(
        st: Arc<AppState>,
        ctx: UserExecutionContext,
        sink: SplitSink<WebSocket, Message>,
        mut stream: SplitStream<WebSocket>,
        since: Option<u64>,
        last_seq: u64,
    ) {
        let (handle, mut rx, shared) = ConnHandle::channel(st.config.outbound_queue as usize);
        let mut conn = Connection {
            rate: RateLimiter::new(st.config.message_rate),
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
        if !conn.ctx.resumed() {
            let mut session = conn.st.sessions.create_session_from_context(&conn.ctx);
            session.stage(Write::CreateThread);
            if let Err(e) = Box::pin(session.commit()).await {
                tracing::error!(error = %e, "cannot create the thread");
                metrics().connection_closed(1011);
                Box::pin(conn.close(&CloseReason::Internal)).await;
                return;
            }
        }
        if let Err(e) = Box::pin(conn.st.store.audit_open(&conn.ctx)).await {
            tracing::error!(error = %e, "cannot open the audit row");
            metrics().connection_closed(1011);
            Box::pin(conn.close(&CloseReason::Internal)).await;
            return;
        }
        let mut audit = AuditGuard {
            store: conn.st.store.clone(),
            connection_id: conn.ctx.connection_id_arc().clone(),
            outcome: None,
        };
        tracing::info!(resumed = conn.ctx.resumed(), "connection opened");

        let end = conn.serve(&mut rx, &mut stream, since, last_seq).await;
        let server_closed = end.close_reason().is_some();
        if let Some(reason) = end.close_reason() {
            Box::pin(conn.close(reason)).await;
        } else if let End::ClientClosed(..) = end {
            // Complete the close handshake (tungstenite queued the echo).
            let _ = Box::pin(tokio::time::timeout(
                Duration::from_secs(1),
                conn.sink.close(),
            ))
            .await;
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

    /// Send a close frame (best effort, bounded in time).
    async fn close(&mut self, reason: &CloseReason) {
        let frame = CloseFrame {
            code: reason.code(),
            reason: reason.reason().into(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.sink.send(Message::Close(Some(frame))),
        )
        .await;
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
            req = shared.closed() => match tokio::time::timeout(close_grace(req.code), &mut write).await {
                // Written: the frame loop sees the close request next and sends the close frame.
                Ok(r) => stalled(r),
                Err(_) => Err(End::Dropped(CloseReason::from_request(req.code))),
            },
        }
    }

    async fn send_text(&mut self, text: String, kind: OutKind) -> Result<(), End> {
        metrics().message_out(kind);
        self.send(Message::Text(text.into())).await
    }

    fn meta<'a>(&'a self, reply_to: Option<&'a str>) -> FrameMeta<'a> {
        FrameMeta {
            thread_id: Some(self.ctx.thread_id()),
            ..Default::default()
        }
        .with_reply(reply_to)
    }

    async fn send_error(
        &mut self,
        reply_to: Option<&str>,
        code: ErrorCode,
        message: &str,
    ) -> Result<(), End> {
        let text = protocol::error_frame(self.ctx.thread_id(), reply_to, code, message);
        self.send_text(text, OutKind::Error).await
    }

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
        let hb_interval = self.st.config.heartbeat_interval();
        let pong_timeout = self.st.config.pong_timeout();
        let mut ping_sent: Option<tokio::time::Instant> = None;
        let mut next_ping = tokio::time::Instant::now() + hb_interval;
        let shared = self.shared.clone();
        let shutdown = self.st.shutdown.clone();
        loop {
            let deadline = ping_sent.map_or(next_ping, |t| t + pong_timeout);
            let step = tokio::select! {
                biased;
                req = shared.closed() => Err(End::Close(CloseReason::from_request(req.code))),
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
                    Some(Err(e)) => Err(End::from_ws_error(e, self.st.config.max_message_bytes as usize)),
                    Some(Ok(Message::Text(t))) => Box::pin(self.on_text(t.as_str())).await,
                    Some(Ok(Message::Binary(_))) => Err(End::Close(CloseReason::Binary)),
                    Some(Ok(Message::Ping(_))) => match self.rate.check() {
                        Err(()) => Err(End::Close(CloseReason::RateLimited { per_second: self.st.config.message_rate as u32 })),
                        Ok(_) => Ok(()),
                    },
                    Some(Ok(Message::Pong(_))) => {
                        ping_sent = None;
                        Ok(())
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) = frame.map_or((1005, String::new()), |f| (f.code, f.reason.to_string()));
                        Err(End::ClientClosed(code, reason))
                    }
                },
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// `connection_established`, then the replay of `since`.
    async fn start(&mut self, since: Option<u64>, last_seq: u64) -> Result<(), End> {
        let cfg = &self.st.config;
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
                "max_message_bytes": cfg.max_message_bytes,
                "heartbeat_interval_ms": cfg.heartbeat_interval_ms,
                "max_connections_per_user": cfg.max_connections_per_user,
                "max_managers_per_user": cfg.max_managers_per_user,
                "message_rate_per_second": cfg.message_rate,
            },
        });
        let text = protocol::frame("connection_established", self.meta(None), &data);
        self.send_text(text, OutKind::ConnectionEstablished).await?;
        let Some(since) = since else { return Ok(()) };
        // Registered before reading, so nothing committed from now on is missed; frames that
        // arrive live with a seq the replay already sent are dropped in `forward`.
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

    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        match self.rate.check() {
            Ok(true) => {}
            Ok(false) => {
                metrics().message_in(InKind::Invalid);
                let id = protocol::parse_client_frame(text).ok().and_then(|f| f.id);
                let limit = self.st.config.message_rate;
                return self
                    .send_error(
                        id.as_deref(),
                        ErrorCode::RateLimited,
                        &format!("too many messages (limit {limit}/s)"),
                    )
                    .await;
            }
            Err(()) => {
                return Err(End::Close(CloseReason::RateLimited {
                    per_second: self.st.config.message_rate as u32,
                }))
            }
        }
        let frame = match protocol::parse_client_frame(text) {
            Ok(f) => f,
            Err(e) => {
                metrics().message_in(if e.code == ErrorCode::UnknownType {
                    InKind::Unknown
                } else {
                    InKind::Invalid
                });
                return self.send_error(e.id.as_deref(), e.code, &e.message).await;
            }
        };
        let id = frame.id.as_deref();
        if let Some(t) = frame.thread_id.as_deref() {
            if t != self.ctx.thread_id() {
                metrics().thread_mismatch(MismatchSource::Frame);
                metrics().message_in(InKind::Invalid);
                tracing::warn!(frame_thread_id = %truncate(t, 300), "thread_id mismatch: frame not acted on");
                return self
                    .send_error(
                        id,
                        ErrorCode::ThreadMismatch,
                        "thread_id does not match this connection's thread",
                    )
                    .await;
            }
        }
        match frame.request {
            ClientRequest::UserMessage { content } => {
                metrics().message_in(InKind::UserMessage);
                self.on_user_message(content, frame.id).await
            }
            ClientRequest::Ping => {
                metrics().message_in(InKind::Ping);
                let text = protocol::frame(
                    "pong",
                    self.meta(id),
                    &json!({"server_time": protocol::now_rfc3339()}),
                );
                self.send_text(text, OutKind::Pong).await
            }
            ClientRequest::GetHistory { since, limit } => {
                metrics().message_in(InKind::GetHistory);
                match self
                    .st
                    .store
                    .events_since(self.ctx.thread_id(), since, limit)
                    .await
                {
                    Ok(page) => {
                        let events: Vec<String> = page.events.into_iter().map(|(_, e)| e).collect();
                        let text = protocol::history_frame(
                            self.ctx.thread_id(),
                            id,
                            &events,
                            page.last_seq,
                        );
                        self.send_text(text, OutKind::History).await
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "history read failed");
                        self.send_error(id, ErrorCode::Internal, "could not read history")
                            .await
                    }
                }
            }
            ClientRequest::CancelRun { run_id } => {
                metrics().message_in(InKind::CancelRun);
                let cancelled = self
                    .st
                    .runs
                    .get(&run_id)
                    .filter(|r| &r.key == self.ctx.isolation_key())
                    .map(|r| r.cancel.cancel())
                    .is_some();
                if cancelled {
                    Ok(())
                } else {
                    self.send_error(
                        id,
                        ErrorCode::UnknownRun,
                        "no active run with this run_id on this thread",
                    )
                    .await
                }
            }
        }
    }

    /// Store the message (the writer sends the `ack` after the commit) and run the agent with a
    /// child context at once: the run's sessions queue behind the message's and require its
    /// gate, so they are stored only if the message is, and a fast run shares its message's
    /// commit. The frame loop waits for neither.
    async fn on_user_message(
        &mut self,
        content: String,
        client_id: Option<String>,
    ) -> Result<(), End> {
        let run_ctx = match self.ctx.child() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot derive the run context");
                return self
                    .send_error(client_id.as_deref(), ErrorCode::Internal, "internal error")
                    .await;
            }
        };
        let message_id = ids::message_id();
        let reply_to: Option<Arc<str>> = client_id.as_deref().map(Into::into);
        let gate = Gate::new(&self.ctx);
        let mut session = self.st.sessions.create_session_from_context(&self.ctx);
        session
            .stage(Write::Event(NewEvent {
                kind: "user_message",
                run_id: None,
                reply_to: reply_to.clone(),
                data: json!({"message_id": message_id, "content": content, "user_id": self.ctx.user_id()}),
                ack: Some(AckTo {
                    message_id: message_id.clone(),
                    run_id: run_ctx.run_id().to_string(),
                }),
                prepared: None,
            }))
            .stage(Write::Message {
                message_id: message_id.clone(),
                role: Role::User,
                content: content.clone(),
                run_id: Some(run_ctx.run_id().to_string()),
            })
            .stage(Write::RunStarted { run: run_ctx.clone() })
            .stage(Write::Opens(gate.clone()));
        let receipt = match session.submit().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot queue the message");
                return self
                    .send_error(
                        client_id.as_deref(),
                        ErrorCode::Internal,
                        "message not stored",
                    )
                    .await;
            }
        };
        let cancel = self.st.runs_cancel.child_token();
        self.st.runs.insert(
            run_ctx.run_id().to_string(),
            RunEntry {
                key: run_ctx.isolation_key().clone(),
                cancel: cancel.clone(),
            },
        );
        let guard = RunGuard {
            state: self.st.clone(),
            run_id: run_ctx.run_id().to_string(),
        };
        let st = self.st.clone();
        let conn_id = self.ctx.connection_id_arc().clone();
        let span = tracing::Span::current();
        self.st.tracker.spawn(
            async move {
                let _guard = guard;
                let input = RunInput {
                    content,
                    message_id,
                    after: Some(gate),
                };
                // The run starts now; its sessions queue behind the message's and are stored
                // only if it is. If the message is not stored, the sender hears it at once and
                // the run is cancelled (whatever it still emits is refused by the gate).
                let stop_run = cancel.clone();
                let run = drive_run(
                    st.agent.clone(),
                    st.sessions.clone(),
                    run_ctx.clone(),
                    input,
                    reply_to.clone(),
                    cancel,
                    st.config.run_timeout(),
                );
                let watch = async {
                    let err = match receipt.await {
                        Ok(Ok(_)) => return,
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "store closed".into(),
                    };
                    stop_run.cancel();
                    tracing::error!(error = %err, "user message not stored; its run stored nothing");
                    let text = protocol::error_frame(
                        run_ctx.thread_id(),
                        reply_to.as_deref(),
                        ErrorCode::Internal,
                        "message not stored",
                    );
                    st.registry
                        .deliver_to(run_ctx.isolation_key(), &conn_id, OutFrame::new(0, text));
                };
                let _ = tokio::join!(watch, run);
            }
            .instrument(span),
        );
        Ok(())
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
