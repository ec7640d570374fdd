//! [`DemoAgent`]: the built-in agent. It is a demo and says so: no model, it counts the words of
//! the message with a real (small) tool and echoes the text.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{Agent, AgentError, EventSink, RunInput};

/// The built-in demo agent. Not an AI: it says so, runs a real word-count tool on the message
/// and echoes it. `delay` paces its steps so a person can watch them (0 for benchmarks).
pub struct DemoAgent {
    /// Pause between the demo's steps (`TETHER_AGENT_DELAY_MS`).
    pub delay: Duration,
}

impl DemoAgent {
    async fn pace(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

/// The demo agent's tool: words and characters of a text.
pub(crate) fn word_count(text: &str) -> Value {
    json!({ "words": text.split_whitespace().count(), "characters": text.chars().count() })
}

/// The demo agent's reply to `content`, given its word count (`word_count`'s output).
pub(crate) fn demo_reply(content: &str, count: &Value) -> String {
    let words = count["words"].as_u64().unwrap_or(0);
    let chars = count["characters"].as_u64().unwrap_or(0);
    format!(
        "(demo agent) You said: \"{content}\" ({words} word{}, {chars} character{}). I am a demo without a model; connect a real agent to get real answers.",
        if words == 1 { "" } else { "s" },
        if chars == 1 { "" } else { "s" },
    )
}

/// `text` cut in two at its middle character (the demo's two text deltas).
pub(crate) fn halves(text: &str) -> (&str, &str) {
    let cut = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map_or(text.len(), |(i, _)| i);
    text.split_at(cut)
}

#[async_trait]
impl Agent for DemoAgent {
    fn name(&self) -> &str {
        "demo"
    }

    async fn run(&self, input: &RunInput, sink: &mut EventSink) -> Result<String, AgentError> {
        self.pace().await;
        sink.thinking("I am Tether's built-in demo agent, not an AI model: I will count the words of your message and echo it.")
            .await?;
        self.pace().await;
        let started = Instant::now();
        let call = sink
            .tool_executing("word_count", json!({ "text": input.content }))
            .await?;
        let output = word_count(&input.content);
        self.pace().await;
        sink.tool_completed("word_count", &call, output.clone(), started.elapsed())
            .await?;
        let reply = demo_reply(&input.content, &output);
        // Stream the reply in two pieces, as a real agent would token by token.
        let (first, second) = halves(&reply);
        sink.text_delta(first).await?;
        self.pace().await;
        sink.text_delta(second).await?;
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_count_counts_words_and_characters() {
        assert_eq!(
            word_count("hello  wide world"),
            json!({"words": 3, "characters": 17})
        );
        assert_eq!(word_count(""), json!({"words": 0, "characters": 0}));
        assert_eq!(word_count("héllo"), json!({"words": 1, "characters": 5}));
    }
}
