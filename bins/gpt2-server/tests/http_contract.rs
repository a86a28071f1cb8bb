//! Routes, answers, errors and logs of the built server.

mod support;

use gpt2_engine::Pipeline;
use support::Server;

#[test]
fn ping_and_execution_parameters() {
    let server = Server::start(&[]);
    let ping = server.request("GET", "/ping", &[], b"");
    assert_eq!(ping.status, 200);
    assert!(ping.body.is_empty());
    let params = server.request("GET", "/execution-parameters", &[], b"");
    assert_eq!(params.status, 200);
    let json = params.json();
    assert_eq!(json["BatchStrategy"], "SINGLE_RECORD");
    assert_eq!(json["MaxPayloadInMB"], 6);
    assert!(json["MaxConcurrentTransforms"].as_u64().unwrap() >= 1);
}

#[test]
fn invocations_answer_the_contract_on_both_paths() {
    let server = Server::start(&[]);
    let body = r#"{"input": "This is an input text", "seed": 11, "max_length": 20}"#;
    let expected = Pipeline::demo().generate_json(body.as_bytes()).unwrap();
    for path in [
        "/invocations",
        "/endpoints/gpt-2/invocations",
        "/endpoints/any-name/invocations",
    ] {
        let response = server.request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(response.status, 200, "{path}");
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert!(response
            .header("x-request-id")
            .is_some_and(|id| !id.is_empty()));
        let texts: Vec<String> = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(
            texts, expected,
            "{path}: the server answers what the library answers"
        );
        assert_eq!(texts.len(), 3);
        assert!(texts.iter().all(|t| t.starts_with("This is an input text")));
    }
}

#[test]
fn sagemaker_headers_and_charset_are_accepted() {
    let server = Server::start(&[]);
    let response = server.request(
        "POST",
        "/invocations",
        &[
            ("Content-Type", "application/json; charset=utf-8"),
            ("Accept", "application/json"),
            ("X-Amzn-SageMaker-Custom-Attributes", "trace=1,tenant=abc"),
            ("X-Amzn-SageMaker-Target-Model", "gpt2.tar.gz"),
            ("X-Something-Unknown", "yes"),
            ("X-Request-Id", "client-chosen-id-42"),
        ],
        br#"{"input": "Hi", "mode": "greedy", "max_length": 6, "num_return_sequences": 1}"#,
    );
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("x-request-id"), Some("client-chosen-id-42"));
    // No Content-Type at all is taken as JSON.
    let response = server.request(
        "POST",
        "/invocations",
        &[],
        br#"{"input": "Hi", "max_length": 4}"#,
    );
    assert_eq!(response.status, 200);
}

#[test]
fn every_error_is_json_with_the_right_status() {
    let server = Server::start(&[]);
    let json = [("Content-Type", "application/json")];
    // (method, path, headers, body, status, error_type, message fragment)
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        u16,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/invocations",
            json.to_vec(),
            b"{not json".to_vec(),
            400,
            "malformed_json",
            "JSON",
        ),
        (
            "POST",
            "/invocations",
            json.to_vec(),
            b"[1, 2]".to_vec(),
            400,
            "malformed_json",
            "object",
        ),
        (
            "POST",
            "/invocations",
            json.to_vec(),
            b"".to_vec(),
            400,
            "malformed_json",
            "JSON",
        ),
        (
            "POST",
            "/invocations",
            json.to_vec(),
            br#"{"max_length": 5}"#.to_vec(),
            422,
            "validation_error",
            "input",
        ),
        (
            "POST",
            "/invocations",
            json.to_vec(),
            br#"{"input": "x", "top_p": 0}"#.to_vec(),
            422,
            "validation_error",
            "top_p",
        ),
        (
            "POST",
            "/invocations",
            json.to_vec(),
            br#"{"input": "x", "mode": "fast"}"#.to_vec(),
            422,
            "validation_error",
            "greedy",
        ),
        (
            "POST",
            "/invocations",
            json.to_vec(),
            br#"{"input": "x", "max_length": 5000}"#.to_vec(),
            422,
            "validation_error",
            "n_positions",
        ),
        (
            "POST",
            "/invocations",
            json.to_vec(),
            br#"{"input": "x", "num_beams": 99}"#.to_vec(),
            422,
            "validation_error",
            "num_beams",
        ),
        (
            "POST",
            "/invocations",
            vec![("Content-Type", "text/csv")],
            b"a,b".to_vec(),
            415,
            "unsupported_media_type",
            "application/json",
        ),
        (
            "POST",
            "/invocations",
            json.to_vec(),
            vec![b' '; 6 * 1024 * 1024 + 1],
            413,
            "payload_too_large",
            "6 MB",
        ),
        (
            "GET",
            "/nowhere",
            vec![],
            vec![],
            404,
            "not_found",
            "/nowhere",
        ),
        (
            "POST",
            "/endpoints/x/other",
            json.to_vec(),
            b"{}".to_vec(),
            404,
            "not_found",
            "/endpoints/x/other",
        ),
        (
            "GET",
            "/invocations",
            vec![],
            vec![],
            405,
            "method_not_allowed",
            "GET",
        ),
        (
            "DELETE",
            "/ping",
            vec![],
            vec![],
            405,
            "method_not_allowed",
            "DELETE",
        ),
    ];
    for (method, path, headers, body, status, kind, needle) in cases {
        let response = server.request(method, path, &headers, &body);
        assert_eq!(
            response.status,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&response.body)
        );
        let (message, error_type) = response.error();
        assert_eq!(error_type, kind, "{method} {path}");
        assert!(message.contains(needle), "{method} {path}: {message}");
        assert!(response.header("x-request-id").is_some());
    }
}

#[test]
fn one_structured_log_line_per_request() {
    let server = Server::start(&[]);
    let response =
        server.invoke(r#"{"input": "Count the tokens", "mode": "greedy", "max_length": 9}"#);
    assert_eq!(response.status, 200);
    let id = response.header("x-request-id").unwrap().to_string();
    let bad = server.invoke(r#"{"input": "x", "top_k": -3}"#);
    let bad_id = bad.header("x-request-id").unwrap().to_string();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let lines: Vec<serde_json::Value> = server
        .log_lines()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ok: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["request_id"] == id.as_str())
        .collect();
    assert_eq!(ok.len(), 1, "{lines:?}");
    let line = ok[0];
    assert_eq!(line["status"], 200);
    assert_eq!(line["mode"], "greedy");
    assert_eq!(line["prompt_tokens"], 3);
    assert_eq!(line["generated_tokens"], 18, "3 sequences × 6 new tokens");
    for field in ["queue_ms", "generation_ms", "total_ms"] {
        assert!(line[field].is_u64(), "{field} in {line}");
    }
    let failed: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["request_id"] == bad_id.as_str())
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["status"], 422);
}

#[test]
fn expect_100_continue_is_refused_by_headers_before_any_body_is_invited() {
    use std::io::{Read, Write};
    let server = Server::start(&[]);
    for (content_type, length, status) in
        [("text/csv", 100, 415), ("application/json", 7 << 20, 413)]
    {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let head = format!(
            "POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n\
             Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        // No body is sent: the answer must come from the headers alone, without a 100 first.
        let mut answer = vec![0u8; 512];
        let read = stream.read(&mut answer).unwrap();
        let answer = String::from_utf8_lossy(&answer[..read]);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{content_type}: {answer}"
        );
    }
    // A valid upload is invited and served.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let body = br#"{"input": "Hi", "max_length": 4}"#;
    let head = format!(
        "POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = vec![0u8; 64];
    let read = stream.read(&mut interim).unwrap();
    assert!(String::from_utf8_lossy(&interim[..read]).starts_with("HTTP/1.1 100 Continue"));
    stream.write_all(body).unwrap();
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("HTTP/1.1 200 OK"), "{rest}");
}
