//! Configuration as platforms pass it: every flag's `GPT2_*` environment variable, SageMaker's
//! variables, precedence (flag, then environment, then default), and bounded numeric options
//! whose out-of-range values are usage errors (exit 2), from the flag or from the environment.
//!
//! The container's entrypoint behaviour (`serve`, `SAGEMAKER_BIND_TO_PORT`, `/opt/ml/model`
//! fallback, SIGTERM drain) is tested on the binary in `robustness.rs`
//! (`sagemaker_port_variable_and_serve_argument`, `sigterm_finishes_in_flight_requests_then_exits_zero`,
//! `bad_arguments_exit_non_zero_with_a_message`); this file does not repeat those.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Server, LONG_REQUEST};

const JSON: [(&str, &str); 1] = [("Content-Type", "application/json")];

/// Every variable the server reads for its configuration; removed from each child's environment
/// so that the test runner's own environment cannot leak in.
const CONFIG_VARIABLES: [&str; 16] = [
    "GPT2_MODEL_DIR",
    "GPT2_HOST",
    "GPT2_PORT",
    "GPT2_QUEUE_CAPACITY",
    "GPT2_DEADLINE_SECS",
    "GPT2_SHUTDOWN_GRACE_SECS",
    "GPT2_MAX_NUM_RETURN_SEQUENCES",
    "GPT2_MAX_NUM_BEAMS",
    "GPT2_DTYPE",
    "GPT2_KV_DTYPE",
    "GPT2_LOG_FORMAT",
    "GPT2_PREFILL_CHUNK_TOKENS",
    "GPT2_MAX_BATCH_ROWS",
    "SAGEMAKER_BIND_TO_PORT",
    "SAGEMAKER_MODEL_SERVER_TIMEOUT",
    "SAGEMAKER_MODEL_SERVER_WORKERS",
];

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpt2-server"));
    command.args(args).stdin(Stdio::null());
    for name in CONFIG_VARIABLES {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// Runs the server to its exit, which must come within `within` (a server that starts instead of
/// refusing its configuration is killed and the test fails). A nonexistent `--model` is not
/// passed here: the tests that expect a usage error pass one themselves, so that a configuration
/// wrongly accepted ends with exit 1 at once rather than a server that runs.
fn run_to_exit(args: &[&str], env: &[(&str, &str)], within: Duration) -> Output {
    let mut child = command(args, env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gpt2-server starts");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gpt2-server {args:?} with {env:?} did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    Output {
        status,
        stdout,
        stderr: reader.join().unwrap(),
    }
}

/// Asserts a usage error: exit code 2, nothing on stdout, and one line on stderr containing every
/// one of `needles`. Returns that line.
fn assert_usage_error(args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
    let out = run_to_exit(args, env, Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?} {env:?}: exit {:?}, stderr: {stderr}",
        out.status
    );
    assert!(out.stdout.is_empty(), "{args:?} {env:?}: stdout not empty");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "{args:?} {env:?}: no message");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "{args:?} {env:?}: {needle:?} not in the first line: {stderr}"
        );
    }
    lines[0].to_string()
}

/// Starts the server with only the given arguments and environment (nothing added, unlike
/// `Server::start_with_env`, which passes `--host`, `--port` and `--log-format` flags that would
/// override the variables under test). `GPT2_LOG_FORMAT=json` must be among `env` or `--log-format
/// json` among `args`: the `listening` line gives the port.
fn start_exactly(args: &[&str], env: &[(&str, &str)]) -> Server {
    let mut child = command(args, env)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("gpt2-server starts");
    let stderr = child.stderr.take().unwrap();
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    {
        let logs = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                    if json["message"] == "listening" {
                        let _ = port_tx.send(json.clone());
                    }
                }
                logs.lock().unwrap().push(line);
            }
        });
    }
    let listening = match port_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(listening) => listening,
        Err(_) => {
            let _ = child.kill();
            panic!(
                "no JSON listening line; logs: {:?}",
                logs.lock().unwrap().clone()
            );
        }
    };
    let addr = listening["addr"].as_str().unwrap().to_string();
    let port = addr.rsplit(':').next().unwrap().parse().unwrap();
    let server = Server { child, port, logs };
    assert!(
        addr.starts_with("127.0.0.1:"),
        "the tests listen on loopback only, got {addr}"
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(response) = server.try_request("GET", "/ping", &[], b"") {
            if response.status == 200 {
                return server;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the server never answered /ping");
}

/// The JSON log line with this message.
fn log_line(server: &Server, message: &str) -> serde_json::Value {
    server
        .log_lines()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|json| json["message"] == message)
        .unwrap_or_else(|| panic!("no {message:?} line in {:?}", server.log_lines()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn max_concurrent_transforms(server: &Server) -> u64 {
    let response = server.request("GET", "/execution-parameters", &[], b"");
    assert_eq!(response.status, 200);
    response.json()["MaxConcurrentTransforms"].as_u64().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Issue 11.7: numeric flags were unbounded.

/// `--deadline-secs 9223372036854775807` used to start a server whose every request panicked
/// (overflow adding the deadline to an `Instant`) while `/ping` stayed 200. It is now refused.
#[test]
fn a_deadline_that_overflows_an_instant_is_a_usage_error() {
    let line = assert_usage_error(
        &[
            "--deadline-secs",
            "9223372036854775807",
            "--model",
            "/nonexistent/model",
            "--port",
            "0",
        ],
        &[],
        &["--deadline-secs", "9223372036854775807", "1..=86400"],
    );
    assert!(line.starts_with("error:"), "{line}");
    // The largest accepted deadline serves requests.
    let server = Server::start(&["--deadline-secs", "86400"]);
    let response = server.invoke(r#"{"input": "Hi", "max_length": 4, "num_return_sequences": 1}"#);
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(log_line(&server, "listening")["deadline_secs"], 86400);
}

/// `--queue-capacity 2305843009213693952` used to panic at start (tokio's semaphore limit) and
/// exit 101. It is now refused.
#[test]
fn a_queue_capacity_beyond_the_semaphore_is_a_usage_error() {
    assert_usage_error(
        &[
            "--queue-capacity",
            "2305843009213693952",
            "--model",
            "/nonexistent/model",
            "--port",
            "0",
        ],
        &[],
        &["--queue-capacity", "2305843009213693952", "1..=65536"],
    );
    let server = Server::start(&["--queue-capacity", "65536"]);
    assert_eq!(max_concurrent_transforms(&server), 65536);
}

#[test]
fn every_numeric_flag_is_bounded() {
    for (flag, value, range) in [
        ("--queue-capacity", "0", "1..=65536"),
        ("--queue-capacity", "65537", "1..=65536"),
        ("--deadline-secs", "0", "1..=86400"),
        ("--deadline-secs", "86401", "1..=86400"),
        (
            "--deadline-secs",
            "18446744073709551616",
            "number too large",
        ),
        ("--shutdown-grace-secs", "3601", "0..=3600"),
        ("--shutdown-grace-secs=-1", "", "invalid digit"),
        ("--max-num-return-sequences", "0", "1..=1024"),
        ("--max-num-return-sequences", "1025", "1..=1024"),
        ("--max-num-beams", "0", "1..=1024"),
        ("--max-num-beams", "1025", "1..=1024"),
        ("--port", "65536", "0..=65535"),
        ("--prefill-chunk-tokens", "0", "1..=8192"),
        ("--prefill-chunk-tokens", "8193", "1..=8192"),
        ("--max-prefill-stall-percent", "0", "1..=10000"),
        ("--max-prefill-stall-percent", "10001", "1..=10000"),
        ("--max-batch-rows", "0", "1..=4096"),
        ("--max-batch-rows", "4097", "1..=4096"),
    ] {
        let args: Vec<&str> = [flag, value, "--model", "/nonexistent/model"]
            .into_iter()
            .filter(|word| !word.is_empty())
            .collect();
        let flag = flag.split('=').next().unwrap();
        assert_usage_error(&args, &[], &[flag, range]);
    }
}

// ---------------------------------------------------------------------------------------------
// Issue 13.3: configuration through the environment.

#[test]
fn help_lists_every_environment_variable() {
    let out = run_to_exit(&["--help"], &[], Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for name in CONFIG_VARIABLES {
        assert!(help.contains(name), "--help does not name {name}:\n{help}");
    }
    for name in ["RUST_LOG", "RAYON_NUM_THREADS", "GPT2_ISA"] {
        assert!(help.contains(name), "--help does not name {name}:\n{help}");
    }
}

/// The compute threads are named `gpt2-compute-N` (what `top -H` and `perf` show), and
/// `RAYON_NUM_THREADS` sets how many there are.
#[cfg(target_os = "linux")]
#[test]
fn the_compute_threads_are_named_and_counted_by_rayon_num_threads() {
    let server = Server::start_with_env(&[], &[("RAYON_NUM_THREADS", "3")]);
    let response = server.invoke(r#"{"input": "Hi", "max_length": 4, "num_return_sequences": 1}"#);
    assert_eq!(response.status, 200, "{response:?}");
    let tasks = format!("/proc/{}/task", server.child.id());
    let mut names: Vec<String> = std::fs::read_dir(&tasks)
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .filter(|name| name.starts_with("gpt2-compute-"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["gpt2-compute-0", "gpt2-compute-1", "gpt2-compute-2"]
    );
}

/// No flag at all: the host, port, log format, model, storage formats, queue, deadline, grace
/// and request limits all come from the environment.
#[test]
fn every_option_can_come_from_the_environment() {
    let port = free_port();
    let port_text = port.to_string();
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/models/tiny-safetensors"
    );
    let server = start_exactly(
        &[],
        &[
            ("GPT2_HOST", "127.0.0.1"),
            ("GPT2_PORT", &port_text),
            ("GPT2_LOG_FORMAT", "json"),
            ("GPT2_MODEL_DIR", model),
            ("GPT2_DTYPE", "q8_0"),
            ("GPT2_KV_DTYPE", "f16"),
            ("GPT2_QUEUE_CAPACITY", "7"),
            ("GPT2_DEADLINE_SECS", "42"),
            ("GPT2_SHUTDOWN_GRACE_SECS", "3"),
            ("GPT2_MAX_NUM_RETURN_SEQUENCES", "2"),
            ("GPT2_MAX_NUM_BEAMS", "3"),
            ("GPT2_PREFILL_CHUNK_TOKENS", "128"),
            ("GPT2_MAX_PREFILL_STALL_PERCENT", "150"),
            ("GPT2_MAX_BATCH_ROWS", "5"),
        ],
    );
    assert_eq!(server.port, port);
    let loaded = log_line(&server, "model loaded");
    assert!(
        loaded["model"]
            .as_str()
            .unwrap()
            .contains("tiny-safetensors"),
        "{loaded}"
    );
    assert_eq!(loaded["dtype"], "Q8_0", "{loaded}");
    assert_eq!(loaded["kv_dtype"], "F16", "{loaded}");
    let listening = log_line(&server, "listening");
    assert_eq!(listening["queue_capacity"], 7, "{listening}");
    assert_eq!(listening["deadline_secs"], 42, "{listening}");
    assert_eq!(listening["shutdown_grace_secs"], 3, "{listening}");
    assert_eq!(listening["prefill_chunk_tokens"], 128, "{listening}");
    assert_eq!(listening["max_prefill_stall_percent"], 150, "{listening}");
    assert_eq!(listening["max_batch_rows"], 5, "{listening}");
    assert_eq!(max_concurrent_transforms(&server), 7);
    let too_many = server.invoke(r#"{"input": "Hi", "num_return_sequences": 3}"#);
    assert_eq!(too_many.status, 422, "{too_many:?}");
    assert!(too_many.error().0.contains("num_return_sequences"));
    let too_wide = server.invoke(r#"{"input": "Hi", "mode": "beam", "num_beams": 4}"#);
    assert_eq!(too_wide.status, 422, "{too_wide:?}");
    assert!(too_wide.error().0.contains("num_beams"));
    // The tiny checkpoint's vocabulary is GPT-2's first 512 tokens: "a", " b", " c".
    let fine = server.invoke(
        r#"{"input": "a b c", "mode": "beam", "num_beams": 3, "num_return_sequences": 2, "max_length": 8}"#,
    );
    assert_eq!(fine.status, 200, "{fine:?}");
}

#[test]
fn a_queue_capacity_from_the_environment_refuses_the_second_request() {
    let server = Server::start_with_env(&[], &[("GPT2_QUEUE_CAPACITY", "1")]);
    assert_eq!(max_concurrent_transforms(&server), 1);
    let _busy = server
        .send("POST", "/invocations", &JSON, LONG_REQUEST.as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let refused = server.invoke(r#"{"input": "Hi"}"#);
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.error().1, "overloaded");
}

#[test]
fn a_deadline_from_the_environment_ends_the_work_with_504() {
    let server = Server::start_with_env(&[], &[("GPT2_DEADLINE_SECS", "1")]);
    let started = Instant::now();
    let response = server.invoke(LONG_REQUEST);
    assert_eq!(response.status, 504, "{response:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_grace_period_from_the_environment_bounds_the_shutdown() {
    let mut server = Server::start_with_env(&[], &[("GPT2_SHUTDOWN_GRACE_SECS", "1")]);
    let _stuck = server
        .send("POST", "/invocations", &JSON, LONG_REQUEST.as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    server.terminate();
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_flag_wins_over_its_environment_variable() {
    let server = Server::start_with_env(
        &["--queue-capacity", "5", "--deadline-secs", "9"],
        &[("GPT2_QUEUE_CAPACITY", "3"), ("GPT2_DEADLINE_SECS", "8")],
    );
    assert_eq!(max_concurrent_transforms(&server), 5);
    assert_eq!(log_line(&server, "listening")["deadline_secs"], 9);
    // The flag wins even over an invalid variable, which is then not read at all.
    let server = Server::start_with_env(
        &["--queue-capacity=4", "--dtype", "f32"],
        &[("GPT2_QUEUE_CAPACITY", "lots"), ("GPT2_DTYPE", "q4")],
    );
    assert_eq!(max_concurrent_transforms(&server), 4);
    assert_eq!(log_line(&server, "model loaded")["dtype"], "F32");
}

#[test]
fn an_empty_variable_counts_as_unset() {
    let server = Server::start_with_env(
        &[],
        &[
            ("GPT2_QUEUE_CAPACITY", ""),
            ("GPT2_DTYPE", " "),
            ("GPT2_MODEL_DIR", ""),
            ("SAGEMAKER_MODEL_SERVER_TIMEOUT", ""),
        ],
    );
    assert_eq!(max_concurrent_transforms(&server), 64);
    assert_eq!(log_line(&server, "model loaded")["dtype"], "F32");
    assert_eq!(log_line(&server, "listening")["deadline_secs"], 60);
}

#[test]
fn a_bad_environment_value_exits_2_naming_the_variable() {
    for (name, value, reason) in [
        ("GPT2_QUEUE_CAPACITY", "lots", "invalid digit"),
        ("GPT2_QUEUE_CAPACITY", "0", "1..=65536"),
        ("GPT2_QUEUE_CAPACITY", "2305843009213693952", "1..=65536"),
        ("GPT2_DEADLINE_SECS", "9223372036854775807", "1..=86400"),
        ("GPT2_SHUTDOWN_GRACE_SECS", "3601", "0..=3600"),
        ("GPT2_MAX_NUM_RETURN_SEQUENCES", "1025", "1..=1024"),
        ("GPT2_MAX_NUM_BEAMS", "0", "1..=1024"),
        ("GPT2_DTYPE", "q4", "q8_0"),
        ("GPT2_KV_DTYPE", "f8", "f16"),
        ("GPT2_LOG_FORMAT", "xml", "text, json"),
        ("GPT2_HOST", "localhost", "IP address"),
        ("GPT2_PORT", "70000", "0..=65535"),
        ("SAGEMAKER_BIND_TO_PORT", "not-a-port", "port"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "0", "1..=86400"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "soon", "1..=86400"),
    ] {
        let line = assert_usage_error(
            &["--model", "/nonexistent/model"],
            &[(name, value)],
            &[name, value, reason],
        );
        assert!(line.starts_with("error: "), "{line}");
        let out = run_to_exit(
            &["--model", "/nonexistent/model"],
            &[(name, value)],
            Duration::from_secs(20),
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).lines().count(),
            1,
            "{name}={value}: one line"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// SageMaker's variables.

/// `--port`, then `SAGEMAKER_BIND_TO_PORT` (the platform's requirement), then `GPT2_PORT`.
#[test]
fn port_precedence() {
    let (sagemaker, gpt2, flag) = (free_port(), free_port(), free_port());
    let (sagemaker_text, gpt2_text, flag_text) =
        (sagemaker.to_string(), gpt2.to_string(), flag.to_string());
    let base = [("GPT2_HOST", "127.0.0.1"), ("GPT2_LOG_FORMAT", "json")];

    let server = start_exactly(&["serve"], &[base[0], base[1], ("GPT2_PORT", &gpt2_text)]);
    assert_eq!(server.port, gpt2);
    drop(server);

    let server = start_exactly(
        &["serve"],
        &[
            base[0],
            base[1],
            ("GPT2_PORT", &gpt2_text),
            ("SAGEMAKER_BIND_TO_PORT", &sagemaker_text),
        ],
    );
    assert_eq!(server.port, sagemaker);
    drop(server);

    let server = start_exactly(
        &["serve", "--port", &flag_text],
        &[
            base[0],
            base[1],
            ("GPT2_PORT", &gpt2_text),
            ("SAGEMAKER_BIND_TO_PORT", &sagemaker_text),
        ],
    );
    assert_eq!(server.port, flag);
}

/// `SAGEMAKER_MODEL_SERVER_TIMEOUT` is the deadline when neither `--deadline-secs` nor
/// `GPT2_DEADLINE_SECS` is given.
#[test]
fn sagemaker_model_server_timeout_is_the_default_deadline() {
    let server = Server::start_with_env(&[], &[("SAGEMAKER_MODEL_SERVER_TIMEOUT", "1")]);
    assert_eq!(log_line(&server, "listening")["deadline_secs"], 1);
    let started = Instant::now();
    let response = server.invoke(LONG_REQUEST);
    assert_eq!(response.status, 504, "{response:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(server);

    let server = Server::start_with_env(
        &[],
        &[
            ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "1"),
            ("GPT2_DEADLINE_SECS", "30"),
        ],
    );
    assert_eq!(log_line(&server, "listening")["deadline_secs"], 30);
    drop(server);

    let server = Server::start_with_env(
        &["--deadline-secs", "20"],
        &[
            ("SAGEMAKER_MODEL_SERVER_TIMEOUT", "1"),
            ("GPT2_DEADLINE_SECS", "30"),
        ],
    );
    assert_eq!(log_line(&server, "listening")["deadline_secs"], 20);
}

/// One inference worker batches every request: SageMaker's worker count does not apply, and
/// the server says so rather than silently ignoring it.
#[test]
fn sagemaker_model_server_workers_is_ignored_with_a_warning() {
    let server = Server::start_with_env(&[], &[("SAGEMAKER_MODEL_SERVER_WORKERS", "4")]);
    let warning = server
        .log_lines()
        .into_iter()
        .find(|line| line.contains("SAGEMAKER_MODEL_SERVER_WORKERS"))
        .expect("a line about SAGEMAKER_MODEL_SERVER_WORKERS");
    assert!(
        warning.contains("WARN") && warning.contains("ignored"),
        "{warning}"
    );
    assert_eq!(
        server.invoke(r#"{"input": "Hi", "max_length": 4}"#).status,
        200
    );
}
