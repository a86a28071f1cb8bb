//! Why a request head was refused, the synthetic request that takes its place, and the answer
//! to that request.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tracing::info;

use super::scan::{MAX_HEADERS, MAX_HEAD_BYTES, MAX_TARGET_BYTES};
use crate::api_error::ApiError;

/// The path of the synthetic request that stands for a refused head.
const REFUSED_PATH: &str = "/__gpt2_head_error";
/// The header of the synthetic request: the nonce, a space, and the refusal's token.
const REFUSED_HEADER: &str = "x-gpt2-head-error";

/// Why a request head was refused. Each is answered with the status and message hyper's parser
/// would have had a reason for, as an [`ApiError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The request line is not `METHOD TARGET HTTP/1.x`.
    RequestLine,
    /// The target is empty or has bytes a request target may not have.
    Target,
    /// The target does not parse as a URI.
    TargetSyntax,
    /// A line ends in a bare CR, or text follows the HTTP version.
    LineEnd,
    /// A header name is empty or has bytes a token may not have.
    HeaderName,
    /// A header value has control bytes.
    HeaderValue,
    /// The target is longer than [`MAX_TARGET_BYTES`].
    TargetTooLong,
    /// More than [`MAX_HEADERS`] header lines.
    TooManyHeaders,
    /// The head is longer than [`MAX_HEAD_BYTES`].
    HeadTooLarge,
    /// A `Content-Length` that is not a plain decimal number.
    ContentLength,
    /// Two `Content-Length`s that differ.
    ContentLengths,
    /// `Transfer-Encoding` whose last coding is not `chunked`.
    TransferEncoding,
    /// `Transfer-Encoding` in an HTTP/1.0 request.
    TransferEncodingHttp10,
    /// Both `Transfer-Encoding` and `Content-Length` (how request smuggling starts).
    LengthAndEncoding,
    /// A well-formed HTTP version other than 1.0 and 1.1.
    Version,
    /// The HTTP/2 connection preface (prior knowledge).
    Http2,
}

impl Refusal {
    pub(super) const ALL: [Refusal; 16] = [
        Refusal::RequestLine,
        Refusal::Target,
        Refusal::TargetSyntax,
        Refusal::LineEnd,
        Refusal::HeaderName,
        Refusal::HeaderValue,
        Refusal::TargetTooLong,
        Refusal::TooManyHeaders,
        Refusal::HeadTooLarge,
        Refusal::ContentLength,
        Refusal::ContentLengths,
        Refusal::TransferEncoding,
        Refusal::TransferEncodingHttp10,
        Refusal::LengthAndEncoding,
        Refusal::Version,
        Refusal::Http2,
    ];

    /// The word the synthetic request carries.
    fn token(self) -> &'static str {
        match self {
            Refusal::RequestLine => "request-line",
            Refusal::Target => "target",
            Refusal::TargetSyntax => "target-syntax",
            Refusal::LineEnd => "line-end",
            Refusal::HeaderName => "header-name",
            Refusal::HeaderValue => "header-value",
            Refusal::TargetTooLong => "target-too-long",
            Refusal::TooManyHeaders => "too-many-headers",
            Refusal::HeadTooLarge => "head-too-large",
            Refusal::ContentLength => "content-length",
            Refusal::ContentLengths => "content-lengths",
            Refusal::TransferEncoding => "transfer-encoding",
            Refusal::TransferEncodingHttp10 => "transfer-encoding-http10",
            Refusal::LengthAndEncoding => "length-and-encoding",
            Refusal::Version => "version",
            Refusal::Http2 => "http2",
        }
    }

    fn from_token(token: &[u8]) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|refusal| refusal.token().as_bytes() == token)
    }

    /// The status hyper would have answered with, and its `error_type`: the reason phrase in
    /// snake case, as the other errors name theirs. An unknown version gets hyper's 400, not 505:
    /// whatever a client sends, its mistakes stay 4xx, out of the server errors that alerts and
    /// the load-and-fault script count.
    fn answer(self) -> (StatusCode, &'static str) {
        match self {
            Refusal::TargetTooLong => (StatusCode::URI_TOO_LONG, "uri_too_long"),
            Refusal::TooManyHeaders | Refusal::HeadTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large",
            ),
            _ => (StatusCode::BAD_REQUEST, "bad_request"),
        }
    }

    /// The status of the answer.
    pub fn status(self) -> StatusCode {
        self.answer().0
    }

    /// The `error_type` of the answer.
    pub fn error_type(self) -> &'static str {
        self.answer().1
    }

    /// What was wrong, for the client and the log.
    pub fn message(self) -> String {
        match self {
            Refusal::RequestLine => {
                "the request line is malformed: expected METHOD TARGET HTTP/1.1".into()
            }
            Refusal::Target => {
                "the request line is malformed: its target is empty, contains bytes that are \
                 not allowed, or is not followed by the HTTP version"
                    .into()
            }
            Refusal::TargetSyntax => "the request target is not a valid URI".into(),
            Refusal::LineEnd => {
                "a line of the request head is malformed (a bare CR, or text after the HTTP \
                 version)"
                    .into()
            }
            Refusal::HeaderName => {
                "a header name is empty or contains bytes that are not allowed".into()
            }
            Refusal::HeaderValue => "a header value contains bytes that are not allowed".into(),
            Refusal::TargetTooLong => {
                format!("the request target is longer than {MAX_TARGET_BYTES} bytes")
            }
            Refusal::TooManyHeaders => format!("the request has more than {MAX_HEADERS} headers"),
            Refusal::HeadTooLarge => {
                format!("the request head is larger than {MAX_HEAD_BYTES} bytes")
            }
            Refusal::ContentLength => "Content-Length is not a decimal number of bytes".into(),
            Refusal::ContentLengths => {
                "Content-Length appears more than once with different values".into()
            }
            Refusal::TransferEncoding => "Transfer-Encoding must end with chunked".into(),
            Refusal::TransferEncodingHttp10 => {
                "Transfer-Encoding is not allowed in an HTTP/1.0 request".into()
            }
            Refusal::LengthAndEncoding => {
                "a request must not have both Transfer-Encoding and Content-Length".into()
            }
            Refusal::Version => "the HTTP version is not supported: use HTTP/1.1 (or 1.0)".into(),
            Refusal::Http2 => "HTTP/2 with prior knowledge is not supported: use HTTP/1.1".into(),
        }
    }
}

/// This process's secret for the synthetic requests: 128 random bits, so that no client can make
/// its own request pass for one.
fn nonce() -> &'static str {
    static NONCE: OnceLock<String> = OnceLock::new();
    NONCE.get_or_init(|| format!("{:032x}", rand::random::<u128>()))
}

/// The request that takes a refused head's place.
pub(super) fn synthetic_request(refusal: Refusal) -> String {
    format!(
        "GET {REFUSED_PATH} HTTP/1.1\r\nhost: gpt2-server\r\n{REFUSED_HEADER}: {} {}\r\n\
         connection: close\r\n\r\n",
        nonce(),
        refusal.token()
    )
}

/// What a synthetic request stands for; `None` for every request a client sent, whatever its
/// headers.
fn refusal_of(headers: &HeaderMap) -> Option<Refusal> {
    let value = headers.get(REFUSED_HEADER)?.as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (given, token) = (&value[..space], &value[space + 1..]);
    // Constant time, so that the answer's timing tells nothing about the nonce.
    if !bool::from(given.ct_eq(nonce().as_bytes())) {
        return None;
    }
    Refusal::from_token(token)
}

/// The answer to the synthetic request that stands for a refused head: the JSON error, a fresh
/// `x-request-id` and `connection: close`, logged and counted like any other answer. `None` for
/// any other request.
pub fn refusal_answer(headers: &HeaderMap) -> Option<Response> {
    let refusal = refusal_of(headers)?;
    let request_id = crate::routes::request_id(&HeaderMap::new());
    let status = refusal.status().as_u16();
    let error_type = refusal.error_type();
    let message = refusal.message();
    // The route is unknown: the head that would name it was refused.
    let route = "-";
    // INFO, as for every client error.
    info!(request_id, route, status, error_type, error = %message, "request refused before routing");
    crate::metrics::observe(&crate::metrics::Observed::answered(
        route,
        "-",
        status,
        Duration::ZERO,
    ));
    let mut response = ApiError::new(refusal.status(), error_type, message).into_response();
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response
            .headers_mut()
            .insert(crate::routes::REQUEST_ID_HEADER, value);
    }
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head_guard::scan::tests::through_gate;

    #[test]
    fn the_synthetic_request_is_answered_only_with_this_process_nonce() {
        let headers = |value: String| {
            let mut headers = HeaderMap::new();
            headers.insert(REFUSED_HEADER, HeaderValue::from_str(&value).unwrap());
            headers
        };
        for refusal in Refusal::ALL {
            let answer = refusal_answer(&headers(format!("{} {}", nonce(), refusal.token())))
                .expect("answered");
            assert_eq!(answer.status(), refusal.status());
            assert_eq!(answer.headers()[header::CONNECTION], "close");
            assert!(answer
                .headers()
                .contains_key(crate::routes::REQUEST_ID_HEADER));
            assert!(refusal.message().len() > 10);
        }
        let forged = format!("{:032x} header-value", 0u128);
        assert!(refusal_answer(&headers(forged)).is_none());
        assert!(refusal_answer(&headers(format!("{} unknown", nonce()))).is_none());
        assert!(refusal_answer(&headers(nonce().to_string())).is_none());
        assert!(refusal_answer(&HeaderMap::new()).is_none());
        // The synthetic request itself is a head the guard accepts.
        let synthetic = synthetic_request(Refusal::Http2);
        let (out, heads) = through_gate(synthetic.as_bytes(), &[usize::MAX], &[usize::MAX]);
        assert_eq!(out, synthetic.as_bytes());
        assert_eq!(heads, 1);
    }
}
