//! Requests hyper's HTTP/1 parser would refuse with a bare status (bad bytes, a target or a head
//! too long, garbage, a bad `Content-Length` ...) get the JSON error, an `x-request-id`, a log
//! line and a count like every other answer; and a request followed at once by the client's FIN
//! is logged. Through the built binary, over raw TCP.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use support::{connect, read_response, HttpResponse, Server};

/// Sends raw bytes on a new connection and reads the answer to the end of the connection.
fn send_raw(server: &Server, bytes: &[u8]) -> HttpResponse {
    let mut stream = connect(server);
    stream.write_all(bytes).unwrap();
    read_response(&mut stream).expect("an HTTP answer")
}

/// Reads one answer with a `Content-Length` from a connection that stays open.
fn read_one(stream: &mut TcpStream) -> HttpResponse {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed mid-answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .expect("a Content-Length");
    let mut body = vec![0; length];
    stream.read_exact(&mut body).unwrap();
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// Asserts the JSON error of a refused head and returns its message.
fn assert_refused(response: &HttpResponse, status: u16, error_type: &str) -> String {
    assert_eq!(response.status, status, "{response:?}");
    let (message, kind) = response.error();
    assert_eq!(kind, error_type, "{response:?}");
    let id = response.header("x-request-id").expect("an x-request-id");
    assert_eq!(id.len(), 16, "{id}");
    assert_eq!(response.header("connection"), Some("close"));
    message
}

/// The server's log line for `request_id`, waiting a little for it.
fn log_line(server: &Server, request_id: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let found = server.log_lines().into_iter().find_map(|line| {
            let json: serde_json::Value = serde_json::from_str(&line).ok()?;
            (json["request_id"] == request_id).then_some(json)
        });
        if let Some(json) = found {
            return json;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no log line for {request_id}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_header_value_with_a_control_byte_gets_a_logged_json_400() {
    let server = Server::start(&[]);
    let response = send_raw(
        &server,
        b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
    );
    let message = assert_refused(&response, 400, "bad_request");
    assert_eq!(
        message,
        "a header value contains bytes that are not allowed"
    );
    let line = log_line(&server, response.header("x-request-id").unwrap());
    assert_eq!(line["status"], 400, "{line}");
    assert_eq!(line["error_type"], "bad_request", "{line}");
    assert_eq!(line["route"], "-", "{line}");
    assert_eq!(line["error"], message.as_str(), "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
}

#[test]
fn a_20_kib_target_gets_a_json_414() {
    let server = Server::start(&[]);
    let target = format!("/{}", "a".repeat(20 * 1024));
    let response = send_raw(
        &server,
        format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    );
    let message = assert_refused(&response, 414, "uri_too_long");
    assert_eq!(message, "the request target is longer than 8192 bytes");
}

#[test]
fn too_many_headers_or_a_huge_one_get_a_json_431() {
    let server = Server::start(&[]);
    let mut many = String::from("GET /ping HTTP/1.1\r\nHost: x\r\n");
    for i in 0..200 {
        many.push_str(&format!("X-Header-{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let response = send_raw(&server, many.as_bytes());
    let message = assert_refused(&response, 431, "request_header_fields_too_large");
    assert_eq!(message, "the request has more than 100 headers");

    let huge = format!(
        "GET /ping HTTP/1.1\r\nHost: x\r\nX-Huge: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let response = send_raw(&server, huge.as_bytes());
    let message = assert_refused(&response, 431, "request_header_fields_too_large");
    assert_eq!(message, "the request head is larger than 65536 bytes");
}

#[test]
fn garbage_versions_and_bad_framing_get_json_400s() {
    let server = Server::start(&[]);
    for (request, message) in [
        (
            &b"GARBAGE\r\n\r\n"[..],
            "the request line is malformed: expected METHOD TARGET HTTP/1.1",
        ),
        (
            b"HELLO WORLD\r\n\r\n",
            "the request line is malformed: its target is empty, contains bytes that are not \
             allowed, or is not followed by the HTTP version",
        ),
        (
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
            "the request line is malformed: expected METHOD TARGET HTTP/1.1",
        ),
        (
            b"GET /ping HTTP/1.2\r\nHost: x\r\n\r\n",
            "the HTTP version is not supported: use HTTP/1.1 (or 1.0)",
        ),
        (
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "HTTP/2 with prior knowledge is not supported: use HTTP/1.1",
        ),
        (
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
              Content-Length: 7\r\n\r\n{\"a\":1}",
            "Content-Length appears more than once with different values",
        ),
        (
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "Content-Length is not a decimal number of bytes",
        ),
        (
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            "Transfer-Encoding must end with chunked",
        ),
        (
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
              Content-Length: 5\r\n\r\n0\r\n\r\n",
            "a request must not have both Transfer-Encoding and Content-Length",
        ),
    ] {
        let response = send_raw(&server, request);
        assert_eq!(assert_refused(&response, 400, "bad_request"), message);
    }
}

#[test]
fn a_bad_request_after_a_good_one_on_the_same_connection_gets_its_json_400() {
    let server = Server::start(&[]);
    let body = r#"{"input": "Hello", "mode": "greedy", "max_length": 6}"#;
    let mut stream = connect(&server);
    write!(
        stream,
        "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}GET /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n",
        body.len()
    )
    .unwrap();
    let first = read_one(&mut stream);
    assert_eq!(first.status, 200, "{first:?}");
    assert!(first.json()[0].as_str().unwrap().starts_with("Hello"));
    let second = read_response(&mut stream).unwrap();
    let message = assert_refused(&second, 400, "bad_request");
    assert_eq!(message, "Content-Length is not a decimal number of bytes");
    assert_ne!(first.header("x-request-id"), second.header("x-request-id"));
}

#[test]
fn a_chunked_request_then_a_ping_on_the_same_connection_are_both_answered() {
    let server = Server::start(&[]);
    let mut request = String::from(
        "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n",
    );
    for piece in [
        r#"{"input": "#,
        r#""Hi", "mode": "greedy", "ma"#,
        r#"x_length": 4}"#,
    ] {
        request.push_str(&format!("{:X};ext=1\r\n{piece}\r\n", piece.len()));
    }
    request.push_str("0\r\nX-Trailer: yes\r\n\r\nGET /ping HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut stream = connect(&server);
    stream.write_all(request.as_bytes()).unwrap();
    let first = read_one(&mut stream);
    assert_eq!(first.status, 200, "{first:?}");
    assert!(first.json()[0].as_str().unwrap().starts_with("Hi"));
    let second = read_one(&mut stream);
    assert_eq!(second.status, 200, "{second:?}");
}

#[test]
fn a_client_cannot_forge_the_synthetic_request() {
    let server = Server::start(&["--api-key", "secret"]);
    let forged = format!("{:032x} header-value", 7u128);
    let response = send_raw(
        &server,
        format!(
            "GET /__gpt2_head_error HTTP/1.1\r\nHost: x\r\nx-gpt2-head-error: {forged}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    // An ordinary request: behind authentication like every path but /ping.
    assert_eq!(response.status, 401, "{response:?}");
    let response = send_raw(
        &server,
        format!(
            "GET /ping HTTP/1.1\r\nHost: x\r\nx-gpt2-head-error: {forged}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(response.status, 200, "{response:?}");
    // A refused head is answered before authentication, which never sees it.
    let response = send_raw(&server, b"GET /v1/models HTTP/1.1\r\nX: \x7f\r\n\r\n");
    assert_refused(&response, 400, "bad_request");
}

#[test]
fn refused_heads_are_counted_in_the_metrics() {
    let server = Server::start(&[]);
    for _ in 0..2 {
        send_raw(&server, b"GET / HTTP/1.1\r\nX-Big: \x01\r\n\r\n");
    }
    let metrics = server.request("GET", "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&metrics.body);
    let line = text
        .lines()
        .find(|l| l.starts_with("gpt2_requests_total") && l.contains(r#"route="-""#))
        .unwrap_or_else(|| panic!("no count of refused heads in {text}"));
    assert!(line.contains(r#"status="400""#), "{line}");
    assert!(line.ends_with(" 2"), "{line}");
}

/// reliability.md, finding 4: a request followed at once by the client's FIN was often dropped
/// by hyper before its handler ran, with no log line.
#[test]
fn requests_followed_at_once_by_the_clients_fin_are_all_logged_as_abandoned() {
    let server = Server::start(&[]);
    let body = r#"{"input": "Hello", "max_length": 50}"#;
    for _ in 0..20 {
        let mut stream = connect(&server);
        stream
            .write_all(
                format!(
                    "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    }
    let abandoned = || {
        server
            .log_lines()
            .iter()
            .filter(|l| l.contains(r#""status":499"#) && l.contains("client_disconnected"))
            .count()
    };
    let started = Instant::now();
    while abandoned() < 20 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(abandoned(), 20, "{:#?}", server.log_lines());
}
