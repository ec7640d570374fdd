//! Client frames: one text frame in, a [`ClientRequest`] or a [`FrameError`] out.
//!
//! Never panics on hostile input: serde_json's recursion limit bounds nesting, the frame size
//! limit bounds everything else. The checks run in a fixed order (JSON, object, `id`, `type`,
//! `thread_id`, `data`, then the type's own fields), so a frame wrong in several ways always
//! gets the same answer, and every answer after the `id` echoes it.

use serde_json::{Map, Value};

use super::{truncate, ErrorCode, DEFAULT_HISTORY_LIMIT, MAX_CLIENT_ID_BYTES, MAX_HISTORY_LIMIT};

/// What a client frame asks for, after validation.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientRequest {
    /// `user_message`, `chat` or `start_agent`.
    UserMessage {
        /// The message text.
        content: String,
    },
    /// A `ping`: the server answers `pong`.
    Ping,
    /// A page of the thread's stored events.
    GetHistory {
        /// Events with a `seq` above this.
        since: u64,
        /// At most this many.
        limit: u32,
    },
    /// Cancel a run of this thread.
    CancelRun {
        /// The run to cancel.
        run_id: String,
    },
}

/// A parsed client frame: the request plus its envelope fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    /// The client's correlation id, echoed as `reply_to`.
    pub id: Option<String>,
    /// The thread the client names, if any.
    pub thread_id: Option<String>,
    /// What the client asks for.
    pub request: ClientRequest,
}

/// Why a client frame was refused. Carries the client `id` when one could be read, so the
/// `error` frame can echo it.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    /// The `error` frame's code.
    pub code: ErrorCode,
    /// What is wrong, for people.
    pub message: String,
    /// The client's correlation id, if it could be read.
    pub id: Option<String>,
}

impl FrameError {
    fn new(code: ErrorCode, message: impl Into<String>, id: Option<String>) -> Self {
        Self {
            code,
            message: message.into(),
            id,
        }
    }
}

/// Parse one client text frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| FrameError::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}"), None))?;
    let Value::Object(mut obj) = value else {
        return Err(FrameError::new(
            ErrorCode::InvalidMessage,
            "a frame must be a JSON object",
            None,
        ));
    };
    let id = client_id(obj.remove("id"))?;
    let invalid = |msg: &str| FrameError::new(ErrorCode::InvalidMessage, msg, id.clone());
    let kind = match obj.remove("type") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(invalid("type must be a string")),
        None => return Err(invalid("type is required")),
    };
    let thread_id = match obj.remove("thread_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(invalid("thread_id must be a string")),
    };
    let data = match obj.remove("data").or_else(|| obj.remove("payload")) {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(invalid("data must be an object")),
    };
    let request = match kind.as_str() {
        "user_message" | "chat" | "start_agent" => user_message(&kind, &data).map_err(invalid)?,
        "ping" => ClientRequest::Ping,
        "get_history" => get_history(&data).map_err(|m| invalid(&m))?,
        "cancel_run" => match data.get("run_id") {
            Some(Value::String(r)) if !r.is_empty() => {
                ClientRequest::CancelRun { run_id: r.clone() }
            }
            _ => return Err(invalid("data.run_id is required")),
        },
        other => {
            let shown = truncate(other, 64);
            return Err(FrameError::new(
                ErrorCode::UnknownType,
                format!("unknown type '{shown}'"),
                id,
            ));
        }
    };
    Ok(ClientFrame {
        id,
        thread_id,
        request,
    })
}

/// The envelope's `id`: absent, or a string of at most [`MAX_CLIENT_ID_BYTES`].
fn client_id(id: Option<Value>) -> Result<Option<String>, FrameError> {
    let message = match id {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_CLIENT_ID_BYTES => return Ok(Some(s)),
        Some(Value::String(_)) => format!("id is longer than {MAX_CLIENT_ID_BYTES} bytes"),
        Some(_) => "id must be a string".to_string(),
    };
    Err(FrameError::new(ErrorCode::InvalidMessage, message, None))
}

/// `user_message` and its synonyms: the text under the first of the type's keys present.
fn user_message(kind: &str, data: &Map<String, Value>) -> Result<ClientRequest, &'static str> {
    let keys: &[&str] = if kind == "start_agent" {
        &["user_request", "content", "message", "text"]
    } else {
        &["content", "message", "text"]
    };
    let content = keys
        .iter()
        .find_map(|k| data.get(*k))
        .ok_or("data.content is required")?;
    let Value::String(content) = content else {
        return Err("data.content must be a string");
    };
    if content.trim().is_empty() {
        return Err("data.content must not be empty");
    }
    Ok(ClientRequest::UserMessage {
        content: content.clone(),
    })
}

/// `get_history`: `since` (default 0) and `limit` (default and bounds from the protocol).
fn get_history(data: &Map<String, Value>) -> Result<ClientRequest, String> {
    let since = match data.get("since") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .ok_or("data.since must be a non-negative integer")?,
    };
    let limit = match data.get("limit") {
        None | Some(Value::Null) => DEFAULT_HISTORY_LIMIT,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=u64::from(MAX_HISTORY_LIMIT)).contains(&n) => n as u32,
            _ => {
                return Err(format!(
                    "data.limit must be an integer from 1 to {MAX_HISTORY_LIMIT}"
                ))
            }
        },
    };
    Ok(ClientRequest::GetHistory { since, limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_message_and_synonyms_parse() {
        let f = parse_client_frame(
            r#"{"type":"user_message","id":"c-1","thread_id":"t","data":{"content":"hi"}}"#,
        )
        .unwrap();
        assert_eq!(f.id.as_deref(), Some("c-1"));
        assert_eq!(f.thread_id.as_deref(), Some("t"));
        assert_eq!(
            f.request,
            ClientRequest::UserMessage {
                content: "hi".into()
            }
        );
        for text in [
            r#"{"type":"chat","payload":{"message":"hi"}}"#,
            r#"{"type":"user_message","data":{"text":"hi"}}"#,
            r#"{"type":"start_agent","data":{"user_request":"hi"}}"#,
        ] {
            assert_eq!(
                parse_client_frame(text).unwrap().request,
                ClientRequest::UserMessage {
                    content: "hi".into()
                }
            );
        }
    }

    #[test]
    fn bad_frames_get_the_documented_codes() {
        let code = |t: &str| parse_client_frame(t).unwrap_err().code;
        assert_eq!(code("{"), ErrorCode::InvalidJson);
        assert_eq!(code("[1]"), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"id":"x"}"#), ErrorCode::InvalidMessage);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::InvalidMessage);
        assert_eq!(
            code(r#"{"type":"user_message","data":{}}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            code(r#"{"type":"user_message","data":{"content":7}}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            code(r#"{"type":"get_history","data":{"limit":1001}}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            code(r#"{"type":"get_history","data":{"since":-1}}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(
            code(r#"{"type":"cancel_run","data":{}}"#),
            ErrorCode::InvalidMessage
        );
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        let long_id = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(129));
        assert_eq!(code(&long_id), ErrorCode::InvalidMessage);
        // The id is echoed when it could be read.
        let e = parse_client_frame(r#"{"type":"dance","id":"c-9"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("c-9"));
    }

    #[test]
    fn json_bombs_are_refused_without_panicking() {
        let deep = "[".repeat(100_000);
        assert_eq!(
            parse_client_frame(&deep).unwrap_err().code,
            ErrorCode::InvalidJson
        );
        let deep_obj = format!("{}{}", r#"{"a":"#.repeat(10_000), "}".repeat(10_000));
        assert!(parse_client_frame(&deep_obj).is_err());
        let huge_num = format!(
            r#"{{"type":"get_history","data":{{"since":1{}}}}}"#,
            "0".repeat(5000)
        );
        assert!(parse_client_frame(&huge_num).is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_client_frame_never_panics(s in "\\PC{0,200}") {
            let _any_outcome = parse_client_frame(&s);
        }

        #[test]
        fn parse_client_frame_never_panics_on_envelope_shapes(
            kind in "(user_message|ping|get_history|cancel_run|chat|x)",
            key in "(content|since|limit|run_id|message)",
            val in "(\"[a-z]{0,5}\"|-?[0-9]{1,25}|null|true|\\[\\]|\\{\\}|1e999)",
        ) {
            let text = format!(r#"{{"type":"{kind}","id":"c","data":{{"{key}":{val}}}}}"#);
            let _any_outcome = parse_client_frame(&text);
        }
    }
}
