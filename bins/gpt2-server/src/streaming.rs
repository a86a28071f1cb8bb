//! Streamed answers: server-sent events on `/invocations` (asked with `"stream": true` or
//! `Accept: text/event-stream`), and the same bytes in AWS event-stream frames on SageMaker's
//! `/endpoints/{name}/invocations-response-stream`, the framing boto3's
//! `invoke_endpoint_with_response_stream` reads.
//!
//! One SSE event per generated token; a sequence's last token also carries its `finish_reason`
//! and `generated_text`; beam search, which knows its winners only at the end, sends one final
//! event per returned sequence; then `data: [DONE]`. An error after the first event is an event
//! `{"error", "error_type"}` before the stream closes.

use std::convert::Infallible;
use std::time::Instant;

use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue as HttpHeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use gpt2_engine::{EngineStream, GenerationEvent};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::api_error::ApiError;

/// The media type of server-sent events.
pub const EVENT_STREAM: &str = "text/event-stream";
/// The media type of AWS event streams.
pub const AWS_EVENT_STREAM: &str = "application/vnd.amazon.eventstream";

/// Whether the caller asked for a stream: `"stream": true` in the body, or an accept type (the
/// `Accept` header, or `X-Amzn-SageMaker-Accept` as SageMaker's runtime forwards it) naming
/// `text/event-stream`.
pub fn wants_stream(headers: &HeaderMap, body_asks: bool) -> bool {
    body_asks
        || ["accept", "x-amzn-sagemaker-accept"].iter().any(|name| {
            headers
                .get_all(*name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .eq_ignore_ascii_case(EVENT_STREAM)
                })
        })
}

/// How the SSE bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Plain `text/event-stream` over chunked transfer.
    ServerSentEvents,
    /// Each SSE chunk as the payload of an AWS event-stream `PayloadPart` message.
    AwsEventStream,
}

/// What the request log line of a streamed request needs.
pub struct StreamLog {
    pub request_id: String,
    pub mode: &'static str,
    pub received: Instant,
    /// The `route` label of its metrics.
    pub route: &'static str,
}

/// Waits for the request's first event and answers: its error as a plain JSON error (the
/// status is still free), or 200 with the stream starting from that event.
pub async fn respond(
    mut stream: EngineStream,
    framing: Framing,
    log: StreamLog,
) -> Result<Response, ApiError> {
    let first = match stream.next().await {
        Some(Err(error)) => return Err(error.into()),
        Some(Ok(event)) => Some(event),
        None => None,
    };
    let state = SseState {
        stream,
        first,
        log,
        generated_tokens: 0,
        finished: false,
    };
    let chunks = futures_util::stream::unfold(state, |mut state| async move {
        let chunk = state.next_chunk().await?;
        Some((chunk, state))
    });
    let (content_type, body) = match framing {
        Framing::ServerSentEvents => (
            EVENT_STREAM,
            Body::from_stream(chunks.map(Ok::<_, Infallible>)),
        ),
        Framing::AwsEventStream => (
            AWS_EVENT_STREAM,
            Body::from_stream(chunks.map(|chunk| Ok::<_, Infallible>(payload_part(chunk)))),
        ),
    };
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HttpHeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HttpHeaderValue::from_static("no-cache"),
    );
    if framing == Framing::AwsEventStream {
        // What boto3 reports as the response's ContentType: the type of the payload parts.
        headers.insert(
            "x-amzn-sagemaker-content-type",
            HttpHeaderValue::from_static(EVENT_STREAM),
        );
    }
    Ok(response)
}

/// A token's most likely alternatives as `[{"id", "text", "logprob"}]`.
pub(crate) fn top_json(top: &[gpt2_engine::TopLogprob]) -> serde_json::Value {
    top.iter()
        .map(|t| json!({"id": t.id, "text": t.text, "logprob": finite(t.logprob)}))
        .collect()
}

/// One request's stream on its way to SSE bytes.
struct SseState {
    stream: EngineStream,
    /// The event awaited before answering, sent first.
    first: Option<GenerationEvent>,
    log: StreamLog,
    generated_tokens: usize,
    finished: bool,
}

impl SseState {
    /// The next SSE chunk, `None` once `[DONE]` or an error event has been sent.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        let event = match self.first.take() {
            Some(event) => Some(Ok(event)),
            None => self.stream.next().await,
        };
        let data = match event {
            None => {
                self.finish(200, None);
                return Some(Bytes::from_static(b"data: [DONE]\n\n"));
            }
            Some(Err(error)) => {
                let error = ApiError::from(error);
                self.finish(error.status.as_u16(), Some(&error));
                json!({"error": error.message, "error_type": error.error_type})
            }
            Some(Ok(GenerationEvent::Prompt(tokens))) => {
                let tokens: Vec<_> = tokens
                    .iter()
                    .map(|t| {
                        json!({
                            "id": t.id,
                            "text": t.text,
                            "logprob": t.logprob.map_or(Value::Null, finite),
                            "top_logprobs": top_json(&t.top_logprobs),
                        })
                    })
                    .collect();
                json!({ "prompt_tokens": tokens })
            }
            Some(Ok(GenerationEvent::Token(token))) => {
                let mut data = json!({
                    "index": token.index,
                    "token": {"id": token.id, "text": token.text, "logprob": finite(token.logprob)},
                });
                if !token.top_logprobs.is_empty() {
                    data["token"]["top_logprobs"] = top_json(&token.top_logprobs);
                }
                // A sequence's end arrives with its last token: send them as one event.
                if let Some(GenerationEvent::End(end)) = self.stream.peek_ready() {
                    if end.index == token.index {
                        if let Some(Ok(GenerationEvent::End(end))) = self.stream.next().await {
                            self.generated_tokens += end.generated_tokens;
                            data["finish_reason"] = json!(end.finish_reason.name());
                            data["generated_text"] = json!(end.text);
                        }
                    }
                }
                data
            }
            Some(Ok(GenerationEvent::End(end))) => {
                self.generated_tokens += end.generated_tokens;
                json!({
                "index": end.index,
                "finish_reason": end.finish_reason.name(),
                "generated_text": end.text,
                })
            }
        };
        Some(Bytes::from(format!("data: {data}\n\n")))
    }

    /// Writes the request's log line once its stream has ended; `generated_tokens` counts the
    /// tokens of the ended sequences (beam search's too, which send no token events).
    fn finish(&mut self, status: u16, error: Option<&ApiError>) {
        self.finished = true;
        let timings = self.stream.timings();
        let total = self.log.received.elapsed();
        let total_ms = total.as_millis() as u64;
        crate::metrics::observe(&crate::metrics::Observed {
            route: self.log.route,
            mode: self.log.mode,
            status,
            total,
            queued: Some(timings.queued),
            first_token: timings.first_token,
            generation: Some(timings.generation),
            prompt_tokens: self.stream.prompt_tokens(),
            generated_tokens: self.generated_tokens,
        });
        let first_token_ms = timings.first_token.map_or(0, |t| t.as_millis() as u64);
        match error {
            None => info!(
                request_id = %self.log.request_id,
                status,
                mode = self.log.mode,
                stream = true,
                prompt_tokens = self.stream.prompt_tokens(),
                generated_tokens = self.generated_tokens,
                queue_ms = timings.queued.as_millis() as u64,
                first_token_ms,
                generation_ms = timings.generation.as_millis() as u64,
                total_ms,
                "invocation"
            ),
            Some(error) => warn!(
                request_id = %self.log.request_id,
                status,
                mode = self.log.mode,
                stream = true,
                error_type = error.error_type,
                error = %error.message,
                first_token_ms,
                total_ms,
                "invocation failed after its stream started"
            ),
        }
    }
}

impl Drop for SseState {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        crate::routes::log_unanswered(
            "streamed invocation",
            self.log.route,
            &self.log.request_id,
            true,
            self.generated_tokens,
            self.log.received,
        );
    }
}

/// JSON has no infinities: a token with no probability reports `null`.
pub(crate) fn finite(logprob: f32) -> Value {
    if logprob.is_finite() {
        json!(logprob)
    } else {
        Value::Null
    }
}

/// An SSE chunk as one AWS event-stream message: `PayloadPart` carrying the bytes as its payload
/// (prelude, headers and payload, each with its CRC32, written by `aws-smithy-eventstream`).
fn payload_part(chunk: Bytes) -> Bytes {
    let message = Message::new(chunk)
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("event".into()),
        ))
        .add_header(Header::new(
            ":event-type",
            HeaderValue::String("PayloadPart".into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/octet-stream".into()),
        ));
    let mut frame = Vec::new();
    match aws_smithy_eventstream::frame::write_message_to(&message, &mut frame) {
        Ok(()) => Bytes::from(frame),
        // Only payloads over 16 MB fail to frame; an SSE chunk is one token's event.
        Err(e) => {
            warn!(error = %e, "cannot frame a stream chunk");
            Bytes::new()
        }
    }
}
