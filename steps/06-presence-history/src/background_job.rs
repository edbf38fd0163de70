//! `/ws/backgroundjob`: takes jobs from its client, queues them for the
//! workers, and passes their results back when they arrive.
//!
//! The client speaks JSON: it sends `{"type": "translate", "content":
//! "hello"}`, and every frame it gets back is a JSON object too. The
//! consumer answers at once with `queuing` and `queued`; the result comes
//! later, from a worker, through this connection's own channel on the
//! `"chat"` layer.

use axum_channels::{Error, InvalidMessage, JsonConsumer, Result, Scope, Socket};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jobs::{Job, JobEvent, JobKind, JobQueue, PushError};

/// The longest `content` a job may have, in characters.
pub const MAX_CONTENT: usize = 1000;

/// What a job looks like, for the error messages.
const EXAMPLE: &str = r#"{"type": "translate", "content": "hello"}"#;

// ANCHOR: status
/// The frames this endpoint sends besides results, tagged by `"status"`:
/// `{"status": "queued", "job_id": "01K…", "message": "📋 Job 01K… queued
/// successfully! ..."}`.
#[derive(Debug, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
enum Status {
    Connected { message: String },
    Queuing { message: String },
    Queued { job_id: String, message: String },
    Error { message: String },
}
// ANCHOR_END: status

impl Status {
    fn error(problem: impl std::fmt::Display) -> Status {
        Status::Error {
            message: format!("❌ {problem}"),
        }
    }
}

// ANCHOR: request
/// A job as the client asks for it: `{"type": "translate", "content":
/// "hello"}`, with `"type"` left out meaning `default`.
///
/// `try_from = "Value"` makes serde decode the frame as any JSON value and
/// then call `JobRequest::try_from`, whose error messages, written for the
/// person at the page, become the `detail` of
/// [`InvalidMessage::WrongShape`]. A `JobRequest` that exists is valid.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Value")]
pub struct JobRequest {
    pub kind: JobKind,
    pub content: String,
}

impl TryFrom<Value> for JobRequest {
    type Error = String;

    fn try_from(value: Value) -> std::result::Result<JobRequest, String> {
        let Value::Object(mut fields) = value else {
            return Err(format!(
                "A job is a JSON object such as {EXAMPLE}, not {}",
                describe(&value)
            ));
        };
        let names: Vec<&str> = JobKind::ALL.iter().map(|kind| kind.name()).collect();
        let names = names.join(", ");
        let kind = match fields.remove("type") {
            None => JobKind::Default,
            Some(Value::String(name)) => JobKind::from_name(&name)
                .ok_or_else(|| format!("Unknown job type {name:?}: choose one of {names}"))?,
            Some(other) => {
                let other = describe(&other);
                return Err(format!("\"type\" must be one of {names}, not {other}"));
            }
        };
        let content = match fields.remove("content") {
            Some(Value::String(content)) => content,
            None => return Err(format!("Add the job's text as \"content\", e.g. {EXAMPLE}")),
            Some(other) => {
                let other = describe(&other);
                return Err(format!(
                    "\"content\" must be text, e.g. \"hello\", not {other}"
                ));
            }
        };
        let length = content.chars().count();
        if length > MAX_CONTENT {
            return Err(format!(
                "The content is {length} characters long; the limit is {MAX_CONTENT}. Send a shorter text"
            ));
        }
        Ok(JobRequest { kind, content })
    }
}
// ANCHOR_END: request

/// `an array`, `a number`, ...: the kind of a JSON value, for messages.
fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "true or false",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

// ANCHOR: consumer
/// One client of the job processor.
pub struct BackgroundJob {
    /// Where jobs go; the app shares it through axum's `Extension`.
    queue: Option<JobQueue>,
    /// How many of this connection's jobs have not sent their result yet.
    waiting: usize,
}
// ANCHOR_END: consumer

/// Why a connection is refused when the app shares no queue.
fn no_queue() -> Error {
    Error::Other("no JobQueue: add `.layer(Extension(queue))` to the router".into())
}

impl JsonConsumer for BackgroundJob {
    // ANCHOR: types
    type Message = JobRequest;
    type Event = JobEvent;
    const LAYER: Option<&'static str> = Some("chat");
    // ANCHOR_END: types

    // ANCHOR: new
    fn new(scope: &Scope) -> Self {
        let queue = scope.extension::<JobQueue>().cloned();
        BackgroundJob { queue, waiting: 0 }
    }
    // ANCHOR_END: new

    // ANCHOR: connect
    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        // A mistake in the app, not the client's: refused, and logged.
        if self.queue.is_none() {
            return Err(no_queue());
        }
        socket.accept().await?;
        let message = "🔄 Background Job Processor: Connected!".to_owned();
        socket.send_json(&Status::Connected { message }).await
    }
    // ANCHOR_END: connect

    // ANCHOR: receive
    async fn receive(&mut self, socket: &mut Socket, request: JobRequest) -> Result<()> {
        let queue = self.queue.as_ref().ok_or_else(no_queue)?;
        // ANCHOR: per_connection
        if self.waiting >= queue.max_per_connection {
            let status = Status::error(format!(
                "Too many jobs waiting: {} of yours wait for their results. Try again when one is done",
                self.waiting
            ));
            return socket.send_json(&status).await;
        }
        // ANCHOR_END: per_connection
        let JobRequest { kind, content } = request;
        let message = format!("⏳ Queuing {} job: {content}", kind.name());
        socket.send_json(&Status::Queuing { message }).await?;

        // Results come back to this connection's own channel.
        let reply_to = socket.channel_name().ok_or(Error::NoLayer)?.to_owned();
        let job = Job {
            kind,
            content,
            reply_to,
        };
        let status = match queue.push(job).await {
            Ok(job_id) => {
                self.waiting += 1;
                Status::Queued {
                    message: format!(
                        "📋 Job {job_id} queued successfully! Worker will process it shortly..."
                    ),
                    job_id,
                }
            }
            Err(PushError::Full) => {
                Status::error("Too many jobs waiting in the queue. Try again in a moment")
            }
            Err(PushError::Unavailable(err)) => {
                tracing::warn!(%err, "could not queue a job");
                Status::error("The job queue is not available right now; try again in a moment")
            }
        };
        socket.send_json(&status).await
    }
    // ANCHOR_END: receive

    // ANCHOR: event_handler
    async fn event(&mut self, socket: &mut Socket, event: JobEvent) -> Result<()> {
        // One job fewer waiting for its result.
        self.waiting = self.waiting.saturating_sub(1);
        // The worker's event is already the frame the page expects.
        socket.send_json(&event).await
    }
    // ANCHOR_END: event_handler

    // ANCHOR: invalid_message
    async fn invalid_message(
        &mut self,
        socket: &mut Socket,
        problem: InvalidMessage,
    ) -> Result<()> {
        let status = match problem {
            InvalidMessage::Binary { .. } => Status::error(format!(
                "Binary frames are not jobs: send JSON text, e.g. {EXAMPLE}"
            )),
            InvalidMessage::NotJson { detail } => {
                Status::error(format!("That is not JSON ({detail}): send e.g. {EXAMPLE}"))
            }
            // Written by `JobRequest::try_from` for the person at the page.
            InvalidMessage::WrongShape { detail } => Status::error(detail),
        };
        socket.send_json(&status).await
    }
    // ANCHOR_END: invalid_message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<JobRequest, String> {
        let value: Value = serde_json::from_str(json).expect("valid JSON");
        JobRequest::try_from(value)
    }

    #[test]
    fn a_missing_type_means_default() {
        let request = parse(r#"{"content": "abc"}"#).unwrap();
        assert_eq!(request.kind, JobKind::Default);
        assert_eq!(request.content, "abc");
    }

    #[test]
    fn other_fields_are_ignored() {
        let request = parse(r#"{"type": "analyze", "content": "", "extra": 1}"#).unwrap();
        assert_eq!(request.kind, JobKind::Analyze);
    }

    #[test]
    fn each_problem_has_its_own_message() {
        let problems = [
            (r#"[1, 2]"#, "A job is a JSON object"),
            (r#""hello""#, "not text"),
            (
                r#"{"type": "bogus", "content": "x"}"#,
                r#"Unknown job type "bogus""#,
            ),
            (r#"{"type": 3, "content": "x"}"#, "not a number"),
            (r#"{"type": "default"}"#, "Add the job's text"),
            (r#"{"content": null}"#, "not null"),
            (r#"{"content": ["a"]}"#, "not an array"),
        ];
        for (json, expected) in problems {
            let err = parse(json).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    #[test]
    fn content_is_limited_in_characters() {
        let at_limit = format!(r#"{{"content": "{}"}}"#, "é".repeat(MAX_CONTENT));
        assert!(parse(&at_limit).is_ok());
        let over = format!(r#"{{"content": "{}"}}"#, "é".repeat(MAX_CONTENT + 1));
        assert!(parse(&over).unwrap_err().contains("1001 characters"));
    }

    #[test]
    fn serde_uses_try_from() {
        let err = serde_json::from_str::<JobRequest>(r#"{"type": "bogus", "content": "x"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("Unknown job type"), "{err}");
    }

    #[test]
    fn status_frames_keep_the_originals_field_order() {
        let queued = Status::Queued {
            job_id: "01K".into(),
            message: "📋 Job 01K queued".into(),
        };
        assert_eq!(
            serde_json::to_string(&queued).unwrap(),
            r#"{"status":"queued","job_id":"01K","message":"📋 Job 01K queued"}"#
        );
    }
}
