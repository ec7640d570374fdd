//! The one close-code table (PROTOCOL.md section 7).
//!
//! [`CloseCode`] lists every code the server sends or records, with its number; nothing else in
//! the crate spells a close code as a number. [`CloseReason`] is why the server closes: each
//! reason has one code and one text, and it is what a close request carries from whoever asks
//! (the registry on a queue overflow, the broker on an admin disconnect, the gateway on
//! shutdown) to the connection task that sends the close frame.

use std::borrow::Cow;

use super::truncate;

macro_rules! close_codes {
    ($($(#[$doc:meta])* $name:ident = $code:literal, series: $series:literal;)+) => {
        /// A WebSocket close code this server sends or records.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum CloseCode {
            $($(#[$doc])* $name),+
        }

        impl CloseCode {
            /// Every code, in numeric order.
            pub const ALL: &'static [CloseCode] = &[$(CloseCode::$name),+];

            /// The number on the wire.
            pub const fn as_u16(self) -> u16 {
                match self {
                    $(CloseCode::$name => $code),+
                }
            }

            /// The code with this number, if it is in the table.
            pub const fn from_u16(code: u16) -> Option<Self> {
                match code {
                    $($code => Some(CloseCode::$name),)+
                    _ => None,
                }
            }

            /// Whether `tether_connections_closed_total` has a series of its own for this code
            /// (the others count as `other`).
            pub const fn has_series(self) -> bool {
                match self {
                    $(CloseCode::$name => $series),+
                }
            }
        }
    };
}

close_codes! {
    /// The client asked to close, or a normal close.
    Normal = 1000, series: true;
    /// The server is draining.
    GoingAway = 1001, series: true;
    /// A frame broke RFC 6455.
    ProtocolError = 1002, series: true;
    /// A binary frame (the protocol is text only).
    Unsupported = 1003, series: true;
    /// Recorded when a peer's close frame carried no code (never sent).
    NoStatus = 1005, series: false;
    /// Recorded when a connection ended without a close handshake (never sent).
    Abnormal = 1006, series: true;
    /// A text frame that is not UTF-8.
    InvalidPayload = 1007, series: true;
    /// Policy: disconnected by an admin, or too many invalid frames.
    Policy = 1008, series: true;
    /// A message over `TETHER_MAX_MESSAGE_BYTES`.
    TooBig = 1009, series: true;
    /// The server failed.
    Internal = 1011, series: true;
    /// The server is overloaded.
    Overloaded = 1013, series: true;
    /// No pong within `TETHER_PONG_TIMEOUT_MS`.
    HeartbeatTimeout = 4000, series: true;
    /// A per-user limit (connections or managers).
    UserLimit = 4008, series: true;
    /// The connection's outbound queue overflowed.
    SlowConsumer = 4009, series: true;
    /// Too many client frames, for too long.
    RateLimited = 4029, series: true;
}

/// Why the server closes a connection: each reason has exactly one [`CloseCode`] and one text.
/// Every close the server sends goes through [`CloseReason::code`] and [`CloseReason::reason`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// A normal close.
    Normal,
    /// The node is draining.
    ShuttingDown,
    /// A frame broke RFC 6455.
    ProtocolError,
    /// A binary frame.
    Binary,
    /// A text frame that is not UTF-8.
    InvalidUtf8,
    /// An admin disconnected the user (`DELETE /api/users/{id}/connections`).
    DisconnectedByServer,
    /// Too many invalid frames.
    TooManyProtocolErrors,
    /// A message over the size limit.
    TooBig {
        /// The limit, in bytes.
        max: usize,
    },
    /// The server failed (the thread or audit row could not be written, a replay failed).
    Internal,
    /// The server is overloaded.
    Overloaded,
    /// No pong in time.
    HeartbeatTimeout,
    /// A per-user limit; the text names it and the numbers.
    UserLimit(String),
    /// The outbound queue overflowed.
    SlowConsumer,
    /// Too many frames for too long.
    RateLimited {
        /// The configured rate.
        per_second: u32,
    },
}

impl CloseReason {
    /// The reason's close code.
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::Normal => CloseCode::Normal,
            Self::ShuttingDown => CloseCode::GoingAway,
            Self::ProtocolError => CloseCode::ProtocolError,
            Self::Binary => CloseCode::Unsupported,
            Self::InvalidUtf8 => CloseCode::InvalidPayload,
            Self::DisconnectedByServer | Self::TooManyProtocolErrors => CloseCode::Policy,
            Self::TooBig { .. } => CloseCode::TooBig,
            Self::Internal => CloseCode::Internal,
            Self::Overloaded => CloseCode::Overloaded,
            Self::HeartbeatTimeout => CloseCode::HeartbeatTimeout,
            Self::UserLimit(_) => CloseCode::UserLimit,
            Self::SlowConsumer => CloseCode::SlowConsumer,
            Self::RateLimited { .. } => CloseCode::RateLimited,
        }
    }

    /// The number of the reason's close code.
    pub fn code(&self) -> u16 {
        self.close_code().as_u16()
    }

    /// The close reason text, at most 123 bytes (the most a close frame carries).
    pub fn reason(&self) -> String {
        let s: Cow<'_, str> = match self {
            Self::Normal => "normal close".into(),
            Self::ShuttingDown => "server shutting down".into(),
            Self::ProtocolError => "protocol error".into(),
            Self::Binary => "binary frames are not supported".into(),
            Self::InvalidUtf8 => "text frame is not valid UTF-8".into(),
            Self::DisconnectedByServer => "disconnected by server".into(),
            Self::TooManyProtocolErrors => "too many invalid frames".into(),
            Self::TooBig { max } => format!("message too big (max {max} bytes)").into(),
            Self::Internal => "internal error".into(),
            Self::Overloaded => "server overloaded".into(),
            Self::HeartbeatTimeout => "heartbeat timeout: no pong in time".into(),
            Self::UserLimit(text) => text.as_str().into(),
            Self::SlowConsumer => "slow consumer: outbound queue overflowed".into(),
            Self::RateLimited { per_second } => {
                format!("too many messages (limit {per_second}/s)").into()
            }
        };
        truncate(&s, 123).to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reasons_fit_in_123_bytes() {
        let long = CloseReason::UserLimit("x".repeat(500));
        assert_eq!(long.reason().len(), 123);
        assert_eq!(
            CloseReason::RateLimited { per_second: 20 }.reason(),
            "too many messages (limit 20/s)"
        );
        assert_eq!(CloseReason::SlowConsumer.code(), 4009);
    }

    #[test]
    fn the_table_maps_every_code_both_ways_in_numeric_order() {
        for pair in CloseCode::ALL.windows(2) {
            assert!(pair[0].as_u16() < pair[1].as_u16(), "{pair:?}");
        }
        for &c in CloseCode::ALL {
            assert_eq!(CloseCode::from_u16(c.as_u16()), Some(c));
        }
        assert_eq!(CloseCode::from_u16(1234), None);
    }

    #[test]
    fn the_documented_codes_are_the_wire_codes() {
        // PROTOCOL.md section 7, as clients see them.
        let wire = [
            (CloseReason::ShuttingDown, 1001),
            (CloseReason::ProtocolError, 1002),
            (CloseReason::Binary, 1003),
            (CloseReason::InvalidUtf8, 1007),
            (CloseReason::DisconnectedByServer, 1008),
            (CloseReason::TooBig { max: 1 }, 1009),
            (CloseReason::Internal, 1011),
            (CloseReason::HeartbeatTimeout, 4000),
            (CloseReason::UserLimit(String::new()), 4008),
            (CloseReason::SlowConsumer, 4009),
            (CloseReason::RateLimited { per_second: 1 }, 4029),
        ];
        for (reason, code) in wire {
            assert_eq!(reason.code(), code, "{reason:?}");
        }
    }
}
