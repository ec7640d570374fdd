//! Tokens: forged, expired and tampered ones, and a valid one for another user's thread.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tether::client::ConnectOptions;

use crate::common::*;
use crate::scene;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

pub(crate) fn now_s() -> u64 {
    tether::ids::unix_ms() / 1000
}

/// A token with `claims`, signed with `alg` and `key`.
pub(crate) fn sign(alg: Algorithm, key: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(key)).unwrap()
}

pub(crate) fn secret(app: &TestApp) -> Vec<u8> {
    app.config
        .auth
        .jwt_secret
        .as_ref()
        .unwrap()
        .expose()
        .as_bytes()
        .to_vec()
}

#[tokio::test]
async fn forged_expired_and_tampered_tokens_get_401() {
    let mut s = scene().await;
    let key = secret(&s.app);
    let exp = now_s() + 600;
    let valid = s.app.token("alice");
    let parts: Vec<&str> = valid.split('.').collect();
    let forged: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&format!(r#"{{"sub":"alice","exp":{exp}}}"#))
            ),
        ),
        (
            "alg none with the original signature",
            format!(
                "{}.{}.{}",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                parts[1],
                parts[2]
            ),
        ),
        (
            "wrong key",
            sign(
                Algorithm::HS256,
                b"another-secret-another-secret-xx",
                &json!({"sub": "alice", "exp": exp}),
            ),
        ),
        (
            "right key, another algorithm (HS512)",
            sign(Algorithm::HS512, &key, &json!({"sub": "alice", "exp": exp})),
        ),
        (
            "expired",
            sign(
                Algorithm::HS256,
                &key,
                &json!({"sub": "alice", "exp": now_s() - 5}),
            ),
        ),
        (
            "no exp",
            sign(Algorithm::HS256, &key, &json!({"sub": "alice"})),
        ),
        (
            "tampered sub",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(&format!(r#"{{"sub":"mallory","exp":{exp}}}"#)),
                parts[2]
            ),
        ),
        ("truncated signature", valid[..valid.len() - 4].to_string()),
        ("garbage", "a.b.c".to_string()),
    ];
    for (what, token) in forged {
        for opts in [query_token(token.clone()), bearer(token.clone())] {
            let (status, body) = s.app.refused(opts).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{what}"
            );
        }
    }
    // The untouched token works: the test can tell the difference.
    let (_alice, est) = s.app.connect_opts(query_token(valid)).await;
    assert_eq!(est["data"]["user_id"], "alice");
    s.others_unaffected().await;
}

#[tokio::test]
async fn a_valid_token_for_another_users_thread_gets_403_forbidden_thread() {
    let mut s = scene().await;
    let (mut alice, est) = s.app.connect("alice").await;
    let thread = est["data"]["thread_id"].as_str().unwrap().to_string();
    chat(&mut alice, "a-1", "private words").await;
    let opts = ConnectOptions {
        thread_id: Some(thread.clone()),
        since: Some(0),
        ..query_token(s.app.token("mallory"))
    };
    let (status, body) = s.app.refused(opts).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden_thread"))
    );
    assert!(!body.to_string().contains("private"), "{body}");
    // The events API gives the same answer.
    let resp = get(
        &s.app.http(&format!("/api/threads/{thread}/events")),
        &s.app.token("mallory"),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 403);
    // Alice is unaffected.
    ping_pong(&mut alice, "alice-ok").await;
    s.others_unaffected().await;
}
