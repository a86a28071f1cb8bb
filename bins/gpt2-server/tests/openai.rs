//! The OpenAI-compatible routes (`/v1/completions`, `/v1/models`, `/v1/chat/completions`), driven
//! by the official `openai` Python package (`support/openai_client.py`) against the built server
//! with the demo model. Needs `openai` and `requests` in the python of `GPT2_TEST_PYTHON`
//! (`.ci/run` installs them); fails, never skips, without them.

mod support;

use std::process::Command;

use support::{python, run_client, Server};

fn client_script() -> String {
    format!(
        "{}/tests/support/openai_client.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn the_openai_client_completes_streams_and_gets_its_own_errors() {
    let server = Server::start(&[]);
    let output = run_client(
        Command::new(python())
            .arg(client_script())
            .arg(server.url())
            .arg("gpt2-demo"),
        "the openai client script",
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("checks passed"), "{stdout}");

    // Each completion is logged and counted under its own route label.
    let logs = server.log_lines();
    assert!(
        logs.iter()
            .any(|l| l.contains("\"route\":\"completions\"") && l.contains("\"status\":200")),
        "no completion log line: {logs:?}"
    );
    let metrics = server.request("GET", "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines().any(|l| l.starts_with("gpt2_requests_total")
            && l.contains("route=\"completions\"")
            && l.contains("status=\"200\"")),
        "{text}"
    );
    let panics: Vec<String> = logs
        .into_iter()
        .filter(|l| l.contains("panicked"))
        .collect();
    assert!(panics.is_empty(), "{panics:?}");
}

#[test]
fn served_model_name_sets_the_model_id() {
    let server = Server::start(&["--served-model-name", "my-gpt2"]);
    let models = server.request("GET", "/v1/models", &[], b"");
    assert_eq!(models.status, 200);
    let json = models.json();
    assert_eq!(json["object"], "list");
    assert_eq!(json["data"][0]["id"], "my-gpt2");
    assert_eq!(json["data"][0]["max_model_len"], 1024);
    let one = server.request("GET", "/v1/models/my-gpt2", &[], b"");
    assert_eq!(one.json()["id"], "my-gpt2");

    let post = |body: &str| {
        server.request(
            "POST",
            "/v1/completions",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    };
    let ok = post(r#"{"model": "my-gpt2", "prompt": "Hi", "max_tokens": 2}"#);
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json()["choices"].as_array().unwrap().len(), 1);
    let wrong = post(r#"{"model": "gpt2-demo", "prompt": "Hi"}"#);
    assert_eq!(wrong.status, 404);
    assert_eq!(wrong.json()["error"]["code"], "model_not_found");

    // Bad bodies: 4xx in OpenAI's shape, never a 5xx.
    for body in [
        r#"{"model": "my-gpt2", "prompt": ["Hi", 1]}"#,
        r#"{"model": "my-gpt2", "prompt": []}"#,
        r#"{"model": "my-gpt2", "prompt": [[]]}"#,
        r#"{"model": "my-gpt2", "prompt": [-1]}"#,
        r#"{"model": "my-gpt2", "prompt": "Hi", "max_tokens": 0}"#,
        r#"{"model": "my-gpt2", "prompt": "Hi", "top_k": -2}"#,
        r#"{"model": "my-gpt2", "prompt": "Hi", "seed": 1e30}"#,
        r#"{"model": "my-gpt2", "prompt": "Hi", "stream_options": {"include_usage": true}}"#,
        r#"{"model": "my-gpt2", "prompt": "Hi", "num_beams": 2, "logprobs": 1}"#,
        r#"{"model": "my-gpt2", "prompt": "Hi", "num_beams": 2, "n": 3}"#,
        r#"{"model": "my-gpt2", "prompt": "Hi", "repetition_penalty": 0}"#,
        r#"{"model": "my-gpt2", "prompt": "Hi", "user": 5}"#,
        r#"{"model": 5, "prompt": "Hi"}"#,
        r#"{"model": "my-gpt2", "model": "my-gpt2", "prompt": "Hi"}"#,
    ] {
        let answer = post(body);
        assert_eq!(
            answer.status,
            400,
            "{body}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let json = answer.json();
        assert_eq!(
            json["error"]["type"], "invalid_request_error",
            "{body}: {json}"
        );
    }
}

/// Errors of the layers shared with the native routes (authentication, unknown paths and
/// methods) come in OpenAI's shape on `/v1/*`, and the `openai` client raises them as its own
/// types; the native routes keep their own shape.
#[test]
fn shared_layer_errors_have_openai_s_shape_on_v1() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let openai_shape = |answer: &support::HttpResponse, status: u16, kind: &str| {
        assert_eq!(answer.status, status, "{answer:?}");
        let json = answer.json();
        let error = json["error"]
            .as_object()
            .unwrap_or_else(|| panic!("{json}"));
        let mut keys: Vec<&str> = error.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["code", "message", "param", "type"], "{json}");
        assert_eq!(error["type"], kind, "{json}");
        assert!(answer.header("x-request-id").is_some());
    };
    let json_type = [("Content-Type", "application/json")];
    let body = br#"{"model": "gpt2-demo", "prompt": "Hi", "max_tokens": 2}"#;
    let unauthenticated = server.request("POST", "/v1/completions", &json_type, body);
    openai_shape(&unauthenticated, 401, "authentication_error");
    let key = [("Authorization", "Bearer s3cret")];
    openai_shape(
        &server.request("GET", "/v1/nothing-here", &key, b""),
        404,
        "invalid_request_error",
    );
    openai_shape(
        &server.request("GET", "/v1/completions", &key, b""),
        405,
        "invalid_request_error",
    );
    // The native routes keep their shape.
    let native = server.request("POST", "/invocations", &json_type, br#"{"input": "Hi"}"#);
    assert_eq!(native.status, 401);
    assert!(native.json()["error"].is_string(), "{native:?}");

    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="wrong")
try:
    client.completions.create(model="gpt2-demo", prompt="Hi", max_tokens=2)
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401 and e.body["type"] == "authentication_error", e.body
good = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="s3cret")
print(good.completions.create(model="gpt2-demo", prompt="Hi", max_tokens=2).object)
"#;
    let output = run_client(
        Command::new(python()).args(["-c", script, &server.url()]),
        "the openai client",
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "text_completion"
    );
}
