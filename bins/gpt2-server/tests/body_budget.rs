//! `--body-budget-mb`: the request bodies being received share one byte budget; a body past it is
//! read, discarded and answered 503. Through the built binary, over raw TCP.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{connect, read_response, HttpResponse, Server};

const MIB: usize = 1024 * 1024;

/// Sends the head of a `POST /invocations` that declares `length` body bytes.
fn start_upload(server: &Server, length: usize, extra_headers: &str) -> TcpStream {
    let mut stream = connect(server);
    write!(
        stream,
        "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Connection: close\r\nContent-Length: {length}\r\n{extra_headers}\r\n"
    )
    .unwrap();
    stream
}

/// A whole body of `length` bytes that is not JSON (so a body within the budget gets 400).
fn upload(server: &Server, length: usize) -> HttpResponse {
    let mut stream = start_upload(server, length, "");
    stream.write_all(&vec![b' '; length]).unwrap();
    read_response(&mut stream).unwrap()
}

fn reserved_bytes(server: &Server) -> f64 {
    let metrics = server.request("GET", "/metrics", &[], b"");
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("gpt2_request_body_reserved_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no reserved gauge in {text}"))
}

fn assert_over_budget(response: &HttpResponse) {
    assert_eq!(
        response.status,
        503,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.error().1, "overloaded");
    assert!(response.error().0.contains("--body-budget-mb"));
    assert_eq!(response.header("retry-after"), Some("1"));
    assert!(response.header("x-request-id").is_some());
}

#[test]
fn bodies_being_received_share_the_budget_and_give_it_back() {
    let server = Server::start(&["--body-budget-mb", "6"]);
    let metrics = server.request("GET", "/metrics", &[], b"");
    assert!(String::from_utf8_lossy(&metrics.body)
        .contains(&format!("gpt2_request_body_budget_bytes {}", 6 * MIB)));

    // A slow client holds 4 MiB of the 6 by declaring them.
    let mut slow = start_upload(&server, 4 * MIB, "");
    slow.write_all(b"   ").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(reserved_bytes(&server), (4 * MIB) as f64);

    // Another 4 MiB does not fit: read to its end, then refused (not reset).
    assert_over_budget(&upload(&server, 4 * MIB));
    // Nor does one without a declared length, 4 MiB in 64 KiB chunks.
    let mut chunked = connect(&server);
    chunked
        .write_all(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Connection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .unwrap();
    for _ in 0..64 {
        chunked.write_all(b"10000\r\n").unwrap();
        chunked.write_all(&vec![b' '; 64 * 1024]).unwrap();
        chunked.write_all(b"\r\n").unwrap();
    }
    chunked.write_all(b"0\r\n\r\n").unwrap();
    assert_over_budget(&read_response(&mut chunked).unwrap());
    // An upload that waits for 100 Continue is refused without being invited.
    let mut waiting = start_upload(&server, 4 * MIB, "Expect: 100-continue\r\n");
    let mut head = [0u8; 12];
    waiting.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 503", "no 100 Continue first");
    // Small bodies still fit beside the slow one.
    let small = server.invoke(r#"{"input": "Hi", "max_length": 4}"#);
    assert_eq!(small.status, 200);

    // The slow client finishes: its 4 MiB come back.
    slow.write_all(&vec![b' '; 4 * MIB - 3]).unwrap();
    assert_eq!(read_response(&mut slow).unwrap().status, 400);
    assert_eq!(reserved_bytes(&server), 0.0);
    assert_eq!(upload(&server, 4 * MIB).status, 400, "fits again");
}
