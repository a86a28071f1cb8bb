//! `GET /metrics`: the Prometheus text exposition, from the `metrics` facade and
//! `metrics-exporter-prometheus` (its HTTP listener and push gateway left out: the server renders
//! it on its own route). The engine records its step metrics through the same facade.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::routes::AppState;

/// Latency buckets, seconds: from a 5 ms decode step to the 60 s default deadline.
const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Rows per decode step: 1 to 16 requests of up to 16 sequences.
const ROWS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// What the `gpt2_build_info` series carries.
pub struct BuildInfo {
    pub dtype: String,
    pub kv_dtype: String,
    pub isa: String,
}

/// Installs the process-wide recorder and describes every metric; returns the handle that renders.
pub fn install(build: &BuildInfo, model_load: Duration) -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("gpt2_decode_batch_rows".into()), ROWS)
        })
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    describe_counter!(
        "gpt2_requests_total",
        "Invocations answered, by route, mode and status."
    );
    describe_histogram!(
        "gpt2_request_duration_seconds",
        Unit::Seconds,
        "From the complete body to the last byte of the answer."
    );
    describe_histogram!(
        "gpt2_queue_duration_seconds",
        Unit::Seconds,
        "From admission to the start of the prefill."
    );
    describe_histogram!(
        "gpt2_time_to_first_token_seconds",
        Unit::Seconds,
        "From admission to the first generated token (or a beam search's first sequence)."
    );
    describe_histogram!(
        "gpt2_time_per_output_token_seconds",
        Unit::Seconds,
        "Generation time divided by the tokens generated, per request."
    );
    describe_histogram!(
        "gpt2_prefill_duration_seconds",
        Unit::Seconds,
        "One prompt's prefill (the other requests wait for it)."
    );
    describe_histogram!(
        "gpt2_decode_step_duration_seconds",
        Unit::Seconds,
        "One decode step for every running request."
    );
    describe_histogram!(
        "gpt2_decode_batch_rows",
        "Sequence rows in one decode step (continuous batching)."
    );
    describe_counter!(
        "gpt2_prompt_tokens_total",
        "Prompt tokens of the answered invocations."
    );
    describe_counter!(
        "gpt2_generated_tokens_total",
        "Tokens generated for the answered invocations."
    );
    describe_gauge!(
        "gpt2_queue_depth",
        "Requests admitted and not yet answered (waiting and running): the autoscaling signal."
    );
    describe_gauge!(
        "gpt2_queue_capacity",
        "--queue-capacity: admissions beyond it get 503."
    );
    describe_gauge!(
        "gpt2_running_requests",
        "Requests in the running batch at the last decode step."
    );
    describe_gauge!(
        "gpt2_running_sequences",
        "Sequence rows in the running batch at the last decode step."
    );
    describe_gauge!(
        "gpt2_waiting_requests",
        "Admitted requests waiting for room in the batch (--max-batch-rows) or for their prefill."
    );
    describe_gauge!(
        "gpt2_kv_cache_reserved_bytes",
        Unit::Bytes,
        "KV-cache bytes the admitted requests reserved."
    );
    describe_gauge!(
        "gpt2_kv_cache_budget_bytes",
        Unit::Bytes,
        "--kv-budget-mb, in bytes."
    );
    describe_gauge!(
        "gpt2_request_body_reserved_bytes",
        Unit::Bytes,
        "Bytes the request bodies being received hold of --body-budget-mb."
    );
    describe_gauge!(
        "gpt2_request_body_budget_bytes",
        Unit::Bytes,
        "--body-budget-mb, in bytes."
    );
    describe_gauge!(
        "gpt2_model_load_seconds",
        Unit::Seconds,
        "Time to load the model at start."
    );
    describe_gauge!(
        "gpt2_build_info",
        "1, labelled with the version and the weight, KV and kernel formats."
    );
    gauge!("gpt2_model_load_seconds").set(model_load.as_secs_f64());
    gauge!(
        "gpt2_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "dtype" => build.dtype.clone(),
        "kv_dtype" => build.kv_dtype.clone(),
        "isa" => build.isa.clone()
    )
    .set(1.0);
    Ok(handle)
}

/// One answered invocation's figures.
pub struct Observed<'a> {
    pub route: &'static str,
    pub mode: &'a str,
    pub status: u16,
    pub total: Duration,
    pub queued: Option<Duration>,
    pub first_token: Option<Duration>,
    pub generation: Option<Duration>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
}

impl<'a> Observed<'a> {
    /// A request answered without generation figures (an error, or before generation ran); a
    /// success fills in the rest with struct update syntax.
    pub fn answered(route: &'static str, mode: &'a str, status: u16, total: Duration) -> Self {
        Self {
            route,
            mode,
            status,
            total,
            queued: None,
            first_token: None,
            generation: None,
            prompt_tokens: 0,
            generated_tokens: 0,
        }
    }
}

/// Records an answered invocation (success or error).
pub fn observe(o: &Observed<'_>) {
    counter!(
        "gpt2_requests_total",
        "route" => o.route,
        "mode" => o.mode.to_string(),
        "status" => o.status.to_string()
    )
    .increment(1);
    histogram!("gpt2_request_duration_seconds", "route" => o.route).record(o.total.as_secs_f64());
    if let Some(queued) = o.queued {
        histogram!("gpt2_queue_duration_seconds").record(queued.as_secs_f64());
    }
    if let Some(first) = o.first_token {
        histogram!("gpt2_time_to_first_token_seconds").record(first.as_secs_f64());
    }
    if let (Some(generation), true) = (o.generation, o.generated_tokens > 0) {
        histogram!("gpt2_time_per_output_token_seconds")
            .record(generation.as_secs_f64() / o.generated_tokens as f64);
    }
    counter!("gpt2_prompt_tokens_total").increment(o.prompt_tokens as u64);
    counter!("gpt2_generated_tokens_total").increment(o.generated_tokens as u64);
}

/// `GET /metrics`: the engine's live state, then the exposition.
pub async fn render(State(state): State<AppState>) -> Response {
    let Some(handle) = state.metrics() else {
        return axum::http::StatusCode::NOT_FOUND.into_response();
    };
    let engine = state.engine();
    gauge!("gpt2_queue_depth").set(engine.in_flight() as f64);
    gauge!("gpt2_queue_capacity").set(engine.config().queue_capacity as f64);
    gauge!("gpt2_kv_cache_reserved_bytes").set(engine.kv_reserved_bytes() as f64);
    let budget = engine.config().kv_budget_bytes;
    if budget != usize::MAX {
        gauge!("gpt2_kv_cache_budget_bytes").set(budget as f64);
    }
    let bodies = state.body_budget();
    gauge!("gpt2_request_body_reserved_bytes").set(bodies.reserved_bytes() as f64);
    gauge!("gpt2_request_body_budget_bytes").set(bodies.total_bytes() as f64);
    let mut response = handle.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
