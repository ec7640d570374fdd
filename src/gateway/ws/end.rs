//! [`End`]: why a connection ended, and what that means on the wire and in the audit trail.
//!
//! Everything that ends a connection's frame loop becomes an `End`; [`End::close_reason`] and
//! [`End::recorded`] turn it into the close frame and the audit record. (A connection refused
//! before its frame loop, at a per-user limit or when its rows cannot be written, is closed
//! directly with its [`CloseReason`].)

use crate::protocol::{CloseCode, CloseReason};

/// Why a connection ended.
#[derive(Debug)]
pub(super) enum End {
    /// The server closes with this reason.
    Close(CloseReason),
    /// The client sent a close frame with this code (`None`: a frame without one) and reason.
    ClientClosed(Option<u16>, String),
    /// The socket died (reset, EOF without close frame): nothing can be sent.
    Lost,
    /// The server meant to close with this reason but the peer stopped reading, so the
    /// connection is dropped without a close frame.
    Dropped(CloseReason),
}

impl End {
    /// What a failed read from the socket means.
    pub(super) fn from_ws_error(err: axum::Error, max: usize) -> Self {
        use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
        match err.into_inner().downcast::<WsError>() {
            Ok(e) => match *e {
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
    /// handshake happened, 1005 when the peer's close frame had no code.
    pub(super) fn recorded(&self) -> (u16, String) {
        match self {
            End::Close(r) => (r.code(), r.reason()),
            End::ClientClosed(code, reason) => {
                (code.unwrap_or(CloseCode::NoStatus.as_u16()), reason.clone())
            }
            End::Lost => (
                CloseCode::Abnormal.as_u16(),
                "connection lost without close frame".into(),
            ),
            End::Dropped(r) => (
                r.code(),
                format!("{} (peer not reading; no close frame)", r.reason()),
            ),
        }
    }

    /// The close frame the server sends, if it sends one.
    pub(super) fn close_reason(&self) -> Option<&CloseReason> {
        match self {
            End::Close(r) => Some(r),
            _ => None,
        }
    }
}

/// What the audit row of a connection task that ended without saying why records.
pub(super) fn abnormal_end() -> (u16, String) {
    (
        CloseCode::Abnormal.as_u16(),
        "connection task ended abnormally".into(),
    )
}
