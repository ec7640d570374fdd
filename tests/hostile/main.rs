//! Hostile input (issue 4): every attack gets the answer PROTOCOL.md documents, never a panic,
//! and another user's connection on the same server keeps working.
//!
//! Malformed WebSocket frames cannot be sent with a well-behaved client library, so those tests
//! speak raw TCP ([`common::raw`]): a hand-written upgrade request, then hand-built (masked,
//! unless the attack is "unmasked") frames, then read frames until the server's close frame.
//! Every wait is bounded.
//!
//! Each test starts its own server with a bystander (`bob`) connected before the attack, and
//! ends with [`Scene::others_unaffected`]: no panic anywhere in the server, bob still gets a
//! `pong`, and a fresh user completes a whole chat run.
//!
//! One file per kind of attack; where PROTOCOL.md is silent, each says which answers its tests
//! pin down.

#[path = "../common/mod.rs"]
mod common;

mod frames;
mod http;
mod ids;
mod json;
mod query;
mod tokens;

use std::sync::{Mutex, Once};

use common::*;
use serde_json::Value;
use tether::client::Client;

// ---------------------------------------------------------------------------------------------
// Panic watch: the server runs in this process, so a panic in any of its tasks (which tokio
// would swallow) is recorded here. Panics located in `tests/` are the tests' own assertions.

static SERVER_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

fn watch_panics() {
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_tests = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/") || l.file().starts_with("tests\\"));
            if !in_tests {
                SERVER_PANICS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(info.to_string());
            }
            previous(info);
        }));
    });
}

fn assert_no_server_panic() {
    let panics = SERVER_PANICS.lock().unwrap_or_else(|e| e.into_inner());
    assert!(panics.is_empty(), "the server panicked: {panics:#?}");
}

// ---------------------------------------------------------------------------------------------
// A server with a bystander.

struct Scene {
    app: TestApp,
    bob: Client,
}

async fn scene() -> Scene {
    scene_with(|_| {}).await
}

async fn scene_with(f: impl FnOnce(&mut tether::Config)) -> Scene {
    watch_panics();
    let app = spawn_with(f).await;
    let (bob, _) = app.connect("bob").await;
    Scene { app, bob }
}

impl Scene {
    /// Wait until only the bystander is connected: the attacker's slot was released.
    async fn attacker_released(&self) {
        self.app
            .wait_stats("the attacker's connection to be released", |s| {
                s["connections"] == 1
            })
            .await;
    }

    /// No panic, the bystander still answered, and a new user completes a chat run.
    async fn others_unaffected(&mut self) {
        assert_no_server_panic();
        ping_pong(&mut self.bob, "bob-after-attack").await;
        let (mut carol, _) = self.app.connect("carol").await;
        let frames = chat(&mut carol, "carol-1", "hello after the attack").await;
        assert_eq!(frames.last().unwrap()["type"], "agent_completed");
        carol.close().await.unwrap();
        assert_no_server_panic();
    }

    /// The end of an attack by one connection: [`Self::attacker_released`], then
    /// [`Self::others_unaffected`].
    async fn attack_over(mut self) {
        self.attacker_released().await;
        self.others_unaffected().await;
    }
}

/// The next JSON frame must be an `error` with `code`; returns it.
async fn expect_error(c: &mut Client, code: &str) -> Value {
    let f = c.next_json(T).await.expect("an error frame");
    assert_eq!(f["type"], "error", "{f}");
    assert_eq!(f["data"]["code"], code, "{f}");
    f
}
