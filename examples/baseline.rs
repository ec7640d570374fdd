//! The baseline for BENCHMARKS.md: a bare axum WebSocket server that speaks the same frames as
//! Tether and nothing else.
//!
//! For every `user_message` it answers with the same eight frames as Tether (`ack`,
//! `agent_started`, `agent_thinking`, `tool_executing`, `tool_completed`, two
//! `agent_text_delta`, `agent_completed`), the same JSON shape (`seq`, `reply_to`, `run_id`,
//! `thread_id`) built by the same functions, with a per-connection `seq` counter, and with the
//! same WebSocket settings (no write buffer; a 4 KiB read buffer by default, `--read-buffer` to
//! match `TETHER_WS_READ_BUFFER_BYTES`). There is no context, registry, store, broker or agent,
//! and no authentication: any token is accepted and ignored. The difference between the two
//! servers under `tether-bench` is what Tether's machinery costs.
//!
//! ```sh
//! cargo run --release --example baseline -- --listen 127.0.0.1:9201   # or BASELINE_LISTEN
//! ```

use std::net::SocketAddr;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use axum::Router;
use futures_util::SinkExt as _;
use serde_json::json;
use tether::protocol::{self, ClientRequest, FrameMeta};

/// Frames and messages larger than this are refused, as Tether's default.
const MAX_MESSAGE_BYTES: usize = 65_536;

struct Options {
    listen: SocketAddr,
    /// TCP_NODELAY on accepted sockets: on by default, as Tether's accept loop sets it; off
    /// (`--nagle`) shows what Nagle's algorithm against delayed ACKs costs (~40 ms per reply).
    nodelay: bool,
    /// WebSocket read buffer per connection: 4 KiB by default (Tether's setting until
    /// `f2adf1f`; it now defaults to 256 bytes, `TETHER_WS_READ_BUFFER_BYTES`).
    read_buffer: usize,
}

fn options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut value = std::env::var("BASELINE_LISTEN").ok();
    let mut nodelay = std::env::var("BASELINE_NODELAY").map_or(true, |v| v != "0" && v != "false");
    let mut read_buffer = std::env::var("BASELINE_READ_BUFFER").ok();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => value = args.next(),
            s if s.starts_with("--listen=") => value = Some(s["--listen=".len()..].to_string()),
            "--nodelay" => nodelay = true,
            "--nagle" => nodelay = false,
            "--read-buffer" => read_buffer = args.next(),
            "-h" | "--help" => {
                println!(
                    "baseline [--listen ADDR] [--nagle] [--read-buffer BYTES]\n  \
                     --listen       or BASELINE_LISTEN (default 127.0.0.1:9201)\n  \
                     --read-buffer  or BASELINE_READ_BUFFER: WebSocket read buffer (default 4096)\n  \
                     --nagle    or BASELINE_NODELAY=0: leave Nagle's algorithm on (TCP_NODELAY\n             \
                     is set by default, as Tether does)\n  \
                     BASELINE_WRITE_EACH=1: one write per frame instead of one per reply"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    let v = value.unwrap_or_else(|| "127.0.0.1:9201".into());
    let listen = v.parse().map_err(|_| {
        format!("--listen / BASELINE_LISTEN must be an address like 127.0.0.1:9201, got '{v}'")
    })?;
    let read_buffer = match read_buffer {
        None => 4096,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(format!(
                    "--read-buffer must be a positive number of bytes, got '{v}'"
                ))
            }
        },
    };
    Ok(Options {
        listen,
        nodelay,
        read_buffer,
    })
}

#[tokio::main]
async fn main() {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("baseline: {e}");
            std::process::exit(2);
        }
    };
    let addr = opts.listen;
    let app = Router::new()
        .route("/ws", get(ws_handler))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(opts.read_buffer);
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("baseline: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "baseline listening on {addr} (TCP_NODELAY {}, read buffer {} bytes)",
        opts.nodelay, opts.read_buffer
    );
    // axum::serve with TCP_NODELAY: Tether runs its own HTTP/1.1 accept loop (header-read
    // timeout, head size limit) on hyper, with TCP_NODELAY; the upgrade and the WebSocket
    // settings are the same, so the handler is what differs.
    let nodelay = opts.nodelay;
    let listener = listener.tap_io(move |tcp| {
        if nodelay {
            tcp.set_nodelay(true).ok();
        }
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(tether::shutdown_signal())
        .await;
    if let Err(e) = served {
        eprintln!("baseline: {e}");
        std::process::exit(1);
    }
}

async fn ws_handler(State(read_buffer): State<usize>, ws: WebSocketUpgrade) -> Response {
    ws.protocols([protocol::PROTOCOL])
        .read_buffer_size(read_buffer)
        // As Tether: frames fed in one burst leave in one write.
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(MAX_MESSAGE_BYTES + 64 * 1024)
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(connection)
}

/// One connection: `connection_established`, then answer frames until the peer goes.
/// `BASELINE_WRITE_EACH=1`: one write per frame (the baseline before Tether batched its writes).
fn write_each() -> bool {
    static EACH: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *EACH.get_or_init(|| std::env::var("BASELINE_WRITE_EACH").is_ok_and(|v| v == "1"))
}

async fn connection(mut socket: WebSocket) {
    let (thread_id, run_id, request_id) =
        tether::ids::generate_user_context_ids(tether::ids::OP_WEBSOCKET_SESSION);
    let established = protocol::frame(
        "connection_established",
        meta(&thread_id, None, None, None),
        &json!({
            "connection_id": tether::ids::connection_id(),
            "user_id": "baseline",
            "thread_id": thread_id,
            "run_id": run_id,
            "request_id": request_id,
            "server_time": protocol::now_rfc3339(),
            "protocol": protocol::PROTOCOL,
            "resumed": false,
            "last_seq": 0,
            "limits": {"max_message_bytes": MAX_MESSAGE_BYTES},
        }),
    );
    if socket
        .send(Message::Text(established.into()))
        .await
        .is_err()
    {
        return;
    }
    let mut seq = 0u64;
    while let Some(Ok(msg)) = socket.recv().await {
        let Message::Text(text) = msg else {
            // Pings are answered by tungstenite; binary and close end the connection.
            if matches!(msg, Message::Binary(_) | Message::Close(_)) {
                return;
            }
            continue;
        };
        let frames = match protocol::parse_client_frame(text.as_str()) {
            Ok(f) => match f.request {
                ClientRequest::UserMessage { content } => {
                    run_frames(&thread_id, &mut seq, f.id.as_deref(), &content)
                }
                ClientRequest::Ping => vec![protocol::frame(
                    "pong",
                    meta(&thread_id, None, None, f.id.as_deref()),
                    &json!({"server_time": protocol::now_rfc3339()}),
                )],
                _ => vec![protocol::error_frame(
                    &thread_id,
                    f.id.as_deref(),
                    protocol::ErrorCode::UnknownType,
                    "the baseline answers user_message and ping only",
                )],
            },
            Err(e) => vec![protocol::error_frame(
                &thread_id,
                e.id.as_deref(),
                e.code,
                &e.message,
            )],
        };
        if write_each() {
            // The earlier baseline: one write per frame.
            for f in frames {
                if socket.send(Message::Text(f.into())).await.is_err() {
                    return;
                }
            }
            continue;
        }
        // One write for the whole reply, as Tether writes the frames a commit delivers together.
        let mut out =
            futures_util::stream::iter(frames.into_iter().map(|f| Ok(Message::Text(f.into()))));
        if socket.send_all(&mut out).await.is_err() {
            return;
        }
    }
}

fn meta<'a>(
    thread_id: &'a str,
    run_id: Option<&'a str>,
    seq: Option<u64>,
    reply_to: Option<&'a str>,
) -> FrameMeta<'a> {
    FrameMeta {
        thread_id: Some(thread_id),
        run_id,
        seq,
        reply_to,
        ts_ms: None,
    }
}

/// The eight frames Tether sends for a `user_message` with the demo agent, with the same
/// contents (the reply echoes the message with a word count, streamed in two halves).
fn run_frames(
    thread_id: &str,
    seq: &mut u64,
    reply_to: Option<&str>,
    content: &str,
) -> Vec<String> {
    let mut next = || {
        *seq += 1;
        Some(*seq)
    };
    let run_id = tether::ids::run_id(tether::ids::OP_AGENT_RUN);
    let run = Some(run_id.as_str());
    let user_message_id = tether::ids::message_id();
    let reply_id = tether::ids::message_id();
    let call = tether::ids::tool_call_id();
    let started = std::time::Instant::now();
    let count = tether::testing::word_count(content);
    let reply = tether::testing::demo_reply(content, &count);
    let (first_half, second_half) = tether::testing::halves(&reply);
    let ack_seq = next();
    let mut out = Vec::with_capacity(8);
    out.push(protocol::frame(
        "ack",
        meta(thread_id, None, ack_seq, reply_to),
        &json!({"message_id": user_message_id, "seq": ack_seq, "run_id": run_id}),
    ));
    out.push(protocol::frame(
        "agent_started",
        meta(thread_id, run, next(), reply_to),
        &json!({"agent": "demo", "run_id": run_id}),
    ));
    out.push(protocol::frame(
        "agent_thinking",
        meta(thread_id, run, next(), reply_to),
        &json!({"thought": "I am Tether's built-in demo agent, not an AI model: I will count the words of your message and echo it."}),
    ));
    out.push(protocol::frame(
        "tool_executing",
        meta(thread_id, run, next(), reply_to),
        &json!({"tool": "word_count", "input": {"text": content}, "tool_call_id": call}),
    ));
    out.push(protocol::frame(
        "tool_completed",
        meta(thread_id, run, next(), reply_to),
        &json!({"tool": "word_count", "output": count, "duration_ms": started.elapsed().as_millis() as u64, "tool_call_id": call}),
    ));
    out.push(protocol::frame(
        "agent_text_delta",
        meta(thread_id, run, None, reply_to),
        &json!({"message_id": reply_id, "offset": 0, "delta": first_half}),
    ));
    out.push(protocol::frame(
        "agent_text_delta",
        meta(thread_id, run, None, reply_to),
        &json!({"message_id": reply_id, "offset": first_half.chars().count(), "delta": second_half}),
    ));
    out.push(protocol::frame(
        "agent_completed",
        meta(thread_id, run, next(), reply_to),
        &json!({"message_id": reply_id, "content": reply, "duration_ms": started.elapsed().as_millis() as u64}),
    ));
    out
}
