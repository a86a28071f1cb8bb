//! The OpenAI-compatible API: `POST /v1/completions` (OpenAI's legacy completions, with vLLM's
//! sampling extensions), `GET /v1/models`, `GET /v1/models/{id}`, and `POST /v1/chat/completions`,
//! which is refused (GPT-2 has no chat template). Errors have OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, so that OpenAI's clients raise their own
//! exception types.
//!
//! A request with several prompts runs them as concurrent engine requests (each takes a queue
//! place); its choices are numbered `prompt_index * n + i`, as OpenAI numbers them.

mod request;
mod response;
mod stream;

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use gpt2_engine::{EngineError, ModelSource, RequestError, SubmitError};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::api_error::ApiError;
use crate::routes::{AppState, RequestId};

/// The `route` label of the completions' metrics.
const COMPLETIONS: &str = "completions";

/// The model the OpenAI routes serve: its id, and when the server started.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub id: String,
    /// Unix seconds, reported as the model's `created`.
    pub created: u64,
}

impl ServedModel {
    /// `--served-model-name` when given, else the last path component of `--model` (a
    /// directory, or a repository id such as `openai-community/gpt2`), else that of the
    /// directory loaded, else `gpt2-demo` for the demo model.
    pub fn new(name: Option<&str>, model: Option<&Path>, source: &ModelSource) -> Self {
        let last = |path: &Path| {
            path.components()
                .next_back()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .filter(|s| !s.is_empty() && s != "/")
        };
        let id = name
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or_else(|| model.and_then(last))
            .or_else(|| match source {
                ModelSource::Directory(dir) => last(dir),
                ModelSource::Demo => None,
            })
            .unwrap_or_else(|| "gpt2-demo".to_string());
        Self {
            id,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

impl Default for ServedModel {
    fn default() -> Self {
        Self::new(None, None, &ModelSource::Demo)
    }
}

/// An error answer in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `overloaded_error`,
    /// `server_error`.
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after: Option<u32>,
}

impl OpenAiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    /// A 404 for a model this server does not serve.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: Some("model_not_found"),
            ..Self::invalid(
                Some("model"),
                format!("The model `{model}` does not exist: this server serves one model (see GET /v1/models)"),
            )
        }
    }

    /// The body, as sent in an answer or a stream's error event.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// OpenAI's error `type` for an answer of `status` whose native `error_type` is `error_type`.
fn openai_type(status: StatusCode, error_type: &str) -> &'static str {
    match status.as_u16() {
        401 | 403 => "authentication_error",
        503 if error_type == "overloaded" => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        Self {
            status: error.status,
            kind: openai_type(error.status, error.error_type),
            message: error.message,
            param: None,
            code: Some(error.error_type),
            retry_after: error.retry_after,
        }
    }
}

impl From<SubmitError> for OpenAiError {
    fn from(error: SubmitError) -> Self {
        match error {
            SubmitError::Engine(EngineError::Request(
                error @ RequestError::InvalidField { .. },
            )) => request::from_request_error(error),
            other => ApiError::from(other).into(),
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Gives the errors of the layers shared with the native routes (authentication, unknown paths
/// and methods, upload checks) OpenAI's shape on `/v1/*`, so that OpenAI clients read them as
/// their own error types: `{"error": {"message", "type", "param", "code"}}`, `code` being the
/// native `error_type`. The handlers' own errors already have that shape and pass unchanged.
pub async fn errors_in_openai_shape(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let openai_path = request.uri().path().starts_with("/v1/");
    let response = next.run(request).await;
    let status = response.status();
    if !openai_path || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // Error bodies are a few hundred bytes; anything else is passed on as it was.
    let Ok(bytes) = axum::body::to_bytes(body, 64 * 1024).await else {
        return (parts, axum::body::Body::empty()).into_response();
    };
    let native = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
        let message = v.get("error")?.as_str()?.to_string();
        let error_type = v.get("error_type")?.as_str()?.to_string();
        Some((message, error_type))
    });
    let Some((message, error_type)) = native else {
        return (parts, axum::body::Body::from(bytes)).into_response();
    };
    let body = json!({"error": {
        "message": message,
        "type": openai_type(status, &error_type),
        "param": null,
        "code": error_type,
    }});
    parts.headers.remove(header::CONTENT_LENGTH);
    (parts, Json(body)).into_response()
}

/// `GET /v1/models`: the one model served.
pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_json(&state)]}))
}

/// `GET /v1/models/{id}`.
pub async fn retrieve_model(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Response {
    if id == state.served_model().id {
        Json(model_json(&state)).into_response()
    } else {
        OpenAiError::model_not_found(&id).into_response()
    }
}

fn model_json(state: &AppState) -> Value {
    let model = state.served_model();
    json!({
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": "gpt2-rs",
        "max_model_len": state.engine().model_config().n_positions,
    })
}

/// `POST /v1/chat/completions`: refused. GPT-2 checkpoints ship no chat template (their
/// `tokenizer_config.json` has no `chat_template`), and GPT-2 was never trained on dialogue, so
/// there is no faithful way to turn messages into a prompt.
pub async fn chat_completions() -> OpenAiError {
    OpenAiError::invalid(
        None,
        "This model has no chat template: GPT-2 is a plain language model, not a chat model. \
         Use POST /v1/completions with a text prompt instead.",
    )
}

/// JSON is the only body read; a missing Content-Type is taken as JSON (as on /invocations).
fn check_content_type(headers: &HeaderMap) -> Result<(), OpenAiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("");
    let essence = text.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    Err(OpenAiError {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        code: Some("unsupported_media_type"),
        ..OpenAiError::invalid(
            None,
            format!("Content-Type must be application/json, got {text:?}"),
        )
    })
}

/// The native route's reading of the body, in OpenAI's error shape.
fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, OpenAiError> {
    crate::routes::read_body(body).map_err(OpenAiError::from)
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A completion's id: `cmpl-` and 24 random hex digits.
fn completion_id() -> String {
    format!(
        "cmpl-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received = Instant::now();
    let mut abandoned = crate::routes::LogIfAbandoned {
        what: "completion",
        route: COMPLETIONS,
        request_id: request_id.clone(),
        received,
        answered: false,
    };
    let mut mode = None;
    let mut streamed = false;
    let result = async {
        check_content_type(&headers)?;
        let body = read_body(body)?;
        let engine = state.engine();
        let context = request::Context {
            model_id: &state.served_model().id,
            limits: state.limits(),
            tokenizer: engine.tokenizer(),
            max_prompts: engine.config().queue_capacity,
        };
        let request = request::parse(&body, &context)?;
        mode = Some(request.mode.name());
        let meta = response::Meta {
            id: completion_id(),
            created: unix_now(),
            model: state.served_model().id.clone(),
        };
        if request.stream {
            streamed = true;
            let log = stream::StreamLog {
                request_id: request_id.clone(),
                mode: request.mode.name(),
                received,
            };
            return stream::respond(&state, request, meta, log)
                .await
                .map(Answer::Stream);
        }
        let runs = request.requests.iter().cloned().map(|r| engine.generate(r));
        let completed = futures_util::future::try_join_all(runs).await?;
        let body = response::completion(&request, &completed, &meta, engine.tokenizer());
        Ok::<_, OpenAiError>(Answer::Whole(body, completed))
    }
    .await;
    let total = received.elapsed();
    let total_ms = total.as_millis() as u64;
    abandoned.answered = true;
    let observed = |status: u16| {
        crate::metrics::Observed::answered(COMPLETIONS, mode.unwrap_or("-"), status, total)
    };
    match result {
        // The stream records itself when it ends.
        Ok(Answer::Stream(response)) => response,
        Ok(Answer::Whole(body, completed)) => {
            let prompt_tokens = completed.iter().map(|c| c.output.prompt_tokens).sum();
            let generated_tokens = completed.iter().map(|c| c.output.generated_tokens).sum();
            let queued = completed.iter().map(|c| c.queued).max().unwrap_or_default();
            let generation = completed
                .iter()
                .map(|c| c.generation)
                .max()
                .unwrap_or_default();
            let first_token = completed.iter().filter_map(|c| c.first_token).min();
            crate::metrics::observe(&crate::metrics::Observed {
                queued: Some(queued),
                first_token,
                generation: Some(generation),
                prompt_tokens,
                generated_tokens,
                ..observed(200)
            });
            info!(
                request_id,
                route = COMPLETIONS,
                status = 200,
                mode = mode.unwrap_or("-"),
                prompts = completed.len(),
                prompt_tokens,
                generated_tokens,
                queue_ms = queued.as_millis() as u64,
                first_token_ms = first_token.map_or(0, |t| t.as_millis() as u64),
                generation_ms = generation.as_millis() as u64,
                total_ms,
                "completion"
            );
            Json(body).into_response()
        }
        Err(error) => {
            crate::metrics::observe(&observed(error.status.as_u16()));
            if error.status.is_server_error() {
                warn!(
                    request_id,
                    route = COMPLETIONS,
                    status = error.status.as_u16(),
                    mode = mode.unwrap_or("-"),
                    stream = streamed,
                    error_type = error.code.unwrap_or(error.kind),
                    error = %error.message,
                    total_ms,
                    "completion failed"
                );
            } else {
                info!(
                    request_id,
                    route = COMPLETIONS,
                    status = error.status.as_u16(),
                    mode = mode.unwrap_or("-"),
                    stream = streamed,
                    error_type = error.code.unwrap_or(error.kind),
                    param = error.param.as_deref().unwrap_or("-"),
                    error = %error.message,
                    total_ms,
                    "completion failed"
                );
            }
            error.into_response()
        }
    }
}

/// A completion's successful answer.
enum Answer {
    Whole(Value, Vec<gpt2_engine::Completed>),
    Stream(Response),
}
