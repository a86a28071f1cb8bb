//! The HTTP surface: routes, request ids, content checks, and the one log line per request.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use gpt2_engine::{Engine, GenerationRequest, Limits};
use serde_json::json;
use tracing::{info, warn};

use crate::api_error::ApiError;
use crate::auth::{self, AuthConfig};
use crate::metrics::Observed;
use crate::streaming::{self, Framing, StreamLog};

/// SageMaker's payload limit for real-time invocations.
pub const MAX_BODY_BYTES: usize = 6 * 1024 * 1024;
/// `--body-budget-mb`'s default: 42 bodies of the largest size being received at once.
pub const DEFAULT_BODY_BUDGET_BYTES: usize = 256 * 1024 * 1024;

/// The header that carries the request id back to the client.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    engine: Engine,
    limits: Limits,
    auth: Arc<AuthConfig>,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The model id the OpenAI-compatible routes serve.
    served_model: Arc<crate::openai::ServedModel>,
    /// What the request bodies being received may hold together.
    body_budget: crate::body_budget::BodyBudget,
}

impl AppState {
    pub fn new(engine: Engine, limits: Limits) -> Self {
        Self {
            engine,
            limits,
            auth: Arc::default(),
            metrics: None,
            served_model: Arc::default(),
            body_budget: crate::body_budget::BodyBudget::new(DEFAULT_BODY_BUDGET_BYTES),
        }
    }

    /// Bounds the request bodies being received together to `budget`.
    pub fn with_body_budget(mut self, budget: crate::body_budget::BodyBudget) -> Self {
        self.body_budget = budget;
        self
    }

    /// What the request bodies being received may hold together.
    pub fn body_budget(&self) -> &crate::body_budget::BodyBudget {
        &self.body_budget
    }

    /// Serves the OpenAI-compatible routes under `model`'s id.
    pub fn with_served_model(mut self, model: crate::openai::ServedModel) -> Self {
        self.served_model = Arc::new(model);
        self
    }

    /// The model id of the OpenAI-compatible routes.
    pub fn served_model(&self) -> &crate::openai::ServedModel {
        &self.served_model
    }

    /// The per-request limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Serves `GET /metrics` from `handle`'s recorder.
    pub fn with_metrics(mut self, handle: metrics_exporter_prometheus::PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// The Prometheus renderer, when metrics are on.
    pub fn metrics(&self) -> Option<&metrics_exporter_prometheus::PrometheusHandle> {
        self.metrics.as_ref()
    }

    /// The engine requests go to.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Requires the credentials `auth` names on every route but `/ping`.
    pub fn with_auth(mut self, auth: AuthConfig) -> Self {
        self.auth = Arc::new(auth);
        self
    }
}

/// A request's id, set by the middleware for the handlers' logs.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/invocations", post(invocations))
        .route("/endpoints/{name}/invocations", post(invocations))
        .route(
            "/endpoints/{name}/invocations-response-stream",
            post(invocations_response_stream),
        )
        .route("/", get(crate::playground::page))
        .route("/ping", get(ping))
        .route("/metrics", get(crate::metrics::render))
        .route("/execution-parameters", get(execution_parameters))
        .route("/v1/completions", post(crate::openai::completions))
        .route(
            "/v1/chat/completions",
            post(crate::openai::chat_completions),
        )
        .route("/v1/models", get(crate::openai::list_models))
        .route("/v1/models/{id}", get(crate::openai::retrieve_model))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.auth.clone(),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            state.body_budget.clone(),
            crate::body_budget::reserve,
        ))
        .layer(middleware::from_fn(check_upload))
        .layer(middleware::from_fn(crate::openai::errors_in_openai_shape))
        .layer(middleware::from_fn(with_request_id))
        .with_state(state)
}

/// Reuses a client's `X-Request-Id` when it is a plain token, else makes one; echoes it back.
async fn with_request_id(mut request: Request, next: Next) -> Response {
    let id = request_id(request.headers());
    request.extensions_mut().insert(RequestId(id.clone()));
    let mut response = next.run(request).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// The client's `X-Request-Id` when it is a plain token (1 to 128 visible ASCII characters), else
/// a new random id.
pub(crate) fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()))
}

/// 200 while the model is loaded and its worker runs (the model loads before the port opens).
async fn ping(State(state): State<AppState>) -> Response {
    if state.engine.is_alive() {
        StatusCode::OK.into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the inference worker stopped",
        )
        .into_response()
    }
}

/// Logs a request that ended without its answer as what it was: dropped when the shutdown grace
/// period ended (503 `shutdown`), else abandoned by its client (499 `client_disconnected`), whose
/// generation stops. `what` names it in the message ("invocation", "streamed completion", ...).
pub(crate) fn log_unanswered(
    what: &str,
    route: &'static str,
    request_id: &str,
    stream: bool,
    generated_tokens: usize,
    received: Instant,
) {
    let total_ms = received.elapsed().as_millis() as u64;
    if crate::serve::abandoned_at_shutdown() {
        warn!(
            request_id,
            route,
            status = 503,
            stream,
            error_type = "shutdown",
            generated_tokens,
            total_ms,
            "{what} dropped: the shutdown grace period ended before it finished"
        );
    } else {
        warn!(
            request_id,
            route,
            status = 499,
            stream,
            error_type = "client_disconnected",
            generated_tokens,
            total_ms,
            "{what} abandoned by the client; its generation stops"
        );
    }
}

/// Logs a line for a request whose handler is dropped before it answers (see [`log_unanswered`]).
pub(crate) struct LogIfAbandoned {
    pub(crate) what: &'static str,
    pub(crate) route: &'static str,
    pub(crate) request_id: String,
    pub(crate) received: Instant,
    pub(crate) answered: bool,
}

impl Drop for LogIfAbandoned {
    fn drop(&mut self) {
        if !self.answered {
            log_unanswered(
                self.what,
                self.route,
                &self.request_id,
                false,
                0,
                self.received,
            );
        }
    }
}

/// SageMaker batch transform asks this once to size its requests.
async fn execution_parameters(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "MaxConcurrentTransforms": state.engine.config().queue_capacity,
        "BatchStrategy": "SINGLE_RECORD",
        "MaxPayloadInMB": MAX_BODY_BYTES / (1024 * 1024),
    }))
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

/// Whether reading the body failed because tower-http's body timeout fired.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Refuses an upload that waits for `100 Continue` by its headers alone: such a client is never
/// invited to send 7 MB of CSV (hyper answers `100 Continue` only once something reads the body).
/// Other uploads are checked by the handler, after their body arrived: answering while a client
/// is still sending would reset the connection under its answer.
async fn check_upload(request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let invocation = path == "/invocations" || path.starts_with("/endpoints/");
    if request.method() == Method::POST && invocation && waits_for_continue(request.headers()) {
        if declared_length(request.headers()).is_some_and(|length| length > MAX_BODY_BYTES as u64) {
            return too_large().into_response();
        }
        if let Err(error) = check_content_type(request.headers()) {
            return error.into_response();
        }
    }
    next.run(request).await
}

/// Whether the client waits for `100 Continue` before sending its body.
pub(crate) fn waits_for_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
}

/// The body length the `Content-Length` header declares, when it is a number.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

pub(crate) fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("the body exceeds {MAX_BODY_BYTES} bytes (6 MB)"),
    )
}

/// JSON is the only body this service reads; a missing Content-Type is taken as JSON.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type must be application/json, got {:?}",
                value.to_str().unwrap_or("<binary>")
            ),
        ))
    }
}

/// The body, or the answer to a body that could not be read.
pub(crate) fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            unfinished_body(&rejection).unwrap_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    rejection.body_text(),
                )
            })
        }
    })
}

/// The answer to a body that stopped arriving or did not fit the body budget; `None` for other
/// read errors.
pub(crate) fn unfinished_body(error: &(dyn std::error::Error + 'static)) -> Option<ApiError> {
    if crate::body_budget::is_over_budget(error) {
        Some(crate::body_budget::over_budget())
    } else if timed_out(error) {
        Some(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body stopped arriving (see --body-timeout-secs)",
        ))
    } else {
        None
    }
}

async fn invocations(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    invoke(state, request_id, headers, body, None).await
}

/// The `route` label of the request metrics.
const INVOCATIONS: &str = "invocations";
const RESPONSE_STREAM: &str = "invocations-response-stream";

/// SageMaker runtime's `InvokeEndpointWithResponseStream`: always streamed, in AWS event-stream
/// frames.
async fn invocations_response_stream(
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    invoke(
        state,
        request_id,
        headers,
        body,
        Some(Framing::AwsEventStream),
    )
    .await
}

/// Answers an invocation: the JSON array, or a stream when `framing` says so or the request
/// asks for one.
async fn invoke(
    state: AppState,
    RequestId(request_id): RequestId,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    framing: Option<Framing>,
) -> Response {
    let received = Instant::now();
    let route = if framing == Some(Framing::AwsEventStream) {
        RESPONSE_STREAM
    } else {
        INVOCATIONS
    };
    let mut abandoned = LogIfAbandoned {
        what: "invocation",
        route,
        request_id: request_id.clone(),
        received,
        answered: false,
    };
    let mut mode = None;
    let mut streamed = framing.is_some();
    let result = async {
        check_content_type(&headers)?;
        let body = read_body(body)?;
        let request = GenerationRequest::from_json(&body, &state.limits)?;
        mode = Some(request.mode().name());
        let framing = framing.or_else(|| {
            streaming::wants_stream(&headers, request.stream()).then_some(Framing::ServerSentEvents)
        });
        if let Some(framing) = framing {
            streamed = true;
            let stream = state.engine.stream(request).await?;
            let log = StreamLog {
                request_id: request_id.clone(),
                mode: mode.unwrap_or("-"),
                received,
                route: if framing == Framing::AwsEventStream {
                    RESPONSE_STREAM
                } else {
                    INVOCATIONS
                },
            };
            // The stream's own state logs its line (and its abandonment) from here on.
            return Ok(Answer::Stream(
                streaming::respond(stream, framing, log).await?,
            ));
        }
        let details = request.details();
        let completed = state.engine.generate(request).await?;
        Ok::<_, ApiError>(Answer::Whole(completed, details))
    }
    .await;
    let total = received.elapsed();
    let total_ms = total.as_millis() as u64;
    abandoned.answered = true;
    let observed = |status: u16| Observed::answered(route, mode.unwrap_or("-"), status, total);
    match result {
        // The stream records itself when it ends.
        Ok(Answer::Stream(response)) => response,
        Ok(Answer::Whole(completed, details)) => {
            crate::metrics::observe(&Observed {
                queued: Some(completed.queued),
                first_token: completed.first_token,
                generation: Some(completed.generation),
                prompt_tokens: completed.output.prompt_tokens,
                generated_tokens: completed.output.generated_tokens,
                ..observed(200)
            });
            info!(
                request_id,
                status = 200,
                mode = mode.unwrap_or("-"),
                prompt_tokens = completed.output.prompt_tokens,
                generated_tokens = completed.output.generated_tokens,
                queue_ms = completed.queued.as_millis() as u64,
                first_token_ms = completed.first_token.map_or(0, |t| t.as_millis() as u64),
                generation_ms = completed.generation.as_millis() as u64,
                total_ms,
                "invocation"
            );
            if details {
                Json(detailed(&state, &completed.output)).into_response()
            } else {
                Json(completed.output.texts).into_response()
            }
        }
        Err(error) if error.status.is_server_error() => {
            crate::metrics::observe(&observed(error.status.as_u16()));
            warn!(
                request_id,
                status = error.status.as_u16(),
                mode = mode.unwrap_or("-"),
                stream = streamed,
                error_type = error.error_type,
                error = %error.message,
                total_ms,
                "invocation failed"
            );
            error.into_response()
        }
        Err(error) => {
            crate::metrics::observe(&observed(error.status.as_u16()));
            info!(
                request_id,
                status = error.status.as_u16(),
                mode = mode.unwrap_or("-"),
                stream = streamed,
                error_type = error.error_type,
                error = %error.message,
                total_ms,
                "invocation failed"
            );
            error.into_response()
        }
    }
}

/// An invocation's successful answer.
enum Answer {
    /// The whole JSON array: of strings, or of detailed objects when the flag is set.
    Whole(gpt2_engine::Completed, bool),
    /// A streamed response, already started.
    Stream(Response),
}

/// The `"details": true` answer: per sequence, its string, why it ended, and its tokens.
fn detailed(state: &AppState, output: &gpt2_engine::GenerationOutput) -> serde_json::Value {
    use crate::streaming::{finite, top_json};
    output
        .sequences
        .iter()
        .map(|sequence| {
            let end = &sequence.end;
            let tokens: Vec<serde_json::Value> = if sequence.tokens.is_empty() {
                // Beam search streams no tokens and scores none on its own.
                end.token_ids
                    .iter()
                    .map(|&id| {
                        let text = state.engine.tokenizer().token_text(id).unwrap_or_default();
                        json!({"id": id, "text": text, "logprob": null})
                    })
                    .collect()
            } else {
                sequence
                    .tokens
                    .iter()
                    .map(|t| {
                        let mut token =
                            json!({"id": t.id, "text": t.token_text, "logprob": finite(t.logprob)});
                        if !t.top_logprobs.is_empty() {
                            token["top_logprobs"] = top_json(&t.top_logprobs);
                        }
                        token
                    })
                    .collect()
            };
            let mut object = json!({
                "generated_text": end.text,
                "finish_reason": end.finish_reason.name(),
                "generated_tokens": end.generated_tokens,
                "tokens": tokens,
                "seed": end.seed,
            });
            if let Some(prompt) = &output.prompt {
                object["prompt_tokens"] = prompt
                    .iter()
                    .map(|t| {
                        json!({
                            "id": t.id,
                            "text": t.text,
                            "logprob": t.logprob.map_or(serde_json::Value::Null, finite),
                            "top_logprobs": top_json(&t.top_logprobs),
                        })
                    })
                    .collect();
            }
            object
        })
        .collect()
}
