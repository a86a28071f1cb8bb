//! The streamed completion: server-sent events in OpenAI's chunk shape, merged from one engine
//! stream per prompt. With `echo`, each choice first gets a chunk with its prompt; then a chunk per
//! generated token (its text the delta, stop strings already held back and cut by the engine),
//! the last of a choice carrying its `finish_reason` (beam search sends each choice as one chunk);
//! with `stream_options.include_usage`, a chunk with no choices and the usage; then
//! `data: [DONE]`. An error after the stream started is one `data: {"error": {...}}` event, and
//! the stream ends.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::Poll;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use gpt2_engine::{EngineStream, GenerationEvent, Mode, SubmitError};
use serde_json::{json, Value};
use tracing::{info, warn};

use super::request::CompletionRequest;
use super::response::{finish_reason, usage, Logprobs, Meta};
use super::{OpenAiError, COMPLETIONS};
use crate::routes::AppState;

/// What the request log line of a streamed completion needs.
pub struct StreamLog {
    pub request_id: String,
    pub mode: &'static str,
    pub received: Instant,
}

/// Starts every prompt's engine stream, waits for the first event (an error then is still a
/// plain error answer), and answers 200 with the event stream.
pub async fn respond(
    state: &AppState,
    request: CompletionRequest,
    meta: Meta,
    log: StreamLog,
) -> Result<Response, OpenAiError> {
    let engine = state.engine();
    let starts = request.requests.iter().cloned().map(|r| engine.stream(r));
    let streams = futures_util::future::try_join_all(starts).await?;
    let choices = streams.len() * request.n;
    let mut state = SseState {
        done: vec![false; streams.len()],
        started: vec![false; streams.len()],
        streams,
        next_poll: 0,
        first: None,
        pending: std::collections::VecDeque::new(),
        logprobs: (0..choices).map(|_| Logprobs::default()).collect(),
        request,
        meta,
        tokenizer: engine.tokenizer().clone(),
        log,
        generated_tokens: 0,
        finished: false,
    };
    match state.next_event().await {
        Some((_, Err(error))) => {
            state.finished = true;
            return Err(error.into());
        }
        first => state.first = first,
    }
    let chunks = futures_util::stream::unfold(state, |mut state| async move {
        let chunk = state.next_chunk().await?;
        Some((chunk, state))
    });
    let mut response = (
        StatusCode::OK,
        Body::from_stream(chunks.map(Ok::<_, Infallible>)),
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::streaming::EVENT_STREAM),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

type Event = (usize, Result<GenerationEvent, SubmitError>);

struct SseState {
    streams: Vec<EngineStream>,
    /// Which streams have ended.
    done: Vec<bool>,
    /// Which prompts have sent their echo chunks.
    started: Vec<bool>,
    /// The stream polled first next time, so that no prompt starves the others.
    next_poll: usize,
    /// The event awaited before answering.
    first: Option<Event>,
    /// Chunks made and not yet sent.
    pending: std::collections::VecDeque<Bytes>,
    /// Each choice's log-probabilities, for its token offsets.
    logprobs: Vec<Logprobs>,
    request: CompletionRequest,
    meta: Meta,
    tokenizer: gpt2_engine::gpt2_tokenizer::Gpt2Tokenizer,
    log: StreamLog,
    generated_tokens: usize,
    finished: bool,
}

impl SseState {
    /// The next event of any prompt's stream, tagged with the prompt; `None` once all ended.
    async fn next_event(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| {
            let count = self.streams.len();
            for k in 0..count {
                let p = (self.next_poll + k) % count;
                if self.done[p] {
                    continue;
                }
                match Pin::new(&mut self.streams[p]).poll_next(cx) {
                    Poll::Ready(Some(event)) => {
                        self.next_poll = (p + 1) % count;
                        return Poll::Ready(Some((p, event)));
                    }
                    Poll::Ready(None) => self.done[p] = true,
                    Poll::Pending => {}
                }
            }
            if self.done.iter().all(|d| *d) {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await
    }

    fn chunk(&self, choice: Value) -> Bytes {
        let data = json!({
            "id": self.meta.id,
            "object": "text_completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": [choice],
        });
        Bytes::from(format!("data: {data}\n\n"))
    }

    fn wants_logprobs(&self) -> bool {
        self.request.logprobs.is_some()
    }

    /// The echo chunks of prompt `p`, once, before its first generated text.
    fn echo(&mut self, p: usize, prompt: Option<&[gpt2_engine::PromptToken]>) {
        if self.started[p] {
            return;
        }
        self.started[p] = true;
        if !self.request.echo {
            return;
        }
        let n = self.request.n;
        let text = self.request.echo_texts.get(p).cloned().unwrap_or_default();
        for i in 0..n {
            let choice = p * n + i;
            let logprobs = match (self.wants_logprobs(), prompt) {
                (true, Some(prompt)) => {
                    self.logprobs[choice].push_prompt(prompt);
                    self.logprobs[choice].take()
                }
                _ => Value::Null,
            };
            let chunk = self.chunk(json!({
                "index": choice,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": null,
            }));
            self.pending.push_back(chunk);
        }
    }

    /// Turns one event into chunks.
    fn on_event(&mut self, p: usize, event: GenerationEvent) {
        let n = self.request.n;
        match event {
            GenerationEvent::Prompt(tokens) => self.echo(p, Some(&tokens)),
            GenerationEvent::Token(token) => {
                self.echo(p, None);
                let choice = p * n + token.index;
                let logprobs = if self.wants_logprobs() {
                    self.logprobs[choice].push_token(&token, &self.tokenizer);
                    self.logprobs[choice].take()
                } else {
                    Value::Null
                };
                let mut data = json!({
                    "index": choice,
                    "text": token.text,
                    "logprobs": logprobs,
                    "finish_reason": null,
                });
                // A sequence's end arrives with its last token: send them as one chunk.
                if let Some(GenerationEvent::End(end)) = self.streams[p].peek_ready() {
                    if end.index == token.index {
                        self.generated_tokens += end.generated_tokens;
                        data["finish_reason"] = json!(finish_reason(end.finish_reason));
                        // Consumed below, from the same stream, without waiting.
                        self.skip_end(p);
                    }
                }
                let chunk = self.chunk(data);
                self.pending.push_back(chunk);
            }
            GenerationEvent::End(end) => {
                self.echo(p, None);
                self.generated_tokens += end.generated_tokens;
                // Beam search's sequences arrive whole; other ends follow their tokens' text.
                let text = if self.request.mode == Mode::Beam {
                    end.text
                } else {
                    String::new()
                };
                let logprobs = if self.wants_logprobs() {
                    self.logprobs[p * n + end.index].take()
                } else {
                    Value::Null
                };
                let chunk = self.chunk(json!({
                    "index": p * n + end.index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(end.finish_reason),
                }));
                self.pending.push_back(chunk);
            }
        }
    }

    /// Drops the ready end event of stream `p` (already merged into its last token's chunk).
    fn skip_end(&mut self, p: usize) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // The event is already queued in the stream: this poll returns it at once.
        let _ = Pin::new(&mut self.streams[p]).poll_next(&mut cx);
    }

    /// The next SSE chunk, `None` once `[DONE]` or an error event has been sent.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some(chunk);
            }
            if self.finished {
                return None;
            }
            let event = match self.first.take() {
                Some(event) => Some(event),
                None => self.next_event().await,
            };
            match event {
                None => {
                    if self.request.include_usage {
                        let prompt_tokens = self.streams.iter().map(|s| s.prompt_tokens()).sum();
                        let data = json!({
                            "id": self.meta.id,
                            "object": "text_completion",
                            "created": self.meta.created,
                            "model": self.meta.model,
                            "choices": [],
                            "usage": usage(prompt_tokens, self.generated_tokens),
                        });
                        self.pending
                            .push_back(Bytes::from(format!("data: {data}\n\n")));
                    }
                    self.pending
                        .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    self.finish(200, None);
                }
                Some((_, Err(error))) => {
                    let error = OpenAiError::from(error);
                    self.pending
                        .push_back(Bytes::from(format!("data: {}\n\n", error.body())));
                    self.finish(error.status.as_u16(), Some(&error));
                }
                Some((p, Ok(event))) => self.on_event(p, event),
            }
        }
    }

    /// Records the metrics and writes the request's log line once its stream has ended.
    fn finish(&mut self, status: u16, error: Option<&OpenAiError>) {
        self.finished = true;
        let total = self.log.received.elapsed();
        let total_ms = total.as_millis() as u64;
        let timings: Vec<_> = self.streams.iter().map(|s| s.timings()).collect();
        let queued = timings.iter().map(|t| t.queued).max().unwrap_or_default();
        let generation = timings
            .iter()
            .map(|t| t.generation)
            .max()
            .unwrap_or_default();
        let first_token = timings.iter().filter_map(|t| t.first_token).min();
        let prompt_tokens: usize = self.streams.iter().map(|s| s.prompt_tokens()).sum();
        crate::metrics::observe(&crate::metrics::Observed {
            route: COMPLETIONS,
            mode: self.log.mode,
            status,
            total,
            queued: Some(queued),
            first_token,
            generation: Some(generation),
            prompt_tokens,
            generated_tokens: self.generated_tokens,
        });
        let first_token_ms = first_token.map_or(0, |t| t.as_millis() as u64);
        match error {
            None => info!(
                request_id = %self.log.request_id,
                route = COMPLETIONS,
                status,
                mode = self.log.mode,
                stream = true,
                prompts = self.streams.len(),
                prompt_tokens,
                generated_tokens = self.generated_tokens,
                queue_ms = queued.as_millis() as u64,
                first_token_ms,
                generation_ms = generation.as_millis() as u64,
                total_ms,
                "completion"
            ),
            Some(error) => warn!(
                request_id = %self.log.request_id,
                route = COMPLETIONS,
                status,
                mode = self.log.mode,
                stream = true,
                error_type = error.code.unwrap_or(error.kind),
                error = %error.message,
                first_token_ms,
                total_ms,
                "completion failed after its stream started"
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
            "streamed completion",
            COMPLETIONS,
            &self.log.request_id,
            true,
            self.generated_tokens,
            self.log.received,
        );
    }
}
