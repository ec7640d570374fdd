//! The wire protocol `tether.v1` (PROTOCOL.md): envelopes, frame types, error codes and the one
//! table of close codes.
//!
//! This module owns the shape of every byte on the socket: parsing client frames into
//! [`ClientRequest`]s (never panicking on hostile input) and building server frames. It knows
//! nothing about connections, storage or agents.

mod close;
mod parse;

use serde::Serialize;
use serde_json::value::RawValue;

pub use close::{CloseCode, CloseReason};
pub use parse::{parse_client_frame, ClientFrame, ClientRequest, FrameError};

/// The subprotocol name.
pub const PROTOCOL: &str = "tether.v1";
/// Longest client correlation id (`id`), in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 128;
/// Default `limit` of `get_history` and the events API.
pub const DEFAULT_HISTORY_LIMIT: u32 = 100;
/// Largest `limit` of `get_history` and the events API.
pub const MAX_HISTORY_LIMIT: u32 = 1000;

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-29T16:20:01.123Z`.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

/// Now, as [`rfc3339_ms`].
pub fn now_rfc3339() -> String {
    rfc3339_ms(crate::ids::unix_ms())
}

/// `error` frame codes (PROTOCOL.md section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not JSON.
    InvalidJson,
    /// The frame is JSON but not a valid message.
    InvalidMessage,
    /// The `type` is not one the protocol knows.
    UnknownType,
    /// The frame names another thread than the connection's.
    ThreadMismatch,
    /// Over the message rate.
    RateLimited,
    /// No run with this id is active on this thread.
    UnknownRun,
    /// The server failed.
    Internal,
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary: how
/// every text the server echoes or logs from a client is cut.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A server frame's envelope. `data` is serialized once; callers pass any `Serialize`.
#[derive(Serialize)]
struct Envelope<'a, D: Serialize + ?Sized> {
    #[serde(rename = "type")]
    kind: &'a str,
    ts: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    thread_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    run_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reply_to: Option<&'a str>,
    data: &'a D,
}

/// The envelope fields of a server frame other than its type and data.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameMeta<'a> {
    /// The thread the frame belongs to.
    pub thread_id: Option<&'a str>,
    /// The run the frame belongs to.
    pub run_id: Option<&'a str>,
    /// The thread event's sequence number.
    pub seq: Option<u64>,
    /// The client `id` this frame answers.
    pub reply_to: Option<&'a str>,
    /// Unix ms of the frame; `None` means now.
    pub ts_ms: Option<u64>,
}

impl<'a> FrameMeta<'a> {
    /// The same meta with `reply_to` set.
    pub fn with_reply(mut self, reply_to: Option<&'a str>) -> Self {
        self.reply_to = reply_to;
        self
    }
}

/// Build one server frame as JSON text.
pub fn frame<D: Serialize + ?Sized>(kind: &str, meta: FrameMeta<'_>, data: &D) -> String {
    let ts = rfc3339_ms(meta.ts_ms.unwrap_or_else(crate::ids::unix_ms));
    frame_at(kind, meta, &ts, data)
}

/// [`frame`] with its time already formatted (`ts` as [`rfc3339_ms`] formats it; `meta.ts_ms`
/// is not read): the store's writer formats a batch's time once for all its frames.
pub fn frame_at<D: Serialize + ?Sized>(
    kind: &str,
    meta: FrameMeta<'_>,
    ts: &str,
    data: &D,
) -> String {
    let env = Envelope {
        kind,
        ts,
        thread_id: meta.thread_id,
        run_id: meta.run_id,
        seq: meta.seq,
        reply_to: meta.reply_to,
        data,
    };
    // Serializing our own structs and `Value`s cannot fail.
    serde_json::to_string(&env).unwrap_or_else(|_| String::from("{}"))
}

/// A thread event's frame serialized before its `seq` and time are known, so the escaping and
/// the serialization of `data` happen on the submitting task instead of the store's single
/// writer, which finishes it with a few appends ([`PreparedFrame::finish`]). Same bytes as
/// [`frame`].
#[derive(Debug, Clone)]
pub struct PreparedFrame {
    text: String,
    /// Where the time goes.
    ts_at: usize,
    /// Where `,"seq":N` goes.
    seq_at: usize,
}

impl PreparedFrame {
    /// Serialize `data` once, for a frame whose `seq` and `ts` are set at commit.
    #[expect(
        clippy::let_underscore_must_use,
        reason = "writing to a String cannot fail"
    )]
    pub fn new<D: Serialize + ?Sized>(
        kind: &str,
        thread_id: Option<&str>,
        run_id: Option<&str>,
        reply_to: Option<&str>,
        data: &D,
    ) -> Self {
        use std::fmt::Write as _;
        // Serializing strings and our own `Value`s cannot fail.
        let json = |v: &str| serde_json::to_string(v).unwrap_or_default();
        let mut text = String::with_capacity(256);
        let _ = write!(text, "{{\"type\":{},\"ts\":\"", json(kind));
        let ts_at = text.len();
        text.push('"');
        if let Some(t) = thread_id {
            let _ = write!(text, ",\"thread_id\":{}", json(t));
        }
        if let Some(r) = run_id {
            let _ = write!(text, ",\"run_id\":{}", json(r));
        }
        let seq_at = text.len();
        if let Some(r) = reply_to {
            let _ = write!(text, ",\"reply_to\":{}", json(r));
        }
        text.push_str(",\"data\":");
        text.push_str(&serde_json::to_string(data).unwrap_or_else(|_| "null".into()));
        text.push('}');
        Self {
            text,
            ts_at,
            seq_at,
        }
    }

    /// The frame with its `seq` and time (`ts` as [`rfc3339_ms`] formats it).
    #[expect(
        clippy::let_underscore_must_use,
        reason = "writing to a String cannot fail"
    )]
    pub fn finish(&self, seq: u64, ts: &str) -> String {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(self.text.len() + ts.len() + 28);
        out.push_str(&self.text[..self.ts_at]);
        out.push_str(ts);
        out.push_str(&self.text[self.ts_at..self.seq_at]);
        let _ = write!(out, ",\"seq\":{seq}");
        out.push_str(&self.text[self.seq_at..]);
        out
    }
}

/// The `data` of an `ack` (PROTOCOL.md): the stored message's id, its `seq` and the run it
/// started. Fields in the order `serde_json` gives a `json!` object (sorted, as long as its
/// `preserve_order` feature is off, as it is here), so the bytes are those of the earlier
/// `json!` form; the test below fails if either changes.
#[derive(Debug, Serialize)]
pub struct AckData<'a> {
    /// The stored user message's id.
    pub message_id: &'a str,
    /// The run the message started.
    pub run_id: &'a str,
    /// The `seq` of the `user_message` event.
    pub seq: u64,
}

/// An `error` frame.
pub fn error_frame(
    thread_id: &str,
    reply_to: Option<&str>,
    code: ErrorCode,
    message: &str,
) -> String {
    #[derive(Serialize)]
    struct D<'a> {
        code: ErrorCode,
        message: &'a str,
    }
    frame(
        "error",
        FrameMeta {
            thread_id: Some(thread_id),
            reply_to,
            ..Default::default()
        },
        &D { code, message },
    )
}

/// A `history` frame around already-serialized stored events.
pub fn history_frame(
    thread_id: &str,
    reply_to: Option<&str>,
    events: &[String],
    last_seq: u64,
) -> String {
    let raw: Vec<&RawValue> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<&RawValue>(e).ok())
        .collect();
    #[derive(Serialize)]
    struct D<'a> {
        events: Vec<&'a RawValue>,
        last_seq: u64,
    }
    frame(
        "history",
        FrameMeta {
            thread_id: Some(thread_id),
            reply_to,
            ..Default::default()
        },
        &D {
            events: raw,
            last_seq,
        },
    )
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn an_ack_built_at_a_batch_time_has_the_bytes_of_the_json_form() {
        let ms = 1_795_996_904_283;
        let meta = || FrameMeta {
            thread_id: Some("thread_x_1_2_ab"),
            seq: Some(41),
            reply_to: Some("c-1 \"q\""),
            ts_ms: Some(ms),
            ..Default::default()
        };
        let before = frame(
            "ack",
            meta(),
            &serde_json::json!({"message_id": "msg_1_2_ab", "seq": 41, "run_id": "run_x_1_2_cd"}),
        );
        let now = frame_at(
            "ack",
            meta(),
            &rfc3339_ms(ms),
            &AckData {
                message_id: "msg_1_2_ab",
                run_id: "run_x_1_2_cd",
                seq: 41,
            },
        );
        assert_eq!(now, before);
    }

    #[test]
    fn a_prepared_frame_finishes_to_the_same_bytes_as_frame() {
        let data = serde_json::json!({"content": "h\u{e9}llo \"q\" \\ \n", "n": 3});
        for (thread, run, reply) in [
            (
                Some("thread_x_1_2_ab"),
                Some("run_x_1_2_ab"),
                Some("c-1 \"odd\" \u{1F600}"),
            ),
            (Some("thread_x_1_2_ab"), None, None),
            (None, None, Some("r")),
        ] {
            let meta = FrameMeta {
                thread_id: thread,
                run_id: run,
                seq: Some(42),
                reply_to: reply,
                ts_ms: Some(1_764_450_000_123),
            };
            let want = frame("agent_thinking", meta, &data);
            let got = PreparedFrame::new("agent_thinking", thread, run, reply, &data)
                .finish(42, &rfc3339_ms(1_764_450_000_123));
            assert_eq!(got, want);
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_969_201_123), "2026-11-29T16:20:01.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn frames_carry_the_envelope() {
        let text = frame(
            "agent_thinking",
            FrameMeta {
                thread_id: Some("t"),
                run_id: Some("r"),
                seq: Some(3),
                reply_to: Some("c-1"),
                ts_ms: Some(0),
            },
            &serde_json::json!({"thought": "hm"}),
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "agent_thinking");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["reply_to"], "c-1");
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["data"]["thought"], "hm");
    }
}
