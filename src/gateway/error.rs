//! [`ApiError`]: every refusal the gateway answers over HTTP, before or instead of an upgrade.
//!
//! The body is always `{"error":{"code","message"}}` (PROTOCOL.md section 1). Conversions from
//! other errors only map them; whoever handles an error logs it, once (a `From` that logs would
//! log errors that a caller then recovers from, and log them again where they are handled).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::auth::AuthError;

/// An HTTP error: `{"error":{"code","message"}}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(super) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub(super) fn forbidden_thread() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden_thread",
            "thread does not exist or belongs to another user",
        )
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub(super) fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }

    pub(super) fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "not found")
    }

    pub(super) fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// A store failure inside a handler: logged here, where it is handled, and answered as 500.
    pub(super) fn store(e: &crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store error in HTTP handler");
        Self::internal()
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::TooManyTickets => Self::unavailable("overloaded", e.to_string()),
            _ => Self::unauthorized(e.to_string()),
        }
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
