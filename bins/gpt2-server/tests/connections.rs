//! Slow, idle, half-closed and too many clients, and shutdown with such clients connected:
//! through the built binary, over raw TCP.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{connect, read_response, Server, LONG_REQUEST};

/// Reads until the server closes the connection; returns what it sent and how long that took.
fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    (
        String::from_utf8_lossy(&received).into_owned(),
        started.elapsed(),
    )
}

/// Reads one answer to `GET /ping` (empty body) from a kept-alive connection; returns its status
/// line.
fn read_ping_answer(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed mid-answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(
        head.to_ascii_lowercase().contains("content-length: 0"),
        "{head}"
    );
    head.lines().next().unwrap_or_default().to_string()
}

/// `count` kept-alive connections, each answered once, so that the server holds a slot for each.
fn hold_kept_alive(server: &Server, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|_| {
            let mut stream = connect(server);
            stream
                .write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            assert!(read_ping_answer(&mut stream).starts_with("HTTP/1.1 200"));
            stream
        })
        .collect()
}

fn ping_ms(server: &Server) -> u128 {
    let started = Instant::now();
    assert_eq!(server.request("GET", "/ping", &[], b"").status, 200);
    started.elapsed().as_millis()
}

#[test]
fn slow_headers_and_idle_connections_are_closed_after_the_header_timeout() {
    let server = Server::start(&["--header-timeout-secs", "1"]);
    // Slowloris: a request line and one header, then nothing.
    let mut slow = connect(&server);
    slow.write_all(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // Idle: connected, never sends a byte.
    let mut idle = connect(&server);
    // Kept alive after one request, then silent.
    let mut kept = connect(&server);
    kept.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let first = read_response(&mut kept).unwrap();
    assert_eq!(first.status, 200);
    for (name, stream) in [
        ("slow", &mut slow),
        ("idle", &mut idle),
        ("kept-alive", &mut kept),
    ] {
        let (_, waited) = read_until_closed(stream);
        assert!(
            waited < Duration::from_secs(5),
            "{name} connection held {waited:?}"
        );
    }
    assert!(ping_ms(&server) < 100);
}

#[test]
fn a_stalled_body_gets_408_after_the_body_timeout() {
    let server = Server::start(&["--body-timeout-secs", "1"]);
    let mut stream = connect(&server);
    stream
        .write_all(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"input\": ",
        )
        .unwrap();
    let started = Instant::now();
    let response = read_response(&mut stream).unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(response.status, 408);
    assert_eq!(response.error().1, "request_timeout");
}

#[test]
fn past_the_connection_cap_ping_still_answers_and_the_rest_get_503() {
    let server = Server::start(&["--max-connections", "4", "--header-timeout-secs", "60"]);
    // Four kept-alive connections, each answered once: the server holds them in its four slots.
    let held = hold_kept_alive(&server, 4);
    assert!(ping_ms(&server) < 100, "ping answers on the overflow pool");
    let ping = server.request("GET", "/ping", &[("X-Request-Id", "overflow-1")], b"");
    assert_eq!(ping.header("x-request-id"), Some("overflow-1"));
    let refused = server.invoke(r#"{"input": "Hi", "max_length": 4}"#);
    assert!(refused.header("x-request-id").is_some());
    assert_eq!(refused.status, 503);
    assert_eq!(refused.error().1, "overloaded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    drop(held);
    // The slots free as the clients leave.
    let started = Instant::now();
    while server.invoke(r#"{"input": "Hi", "max_length": 4}"#).status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "slots were never freed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn idle_and_half_sent_connections_do_not_hold_shutdown() {
    let mut server = Server::start(&["--shutdown-grace-secs", "20", "--header-timeout-secs", "60"]);
    let mut half_sent = connect(&server);
    half_sent
        .write_all(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Len")
        .unwrap();
    let _idle = connect(&server);
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    server.terminate();
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for clients with nothing in flight",
        started.elapsed()
    );
}

#[test]
fn requests_dropped_at_the_end_of_the_grace_period_are_logged_as_such_before_stopped() {
    let mut server = Server::start(&["--shutdown-grace-secs", "1"]);
    let _busy = server
        .send(
            "POST",
            "/invocations",
            &[("Content-Type", "application/json")],
            LONG_REQUEST.as_bytes(),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    server.terminate();
    assert_eq!(server.wait_exit(Duration::from_secs(15)), Some(0));
    std::thread::sleep(Duration::from_millis(200));
    let lines = server.log_lines();
    let dropped = lines
        .iter()
        .position(|l| l.contains("shutdown grace period ended"))
        .unwrap_or_else(|| panic!("no dropped line: {lines:#?}"));
    let stopped = lines
        .iter()
        .position(|l| l.contains(r#""message":"stopped""#))
        .unwrap_or_else(|| panic!("no stopped line: {lines:#?}"));
    assert!(dropped < stopped, "{lines:#?}");
    assert!(
        lines[dropped].contains(r#""status":503"#),
        "{}",
        lines[dropped]
    );
    assert!(
        !lines.iter().any(|l| l.contains("client_disconnected")),
        "{lines:#?}"
    );
}

#[test]
fn with_the_overflow_pool_full_of_idle_clients_a_new_ping_connection_still_answers() {
    let server = Server::start(&["--max-connections", "2", "--header-timeout-secs", "60"]);
    let _held = hold_kept_alive(&server, 2);
    // More idle clients than the 64 overflow slots: each would hold one for 2 s.
    let _idle: Vec<TcpStream> = (0..80).map(|_| connect(&server)).collect();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let ping = server
            .try_request("GET", "/ping", &[], b"")
            .expect("a new /ping connection is answered, not closed");
        assert_eq!(ping.status, 200);
    }
}

#[test]
fn a_half_closed_client_is_answered_with_serve_half_closed_and_dropped_without() {
    let request = |server: &Server| {
        let body = r#"{"input": "Hello", "mode": "greedy", "max_length": 8}"#;
        let mut stream = connect(server);
        write!(
            stream,
            "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        read_until_closed(&mut stream).0
    };
    let serving = Server::start(&["--serve-half-closed"]);
    let answer = request(&serving);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("Hello"), "{answer}");

    let default = Server::start(&[]);
    assert_eq!(
        request(&default),
        "",
        "the end of input means the client left"
    );
}
