//! Property-based fuzzing of the parsers that see hostile input first: the envelope parser
//! ([`protocol::parse_client_frame`]), the id parser ([`ids::parse`]), user ids and tokens.
//!
//! Structured generators (nested JSON values, envelopes near and inside the protocol's rules,
//! id-shaped strings, mutations of valid frames) reach far deeper than random text. Case counts
//! are fixed so the whole file runs in a few seconds in CI; `PROPTEST_CASES` does not raise them.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tether::ids;
use tether::protocol::{
    parse_client_frame, ClientFrame, ClientRequest, ErrorCode, DEFAULT_HISTORY_LIMIT,
    MAX_CLIENT_ID_BYTES, MAX_HISTORY_LIMIT,
};
use tether::testing::validate_user_id;
use tether::Auth;
use tether::Secret;

// ---------------------------------------------------------------------------------------------
// Generators.

/// Strings of every kind: printable Unicode, control characters and JSON's escapes, ASCII.
fn any_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,24}",
        "[\\x00-\\x1f\"\\\\/]{0,8}",
        "[ -~]{0,24}",
        ".{0,8}",
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        any_string().prop_map(Value::String),
    ]
}

/// Keys the parser looks for, and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "type",
            "id",
            "thread_id",
            "data",
            "payload",
            "content",
            "message",
            "text",
            "user_request",
            "since",
            "limit",
            "run_id",
        ])
        .prop_map(String::from),
        "\\PC{0,10}",
    ]
}

/// Any JSON value, nested up to 6 levels.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn kind() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "user_message",
            "chat",
            "start_agent",
            "ping",
            "get_history",
            "cancel_run",
        ])
        .prop_map(String::from),
        1 => "\\PC{0,16}",
    ]
}

/// Client ids around the 128-byte limit: ASCII (exact byte lengths) and multi-byte.
fn client_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,140}",
        "\\PC{0,50}",
        (0usize..=70, "\\PC").prop_map(|(n, c)| c.repeat(n)),
    ]
}

/// Values a data field may hold: the right types, the wrong ones, and edge numbers.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        json_leaf(),
        prop::sample::select(vec![
            json!(0),
            json!(1),
            json!(-1),
            json!(1000),
            json!(1001),
            json!(u64::MAX),
            json!(4_294_967_297u64),
            json!(1.5),
            json!(""),
            json!("   "),
            json!("\u{3000}"),
        ]),
        json_value(),
    ]
}

fn data_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(key(), field_value(), 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// An envelope that may break any rule: every field optional and of any type.
fn envelope() -> impl Strategy<Value = Value> {
    // Mostly near the rules, so the checks past the envelope are reached too.
    (
        prop::option::weighted(
            0.95,
            prop_oneof![9 => kind().prop_map(Value::String), 1 => json_leaf()],
        ),
        prop::option::weighted(
            0.7,
            prop_oneof![9 => client_id().prop_map(Value::String), 1 => json_leaf()],
        ),
        prop::option::weighted(
            0.4,
            prop_oneof![9 => id_like().prop_map(Value::String), 1 => json_leaf()],
        ),
        prop::option::weighted(0.8, prop_oneof![5 => data_object(), 1 => json_value()]),
        any::<bool>(),
        prop::collection::btree_map("\\PC{0,8}", json_leaf(), 0..3),
    )
        .prop_map(|(kind, id, thread_id, data, use_payload, extra)| {
            let mut m: Map<String, Value> = extra.into_iter().collect();
            for (k, v) in [("type", kind), ("id", id), ("thread_id", thread_id)] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            if let Some(d) = data {
                m.insert(if use_payload { "payload" } else { "data" }.into(), d);
            }
            Value::Object(m)
        })
}

/// Content that is not blank.
fn content() -> impl Strategy<Value = String> {
    ".{0,30}\\S.{0,30}"
}

/// A frame that follows every rule of PROTOCOL.md sections 2 and 3, with the `ClientFrame` it
/// must parse to.
fn valid_frame() -> impl Strategy<Value = (Value, ClientFrame)> {
    let request = prop_oneof![
        (
            prop::sample::select(vec!["user_message", "chat"]),
            prop::sample::select(vec!["content", "message", "text"]),
            content(),
        )
            .prop_map(|(kind, key, c)| {
                (
                    kind,
                    json!({ key: c }),
                    ClientRequest::UserMessage { content: c },
                )
            }),
        (
            prop::sample::select(vec!["user_request", "content", "message", "text"]),
            content(),
        )
            .prop_map(|(key, c)| {
                (
                    "start_agent",
                    json!({ key: c }),
                    ClientRequest::UserMessage { content: c },
                )
            }),
        Just(("ping", json!({}), ClientRequest::Ping)),
        (
            prop::option::of(any::<u64>()),
            prop::option::of(1..=MAX_HISTORY_LIMIT),
        )
            .prop_map(|(since, limit)| {
                let mut d = Map::new();
                if let Some(s) = since {
                    d.insert("since".into(), json!(s));
                }
                if let Some(l) = limit {
                    d.insert("limit".into(), json!(l));
                }
                (
                    "get_history",
                    Value::Object(d),
                    ClientRequest::GetHistory {
                        since: since.unwrap_or(0),
                        limit: limit.unwrap_or(DEFAULT_HISTORY_LIMIT),
                    },
                )
            }),
        ".{1,80}".prop_map(|r| {
            (
                "cancel_run",
                json!({ "run_id": r }),
                ClientRequest::CancelRun { run_id: r },
            )
        }),
    ];
    (
        request,
        prop::option::of(
            client_id().prop_filter("at most 128 bytes", |s| s.len() <= MAX_CLIENT_ID_BYTES),
        ),
        prop::option::of(prop_oneof![id_like(), any_string()]),
        any::<bool>(),
        // Unknown fields are ignored, in the envelope and in data.
        prop::collection::btree_map("x_[a-z]{1,6}", json_value(), 0..3),
        prop::collection::btree_map("x_[a-z]{1,6}", json_leaf(), 0..3),
    )
        .prop_map(
            |((kind, data, request), id, thread_id, use_payload, extra, data_extra)| {
                let mut data = data.as_object().cloned().unwrap_or_default();
                data.extend(data_extra);
                let mut m: Map<String, Value> = extra.into_iter().collect();
                m.insert("type".into(), json!(kind));
                if let Some(id) = &id {
                    m.insert("id".into(), json!(id));
                }
                if let Some(t) = &thread_id {
                    m.insert("thread_id".into(), json!(t));
                }
                let data_key = if use_payload { "payload" } else { "data" };
                m.insert(data_key.into(), Value::Object(data));
                let expected = ClientFrame {
                    id,
                    thread_id,
                    request,
                };
                (Value::Object(m), expected)
            },
        )
}

/// Strings shaped like ids: right and wrong prefixes, operations, digits and hex, at and around
/// the 256-byte limit.
fn id_like() -> impl Strategy<Value = String> {
    prop_oneof![near_id(), id_parts()]
}

/// `prefix_[operation_]ms_counter_hex8` with each part usually right and sometimes not.
fn near_id() -> impl Strategy<Value = String> {
    let prefix = prop_oneof![
        9 => prop::sample::select(vec!["thread", "run", "req", "conn", "msg", "call"]),
        1 => prop::sample::select(vec!["", "Thread", "th", "x", "conn_"]),
    ];
    let op = prop_oneof![
        3 => Just(String::new()),
        5 => "[a-z0-9_]{1,30}",
        1 => "[A-Za-z_\\-é]{1,10}",
        1 => (200usize..=260).prop_map(|n| "o".repeat(n)),
    ];
    let digits = prop_oneof![8 => "[0-9]{1,20}", 1 => "[0-9]{21,25}", 1 => "[0-9a-z]{0,3}"];
    let hex = prop_oneof![
        6 => "[0-9a-f]{8}",
        1 => "[0-9a-fA-F]{7,9}",
        1 => "\\PC{0,8}",
    ];
    (prefix, op, digits.clone(), digits, hex).prop_map(|(prefix, op, ms, counter, hex)| {
        let op = if op.is_empty() { op } else { format!("{op}_") };
        format!("{prefix}_{op}{ms}_{counter}_{hex}")
    })
}

/// Id-ish fragments joined by underscores.
fn id_parts() -> impl Strategy<Value = String> {
    let prefix = prop_oneof![
        prop::sample::select(vec!["thread", "run", "req", "conn", "msg", "call"])
            .prop_map(String::from),
        "[a-zA-Z]{0,7}",
    ];
    let part = prop_oneof![
        "[a-z_]{0,24}",
        "[0-9]{0,24}",
        "[0-9a-fA-F]{0,10}",
        "\\PC{0,6}",
        (0usize..=260).prop_map(|n| "o".repeat(n)),
    ];
    (prefix, prop::collection::vec(part, 0..6), "[_]{1,2}").prop_map(|(p, parts, sep)| {
        let mut s = p;
        for part in parts {
            s.push_str(&sep);
            s.push_str(&part);
        }
        s
    })
}

/// Operations the id generators accept (what `ids::parse` allows in that position).
fn operation() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![ids::OP_WEBSOCKET_SESSION, ids::OP_AGENT_RUN])
            .prop_map(String::from),
        "[a-z0-9_]{1,40}",
        "[a-z]{150,180}",
    ]
}

/// A character-level edit of a text: delete, insert or replace at a position.
fn mutate(text: &str, edits: &[(usize, u8, char)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for &(at, op, c) in edits {
        let i = if chars.is_empty() {
            0
        } else {
            at % (chars.len() + 1)
        };
        match op % 3 {
            0 if i < chars.len() => {
                chars.remove(i);
            }
            1 => chars.insert(i, c),
            _ if i < chars.len() => chars[i] = c,
            _ => chars.push(c),
        }
    }
    chars.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Envelope parser.

/// What must hold for the answer to any text: `invalid_json` exactly when the text is not JSON,
/// only the documented codes, and an echoed id is the client's own, within the limit.
fn check_answer(text: &str) -> Result<(), TestCaseError> {
    let answer = parse_client_frame(text);
    let value: Result<Value, _> = serde_json::from_str(text);
    let is_json = value.is_ok();
    match &answer {
        Err(e) => {
            prop_assert_eq!(e.code == ErrorCode::InvalidJson, !is_json, "{:?}", e);
            prop_assert!(
                matches!(
                    e.code,
                    ErrorCode::InvalidJson | ErrorCode::InvalidMessage | ErrorCode::UnknownType
                ),
                "{:?}",
                e
            );
            prop_assert!(!e.message.is_empty());
        }
        Ok(_) => prop_assert!(is_json),
    }
    let Ok(Value::Object(obj)) = value else {
        return Ok(());
    };
    let echoed = match &answer {
        Ok(f) => f.id.as_deref(),
        Err(e) => e.id.as_deref(),
    };
    match obj.get("id") {
        Some(Value::String(id)) if id.len() <= MAX_CLIENT_ID_BYTES => {
            prop_assert_eq!(echoed, Some(id.as_str()));
        }
        // Too long, or not a string: refused before anything else, and not echoed.
        Some(
            Value::String(_)
            | Value::Bool(_)
            | Value::Number(_)
            | Value::Array(_)
            | Value::Object(_),
        ) => {
            prop_assert_eq!(echoed, None);
            prop_assert_eq!(
                answer.as_ref().map_err(|e| e.code),
                Err(ErrorCode::InvalidMessage)
            );
        }
        None | Some(Value::Null) => prop_assert_eq!(echoed, None),
    }
    if let Ok(f) = &answer {
        let kind = obj.get("type").and_then(Value::as_str).unwrap_or_default();
        let expected_kind = match f.request {
            ClientRequest::UserMessage { .. } => {
                matches!(kind, "user_message" | "chat" | "start_agent")
            }
            ClientRequest::Ping => kind == "ping",
            ClientRequest::GetHistory { limit, .. } => {
                kind == "get_history" && (1..=MAX_HISTORY_LIMIT).contains(&limit)
            }
            ClientRequest::CancelRun { ref run_id } => kind == "cancel_run" && !run_id.is_empty(),
        };
        prop_assert!(expected_kind, "{:?} from type {:?}", f.request, kind);
        if let ClientRequest::UserMessage { content } = &f.request {
            prop_assert!(!content.trim().is_empty());
        }
        prop_assert_eq!(
            f.thread_id.as_deref(),
            obj.get("thread_id").and_then(Value::as_str)
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_json_value_gets_a_documented_answer(v in json_value()) {
        check_answer(&v.to_string())?;
    }

    #[test]
    fn any_envelope_gets_a_documented_answer(v in envelope()) {
        check_answer(&v.to_string())?;
        check_answer(&serde_json::to_string_pretty(&v).unwrap())?;
    }

    #[test]
    fn an_unknown_type_in_a_well_formed_envelope_is_unknown_type(
        kind in "\\PC{0,20}",
        id in prop::option::of("[ -~]{0,128}"),
    ) {
        prop_assume!(!matches!(
            kind.as_str(),
            "user_message" | "chat" | "start_agent" | "ping" | "get_history" | "cancel_run"
        ));
        let e = parse_client_frame(&json!({"type": kind, "id": id}).to_string()).unwrap_err();
        prop_assert_eq!(e.code, ErrorCode::UnknownType);
        prop_assert_eq!(e.id, id);
        prop_assert!(e.message.len() < 100, "the echoed type is truncated: {}", e.message);
    }

    #[test]
    fn every_frame_that_follows_the_rules_parses_to_what_it_says((v, expected) in valid_frame()) {
        prop_assert_eq!(parse_client_frame(&v.to_string()), Ok(expected));
    }

    #[test]
    fn mutated_frames_never_panic_and_get_a_documented_answer(
        (v, _) in valid_frame(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<char>()), 1..6),
    ) {
        check_answer(&mutate(&v.to_string(), &edits))?;
    }

    #[test]
    fn nesting_is_parsed_to_a_sane_depth_and_refused_beyond(depth in 0usize..400, objects: bool) {
        let (open, close) = if objects { (r#"{"a":"#, "}") } else { ("[", "]") };
        let text = format!(
            r#"{{"type":"ping","id":"n","data":{{"x":{}0{}}}}}"#,
            open.repeat(depth),
            close.repeat(depth)
        );
        let answer = parse_client_frame(&text);
        if depth <= 100 {
            prop_assert_eq!(answer.map(|f| f.request), Ok(ClientRequest::Ping));
        } else if depth >= 200 {
            prop_assert_eq!(answer.map_err(|e| e.code), Err(ErrorCode::InvalidJson));
        }
        check_answer(&text)?;
        // Unbalanced: only openers.
        check_answer(&open.repeat(depth))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Ids.

/// The invariants of a successful parse: the parts re-assemble the input exactly.
fn check_parsed(s: &str) -> Result<(), TestCaseError> {
    let Ok(p) = ids::parse(s) else {
        return Ok(());
    };
    prop_assert!(s.len() <= ids::MAX_ID_BYTES);
    prop_assert_eq!(format!("{}_{}", p.prefix, p.root), s);
    prop_assert!(["thread", "run", "req", "conn", "msg", "call"].contains(&p.prefix));
    prop_assert_eq!(
        p.operation.is_empty(),
        ["conn", "msg", "call"].contains(&p.prefix)
    );
    prop_assert_eq!(p.hex.len(), 8);
    prop_assert!(p
        .hex
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    let hex_tail = format!("_{}", p.hex);
    prop_assert!(p.root.ends_with(&hex_tail));
    if !p.operation.is_empty() {
        let op_prefix = format!("{}_", p.operation);
        prop_assert!(p.root.starts_with(&op_prefix));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ids_parse_accepts_every_id_the_generators_mint(op in operation()) {
        let (thread, run, req) = ids::generate_user_context_ids(&op);
        let (t, r, q) = (
            ids::parse(&thread).unwrap(),
            ids::parse(&run).unwrap(),
            ids::parse(&req).unwrap(),
        );
        prop_assert_eq!((t.prefix, r.prefix, q.prefix), ("thread", "run", "req"));
        prop_assert_eq!((t.operation, r.operation, q.operation), (op.as_str(), op.as_str(), op.as_str()));
        // The thread and its root run share one root; the request id has its own.
        prop_assert_eq!(t.root, r.root);
        prop_assert_ne!(t.root, q.root);
        prop_assert!(ids::ids_consistent(&thread, &run));
        prop_assert!(!ids::ids_consistent(&run, &thread));
        prop_assert_eq!(ids::root_run_id(&thread), Some(run.clone()));
        prop_assert!(t.unix_ms > 1_600_000_000_000);
        for id in [&thread, &run, &req] {
            check_parsed(id)?;
        }

        let child = ids::run_id(&op);
        let p = ids::parse(&child).unwrap();
        prop_assert_eq!((p.prefix, p.operation), ("run", op.as_str()));
        prop_assert!(!ids::ids_consistent(&thread, &child), "a child run has a fresh root");
        let req2 = ids::request_id(&op);
        let p = ids::parse(&req2).unwrap();
        prop_assert_eq!((p.prefix, p.operation), ("req", op.as_str()));

        for (id, prefix) in [
            (ids::connection_id(), "conn"),
            (ids::message_id(), "msg"),
            (ids::tool_call_id(), "call"),
        ] {
            let p = ids::parse(&id).unwrap();
            prop_assert_eq!((p.prefix, p.operation), (prefix, ""));
            check_parsed(&id)?;
        }
    }

    #[test]
    fn ids_parse_never_panics_and_what_it_accepts_reassembles(s in id_like()) {
        check_parsed(&s)?;
        if s.len() > ids::MAX_ID_BYTES {
            prop_assert_eq!(ids::parse(&s).map(|_| ()), Err(ids::IdError::TooLong));
        }
    }

    #[test]
    fn mutated_ids_never_panic(
        op in operation(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<char>()), 1..4),
    ) {
        let (thread, run, _) = ids::generate_user_context_ids(&op);
        let m = mutate(&thread, &edits);
        check_parsed(&m)?;
        // A consistent pair is still one root after any edit that keeps both well formed.
        if ids::ids_consistent(&m, &run) {
            prop_assert_eq!(ids::parse(&m).unwrap().root, ids::parse(&run).unwrap().root);
        }
    }

    #[test]
    fn ids_at_the_size_limit_parse_and_one_byte_more_does_not(pad in 0usize..=300) {
        let tail = "_1_1_0123abcd";
        let id = format!("thread_{}{tail}", "o".repeat(pad + 1));
        let parsed = ids::parse(&id);
        if id.len() <= ids::MAX_ID_BYTES {
            prop_assert!(parsed.is_ok(), "{} bytes", id.len());
            check_parsed(&id)?;
        } else {
            prop_assert_eq!(parsed.map(|_| ()), Err(ids::IdError::TooLong));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// User ids and tokens.

fn auth() -> Auth {
    Auth::hs256(&Secret::new("fuzz-secret-0123456789abcdef0123456789"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn user_ids_are_checked_by_bytes_and_characters(
        s in prop_oneof!["\\PC{0,80}", ".{0,8}", (0usize..=70, "\\PC").prop_map(|(n, c)| c.repeat(n))],
    ) {
        let well_formed =
            !s.trim().is_empty() && s.len() <= 256 && !s.chars().any(char::is_control);
        // Placeholders ("null", "undefined", "changeme", ...) are refused too: all short ASCII.
        let placeholder_like = s.trim().is_ascii() && s.trim().len() <= 11;
        match validate_user_id(&s) {
            Ok(()) => prop_assert!(well_formed, "{:?} accepted", s),
            Err(_) => prop_assert!(!well_formed || placeholder_like, "{:?} refused", s),
        }
    }

    #[test]
    fn minted_tokens_round_trip_any_valid_user_id(sub in prop_oneof!["\\PC{1,64}", (1usize..=64, "\\PC").prop_map(|(n, c)| c.repeat(n))]) {
        prop_assume!(validate_user_id(&sub).is_ok());
        let a = auth();
        let token = a.mint(&sub, Duration::from_secs(60)).unwrap();
        prop_assert_eq!(a.verify(&token), Ok(sub));
    }

    #[test]
    fn token_verification_never_panics(
        parts in prop::collection::vec(prop_oneof!["[A-Za-z0-9_-]{0,40}", "\\PC{0,20}"], 0..5),
        claims in json_value(),
        header in json_value(),
    ) {
        let a = auth();
        // Any verdict will do: the property is that there is one.
        a.verify(&parts.join(".")).ok();
        let b64 = |v: &Value| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        // Structured: JSON header and claims of any shape, with and without a signature.
        for sig in ["", "c2ln", "not base64!"] {
            let token = format!("{}.{}.{sig}", b64(&header), b64(&claims));
            prop_assert!(a.verify(&token).is_err());
        }
    }
}
