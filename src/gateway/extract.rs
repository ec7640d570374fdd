//! Extractors that carry the gateway's cross-cutting rules, so handlers only say what they need.
//!
//! [`AuthUser`] is a verified user (a bearer JWT), [`Admin`] the admin token; [`ApiJson`] and
//! [`ApiQuery`] turn axum's plain-text rejections into the documented JSON `invalid_request`.
//! Extractors run in argument order, so a handler's arguments also fix which refusal wins when
//! a request is wrong in several ways.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Json, Query, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::{ApiError, AppState};
use crate::auth::{bearer, constant_time_eq};

/// The user a request's `Authorization: Bearer <jwt>` names, verified.
pub(super) struct AuthUser(pub(super) String);

impl FromRequestParts<Arc<AppState>> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let token =
            bearer(&parts.headers).ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        Ok(Self(st.auth.verify(token)?))
    }
}

/// A request that carries the admin token (`Authorization: Bearer <TETHER_ADMIN_TOKEN>`).
pub(super) struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let given = bearer(&parts.headers).unwrap_or_default();
        if constant_time_eq(given.as_bytes(), st.admin_token.expose().as_bytes()) {
            Ok(Self)
        } else {
            Err(ApiError::unauthorized("admin token required"))
        }
    }
}

/// A JSON body; one that does not parse is a 400 `invalid_request` with the JSON error body.
pub(super) struct ApiJson<T>(pub(super) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Json::<T>::from_request(req, state)
            .await
            .map(|Json(v)| Self(v))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

/// A query string; one the extractor refuses (a repeated parameter, say) is a 400
/// `invalid_request` with the JSON error body, not axum's plain-text rejection.
pub(super) struct ApiQuery<T>(pub(super) T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Self(v))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}
