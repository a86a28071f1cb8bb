//! Never block, never pile up: bounded queue, deadlines, disconnects, busy pings, shutdown.

mod support;

use std::time::{Duration, Instant};

use support::{read_response, Server, LONG_REQUEST};

const JSON: [(&str, &str); 1] = [("Content-Type", "application/json")];

/// Waits until the server's worker has picked up a request (the queue holds one).
fn wait_until_busy() {
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn ping_answers_fast_while_the_model_is_busy() {
    let server = Server::start(&[]);
    let _busy = server
        .send("POST", "/invocations", &JSON, LONG_REQUEST.as_bytes())
        .unwrap();
    wait_until_busy();
    for _ in 0..5 {
        let started = Instant::now();
        let ping = server.request("GET", "/ping", &[], b"");
        assert_eq!(ping.status, 200);
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "ping took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn full_queue_answers_503_with_retry_after_at_once() {
    let server = Server::start(&["--queue-capacity", "1"]);
    let _busy = server
        .send("POST", "/invocations", &JSON, LONG_REQUEST.as_bytes())
        .unwrap();
    wait_until_busy();
    let started = Instant::now();
    let refused = server.invoke(r#"{"input": "Hi"}"#);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.error().1, "overloaded");
}

#[test]
fn a_prompt_that_cannot_fit_is_a_422_even_under_a_full_queue() {
    let server = Server::start(&["--queue-capacity", "1"]);
    let _busy = server
        .send("POST", "/invocations", &JSON, LONG_REQUEST.as_bytes())
        .unwrap();
    wait_until_busy();
    // 5 MB without a space: refused by its length, before admission and without tokenizing it.
    let huge = format!(r#"{{"input": "{}"}}"#, "x".repeat(5 << 20));
    let started = Instant::now();
    let refused = server.invoke(&huge);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(refused.status, 422);
    let (message, error_type) = refused.error();
    assert_eq!(error_type, "validation_error");
    assert!(
        message.contains("`input`") && message.contains("bytes"),
        "{message}"
    );
    // Too many tokens in few bytes: also a 422, not the full queue's 503.
    let over = format!(r#"{{"input": "{}"}}"#, "a ".repeat(1100));
    assert_eq!(server.invoke(&over).status, 422);
    assert_eq!(server.invoke(r#"{"input": "Hi"}"#).status, 503);
}

#[test]
fn a_client_that_disconnects_frees_its_place() {
    let server = Server::start(&["--queue-capacity", "1"]);
    let busy = server
        .send("POST", "/invocations", &JSON, LONG_REQUEST.as_bytes())
        .unwrap();
    wait_until_busy();
    assert_eq!(
        server.invoke(r#"{"input": "Hi", "max_length": 4}"#).status,
        503
    );
    drop(busy);
    // The place frees and the long generation stops: a short request gets through quickly.
    let started = Instant::now();
    loop {
        let response = server.invoke(r#"{"input": "Hi", "max_length": 4}"#);
        if response.status == 200 {
            break;
        }
        assert_eq!(response.status, 503);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the place was never freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn deadline_ends_the_work_with_504() {
    let server = Server::start(&["--deadline-secs", "1"]);
    let started = Instant::now();
    let response = server.invoke(LONG_REQUEST);
    let elapsed = started.elapsed();
    assert_eq!(response.status, 504, "{response:?}");
    assert_eq!(response.error().1, "deadline_exceeded");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    // The worker stopped: the next request is served at once.
    let started = Instant::now();
    assert_eq!(
        server.invoke(r#"{"input": "Hi", "max_length": 4}"#).status,
        200
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let mut server = Server::start(&[]);
    let mut in_flight = server
        .send("POST", "/invocations", &JSON, br#"{"input": "Hello", "mode": "greedy", "max_length": 400, "num_return_sequences": 1}"#)
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    server.terminate();
    let response = read_response(&mut in_flight).unwrap();
    assert_eq!(response.status, 200, "the in-flight request completes");
    let texts: Vec<String> = serde_json::from_slice(&response.body).unwrap();
    assert!(texts[0].starts_with("Hello"));
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(
        server.try_request("GET", "/ping", &[], b"").is_err(),
        "no longer accepting"
    );
}

#[test]
fn shutdown_grace_period_is_bounded() {
    let mut server = Server::start(&["--shutdown-grace-secs", "1"]);
    let _stuck = server
        .send("POST", "/invocations", &JSON, LONG_REQUEST.as_bytes())
        .unwrap();
    wait_until_busy();
    let started = Instant::now();
    server.terminate();
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn sagemaker_port_variable_and_serve_argument() {
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port = free_port.to_string();
    let server = Server::start_with_env(&["serve"], &[("SAGEMAKER_BIND_TO_PORT", port.as_str())]);
    assert_eq!(server.port, free_port);
    assert_eq!(server.request("GET", "/ping", &[], b"").status, 200);
}

#[test]
fn bad_arguments_exit_non_zero_with_a_message() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gpt2-server"));
        command.args(args).env_remove("SAGEMAKER_BIND_TO_PORT");
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    let out = run(
        &["serve", "--model", "/nonexistent/model", "--port", "0"],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model"));
    let out = run(&["train"], &[]);
    assert!(!out.status.success());
    let out = run(&["--dtype", "q4"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("q4"));
    let out = run(&["--kv-dtype", "f8"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("f8"));
    let out = run(&[], &[("SAGEMAKER_BIND_TO_PORT", "not-a-port")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SAGEMAKER_BIND_TO_PORT"));
    let out = run(&["--port", "0"], &[("GPT2_ISA", "sse9")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("GPT2_ISA") && stderr.contains("portable"),
        "{stderr}"
    );
}

#[test]
fn gpt2_isa_pins_the_kernels_the_server_runs() {
    let server = Server::start_with_env(&[], &[("GPT2_ISA", "portable")]);
    // "model loaded" comes before "listening", which Server::start waited for.
    let lines = server.log_lines();
    let loaded = lines
        .iter()
        .find(|l| l.contains("model loaded"))
        .expect("a model loaded line");
    assert!(loaded.contains(r#""isa":"portable""#), "{loaded}");
}

#[test]
fn a_missing_model_directory_points_to_gpt2_download() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpt2-server"))
        .args(["serve", "--model", "/nonexistent/gpt2", "--port", "0"])
        .env_remove("SAGEMAKER_BIND_TO_PORT")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(
            "model directory /nonexistent/gpt2 does not exist; download a checkpoint with: \
             gpt2 download openai-community/gpt2 --to /nonexistent/gpt2"
        ),
        "{stderr}"
    );
}

#[test]
fn a_request_that_can_never_fit_the_kv_budget_is_a_422_naming_the_limit() {
    let server = Server::start(&["--kv-budget-mb", "1"]);
    let refused =
        server.invoke(r#"{"input": "Hi", "max_length": 1000, "num_return_sequences": 16}"#);
    assert_eq!(refused.status, 422);
    let (message, error_type) = refused.error();
    assert_eq!(error_type, "validation_error");
    assert!(
        message.contains("max_length") && message.contains("--kv-budget-mb"),
        "{message}"
    );
    assert_eq!(
        server.invoke(r#"{"input": "Hi", "max_length": 20}"#).status,
        200
    );
    assert!(server
        .log_lines()
        .iter()
        .any(|l| l.contains(r#""kv_budget_mb":1"#)));
}
