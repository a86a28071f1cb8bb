//! `GET /metrics`, parsed by Prometheus' own Python client (`prometheus_client.parser`), after
//! real requests: the counts match what was sent.

mod support;

use std::process::Command;

use support::{python, Server};

const PARSE: &str = r#"
import json, sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(sys.argv[1] + "/metrics").read().decode()
samples = {}
for family in text_string_to_metric_families(text):
    for s in family.samples:
        key = s.name + json.dumps(dict(sorted(s.labels.items())), sort_keys=True)
        samples[key] = s.value
print(json.dumps(samples))
"#;

fn scrape(server: &Server) -> serde_json::Map<String, serde_json::Value> {
    let out = Command::new(python())
        .args(["-c", PARSE, &server.url()])
        .output()
        .unwrap_or_else(|e| panic!("python could not be started ({e}); .ci/run installs it"));
    assert!(
        out.status.success(),
        "prometheus_client could not parse /metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn value(samples: &serde_json::Map<String, serde_json::Value>, key: &str) -> f64 {
    samples
        .get(key)
        .and_then(|v| v.as_f64())
        .unwrap_or_else(|| {
            panic!(
                "{key} missing from {:#?}",
                samples.keys().collect::<Vec<_>>()
            )
        })
}

#[test]
fn metrics_count_what_was_sent_in_prometheus_text_format() {
    let server = Server::start(&["--kv-budget-mb", "512"]);
    let greedy = r#"{"input": "Hello there", "mode": "greedy", "max_length": 12, "num_return_sequences": 1}"#;
    for _ in 0..3 {
        assert_eq!(server.invoke(greedy).status, 200);
    }
    assert_eq!(server.invoke(r#"{"input": "Hi", "top_p": 7}"#).status, 422);
    let streamed = server.request(
        "POST",
        "/invocations",
        &[
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
        ],
        br#"{"input": "Hi", "max_length": 6, "seed": 1}"#,
    );
    assert_eq!(streamed.status, 200);
    let response = server.request("GET", "/metrics", &[], b"");
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));

    let samples = scrape(&server);
    let requests = |mode: &str, status: &str| {
        value(
            &samples,
            &format!(
                r#"gpt2_requests_total{{"mode": "{mode}", "route": "invocations", "status": "{status}"}}"#
            ),
        )
    };
    assert_eq!(requests("greedy", "200"), 3.0);
    assert_eq!(requests("sample-top-p", "200"), 1.0);
    assert_eq!(requests("-", "422"), 1.0);
    // "Hello there" is 2 tokens; the stream's "Hi" is 1: 3 x 2 + 1.
    assert_eq!(value(&samples, "gpt2_prompt_tokens_total{}"), 7.0);
    // Greedy: 10 tokens each; the stream: 3 sequences of 5.
    assert_eq!(value(&samples, "gpt2_generated_tokens_total{}"), 45.0);
    assert_eq!(
        value(
            &samples,
            r#"gpt2_request_duration_seconds_count{"route": "invocations"}"#
        ),
        5.0
    );
    assert_eq!(
        value(&samples, "gpt2_time_to_first_token_seconds_count{}"),
        4.0
    );
    assert_eq!(
        value(&samples, "gpt2_prefill_duration_seconds_count{}"),
        4.0
    );
    assert!(value(&samples, "gpt2_decode_step_duration_seconds_count{}") >= 9.0);
    assert!(value(&samples, "gpt2_decode_batch_rows_sum{}") >= 9.0);
    assert_eq!(value(&samples, "gpt2_queue_depth{}"), 0.0);
    assert_eq!(value(&samples, "gpt2_queue_capacity{}"), 64.0);
    assert_eq!(value(&samples, "gpt2_kv_cache_reserved_bytes{}"), 0.0);
    assert_eq!(
        value(&samples, "gpt2_kv_cache_budget_bytes{}"),
        512.0 * 1024.0 * 1024.0
    );
    assert_eq!(value(&samples, "gpt2_request_body_reserved_bytes{}"), 0.0);
    assert_eq!(
        value(&samples, "gpt2_request_body_budget_bytes{}"),
        256.0 * 1024.0 * 1024.0
    );
    assert!(value(&samples, "gpt2_model_load_seconds{}") > 0.0);
    let build = samples
        .keys()
        .find(|k| k.starts_with("gpt2_build_info"))
        .expect("build info");
    assert!(
        build.contains(r#""dtype": "f32""#) && build.contains(r#""version": "0.1.0""#),
        "{build}"
    );
}
