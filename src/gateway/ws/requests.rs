//! One function per client request (PROTOCOL.md section 4), as mini-redis has one file per
//! command: [`Connection::on_text`] checks the rate, parses the frame and its thread, and hands
//! each [`ClientRequest`] to its own handler.

use std::sync::Arc;

use serde_json::json;
use tracing::Instrument;

use super::connection::Connection;
use super::end::End;
use super::rate::RateCheck;
use crate::agent::{drive_run, RunInput};
use crate::context::UserExecutionContext;
use crate::ids;
use crate::metrics::{metrics, InKind, MismatchSource, OutKind};
use crate::protocol::{self, ClientRequest, ErrorCode};
use crate::registry::OutFrame;
use crate::session::{AckTo, CommitReceipt, Gate, NewEvent, Role, StagedWrite};

impl Connection {
    /// A text frame from the client.
    pub(super) async fn on_text(&mut self, text: &str) -> Result<(), End> {
        match self.rate.check() {
            RateCheck::Allowed => {}
            RateCheck::Refused => {
                metrics().message_in(InKind::Invalid);
                let id = protocol::parse_client_frame(text).ok().and_then(|f| f.id);
                let limit = self.st.config.limits.message_rate;
                return self
                    .send_error(
                        id.as_deref(),
                        ErrorCode::RateLimited,
                        &format!("too many messages (limit {limit}/s)"),
                    )
                    .await;
            }
            RateCheck::Exceeded => return Err(self.rate_exceeded()),
        }
        let frame = match protocol::parse_client_frame(text) {
            Ok(f) => f,
            Err(e) => {
                metrics().message_in(if e.code == ErrorCode::UnknownType {
                    InKind::Unknown
                } else {
                    InKind::Invalid
                });
                return self.send_error(e.id.as_deref(), e.code, &e.message).await;
            }
        };
        if let Some(t) = frame.thread_id.as_deref() {
            if t != self.ctx.thread_id() {
                metrics().thread_mismatch(MismatchSource::Frame);
                metrics().message_in(InKind::Invalid);
                tracing::warn!(frame_thread_id = %protocol::truncate(t, 300), "thread_id mismatch: frame not acted on");
                return self
                    .send_error(
                        frame.id.as_deref(),
                        ErrorCode::ThreadMismatch,
                        "thread_id does not match this connection's thread",
                    )
                    .await;
            }
        }
        match frame.request {
            ClientRequest::UserMessage { content } => self.user_message(content, frame.id).await,
            ClientRequest::Ping => self.ping(frame.id.as_deref()).await,
            ClientRequest::GetHistory { since, limit } => {
                self.get_history(frame.id.as_deref(), since, limit).await
            }
            ClientRequest::CancelRun { run_id } => {
                self.cancel_run(frame.id.as_deref(), &run_id).await
            }
        }
    }

    /// `ping`: a `pong` with the server's time.
    async fn ping(&mut self, id: Option<&str>) -> Result<(), End> {
        metrics().message_in(InKind::Ping);
        let text = protocol::frame(
            "pong",
            self.meta(id),
            &json!({"server_time": protocol::now_rfc3339()}),
        );
        self.send_text(text, OutKind::Pong).await
    }

    /// `get_history`: one page of the thread's stored events.
    async fn get_history(&mut self, id: Option<&str>, since: u64, limit: u32) -> Result<(), End> {
        metrics().message_in(InKind::GetHistory);
        match self
            .st
            .store
            .events_since(self.ctx.thread_id(), since, limit)
            .await
        {
            Ok(page) => {
                let events: Vec<String> = page.events.into_iter().map(|(_, e)| e).collect();
                let text =
                    protocol::history_frame(self.ctx.thread_id(), id, &events, page.last_seq);
                self.send_text(text, OutKind::History).await
            }
            Err(e) => {
                tracing::error!(error = %e, "history read failed");
                self.send_error(id, ErrorCode::Internal, "could not read history")
                    .await
            }
        }
    }

    /// `cancel_run`: cancels a run of this (user, thread) that is in progress on this node.
    async fn cancel_run(&mut self, id: Option<&str>, run_id: &str) -> Result<(), End> {
        metrics().message_in(InKind::CancelRun);
        if self.st.runs.cancel(run_id, self.ctx.isolation_key()) {
            Ok(())
        } else {
            self.send_error(
                id,
                ErrorCode::UnknownRun,
                "no active run with this run_id on this thread",
            )
            .await
        }
    }

    /// `user_message`: store the message (the writer sends the `ack` after the commit) and run
    /// the agent with a child context at once. The run's sessions queue behind the message's and
    /// require its gate, so they are stored only if the message is, and a fast run shares its
    /// message's commit. The frame loop waits for neither.
    async fn user_message(
        &mut self,
        content: String,
        client_id: Option<String>,
    ) -> Result<(), End> {
        metrics().message_in(InKind::UserMessage);
        let run_ctx = match self.ctx.child() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot derive the run context");
                return self
                    .send_error(client_id.as_deref(), ErrorCode::Internal, "internal error")
                    .await;
            }
        };
        let message_id = ids::message_id();
        let reply_to: Option<Arc<str>> = client_id.as_deref().map(Into::into);
        let gate = Gate::new(&self.ctx);
        let mut session = self.st.sessions.create_session_from_context(&self.ctx);
        session
            .stage(StagedWrite::Event(NewEvent {
                kind: "user_message",
                run_id: None,
                reply_to: reply_to.clone(),
                data: json!({"message_id": message_id, "content": content, "user_id": self.ctx.user_id()}),
                ack: Some(AckTo {
                    message_id: message_id.clone(),
                    run_id: run_ctx.run_id().to_string(),
                }),
                prepared: None,
            }))
            .stage(StagedWrite::Message {
                message_id: message_id.clone(),
                role: Role::User,
                content: content.clone(),
                run_id: Some(run_ctx.run_id().to_string()),
            })
            .stage(StagedWrite::RunStarted { run: run_ctx.clone() })
            .stage(StagedWrite::Opens(gate.clone()));
        let receipt = match session.submit().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot queue the message");
                return self
                    .send_error(
                        client_id.as_deref(),
                        ErrorCode::Internal,
                        "message not stored",
                    )
                    .await;
            }
        };
        let input = RunInput {
            content,
            message_id,
            after: Some(gate),
        };
        self.spawn_run(run_ctx, input, reply_to, receipt);
        Ok(())
    }

    /// Start the run on the server's task tracker, in this connection's span. It starts now; its
    /// sessions queue behind the message's and are stored only if it is. If the message is not
    /// stored, the sender hears it at once and the run is cancelled (whatever it still emits is
    /// refused by the gate).
    fn spawn_run(
        &self,
        run_ctx: UserExecutionContext,
        input: RunInput,
        reply_to: Option<Arc<str>>,
        message_stored: CommitReceipt,
    ) {
        let cancel = self.st.runs_cancel.child_token();
        let guard = self.st.runs.insert(&run_ctx, cancel.clone());
        let st = self.st.clone();
        let conn_id = self.ctx.connection_id_arc().clone();
        let span = tracing::Span::current();
        self.st.tracker.spawn(
            async move {
                let _guard = guard;
                let stop_run = cancel.clone();
                let run = drive_run(
                    st.agent.clone(),
                    st.sessions.clone(),
                    run_ctx.clone(),
                    input,
                    reply_to.clone(),
                    cancel,
                    st.config.agent.run_timeout,
                );
                let watch = async {
                    let err = match message_stored.await {
                        Ok(Ok(_)) => return,
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "store closed".into(),
                    };
                    stop_run.cancel();
                    tracing::error!(error = %err, "user message not stored; its run stored nothing");
                    let text = protocol::error_frame(
                        run_ctx.thread_id(),
                        reply_to.as_deref(),
                        ErrorCode::Internal,
                        "message not stored",
                    );
                    st.registry
                        .deliver_to(run_ctx.isolation_key(), &conn_id, OutFrame::new(0, text));
                };
                // The run reported its own outcome (its terminal event, metrics and log).
                let ((), _outcome) = tokio::join!(watch, run);
            }
            .instrument(span),
        );
    }
}
