//! A guard between each regular connection's socket and hyper's HTTP/1 parser.
//!
//! hyper answers the requests its parser refuses (bytes not allowed in a header, a target or a
//! head too long, a garbage request line, a bad `Content-Length` ...) itself, with a bare status:
//! no JSON body, no `x-request-id`, no log line, no metric, and no hook to change that. The guard
//! therefore reads every request head of the connection first, with limits at least as strict as
//! hyper's, so that whatever it lets through hyper accepts. A head it refuses is replaced by a
//! synthetic request that hyper dispatches in order like any other, and that the connection's
//! service recognises (by a per-process nonce a client cannot know) and answers as our own error.
//! Writing the answer to the socket from here instead would interleave with pipelined answers.
//!
//! Between heads, the guard follows each body's framing (a `Content-Length`, or the chunked
//! coding) to know where the next head starts. A chunked body it cannot follow makes it stop
//! guarding the connection: hyper refuses that body itself and closes the connection.
//!
//! The guard also holds back the end of input while hyper has not yet handed the requests before
//! it to the service: hyper drops a request that it parsed but did not yet dispatch when it reads
//! the end of input, and such a request vanished without a log line (reliability.md, finding 4).
//! Held until the handler has its request, the end of input then drops the handler, which logs
//! the client as gone (499). The hold is bounded, so nothing waits on it for long.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::task::AtomicWaker;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info};

use crate::api_error::ApiError;

/// The longest request head accepted, leading empty lines included (hyper's own limit is its read
/// buffer, about 400 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header lines a request may have: hyper's default, whose parser refuses more.
pub const MAX_HEADERS: usize = 100;
/// The longest request target accepted (hyper's own limit is 65,534 bytes).
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// How long the end of input waits for hyper to hand the requests before it to the service;
/// counted again from each step it makes.
const HOLD_EOF_FOR: Duration = Duration::from_secs(1);
/// Bytes asked of the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Reads from the socket in one call before yielding to other tasks (a client that keeps sending
/// after a refused head would otherwise keep this task busy).
const READS_PER_POLL: usize = 16;
/// Chunk-extension and trailer bytes of one body the guard follows (hyper refuses more than
/// 16 KiB of either).
const CHUNK_EXTRA_BYTES: usize = 16 * 1024;

/// The path of the synthetic request that stands for a refused head.
const REFUSED_PATH: &str = "/__gpt2_head_error";
/// The header of the synthetic request: the nonce, a space, and the refusal's token.
const REFUSED_HEADER: &str = "x-gpt2-head-error";

/// Why a request head was refused. Each is answered with the status and message hyper's parser
/// would have had a reason for, as an [`ApiError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
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
    const ALL: [Refusal; 16] = [
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
fn synthetic_request(refusal: Refusal) -> String {
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

/// How a request's body is framed, as far as finding the next head goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
}

/// Checks a complete head as hyper would (and a little more strictly); returns its body's framing.
fn check_head(request: &httparse::Request<'_, '_>) -> Result<Framing, Refusal> {
    let method = request.method.unwrap_or_default();
    let target = request.path.unwrap_or_default();
    if target.len() > MAX_TARGET_BYTES {
        return Err(Refusal::TargetTooLong);
    }
    if Method::from_bytes(method.as_bytes()).is_err() {
        return Err(Refusal::RequestLine);
    }
    if Uri::try_from(target.as_bytes()).is_err() {
        return Err(Refusal::TargetSyntax);
    }
    let http10 = request.version == Some(0);
    let mut length: Option<u64> = None;
    // Whether the last Transfer-Encoding line ends with `chunked` (hyper reads only that one).
    let mut chunked: Option<bool> = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = decimal(header.value).ok_or(Refusal::ContentLength)?;
            if length.is_some_and(|seen| seen != value) {
                return Err(Refusal::ContentLengths);
            }
            length = Some(value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if http10 {
                return Err(Refusal::TransferEncodingHttp10);
            }
            chunked = Some(ends_with_chunked(header.value));
        }
    }
    match (chunked, length) {
        (Some(_), Some(_)) => Err(Refusal::LengthAndEncoding),
        (Some(true), None) => Ok(Framing::Chunked),
        (Some(false), None) => Err(Refusal::TransferEncoding),
        (None, length) => Ok(Framing::Length(length.unwrap_or(0))),
    }
}

/// A `Content-Length` value: digits only (no sign, no list), within what hyper can count.
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    // hyper keeps the two largest values for its own markers.
    (n <= u64::MAX - 2).then_some(n)
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked` (a value that is not visible
/// ASCII is not, as for hyper).
fn ends_with_chunked(value: &[u8]) -> bool {
    let visible = value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    visible
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The refusal for an httparse error on `head` (which holds at least one complete line).
fn refusal_for(error: httparse::Error, method_seen: bool, head: &[u8]) -> Refusal {
    match error {
        httparse::Error::HeaderName => Refusal::HeaderName,
        httparse::Error::HeaderValue => Refusal::HeaderValue,
        httparse::Error::NewLine => Refusal::LineEnd,
        httparse::Error::TooManyHeaders => Refusal::TooManyHeaders,
        httparse::Error::Token if method_seen => Refusal::Target,
        httparse::Error::Version => version_refusal(head),
        httparse::Error::Token | httparse::Error::Status => Refusal::RequestLine,
    }
}

/// A request line whose version httparse refused: an unsupported HTTP version (the HTTP/2 preface
/// apart), or not a version at all.
fn version_refusal(head: &[u8]) -> Refusal {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line == b"PRI * HTTP/2.0" {
        return Refusal::Http2;
    }
    let version = line.rsplit(|&b| b == b' ').next().unwrap_or_default();
    let well_formed = match version.strip_prefix(b"HTTP/") {
        Some([major]) => major.is_ascii_digit(),
        Some([major, b'.', minor]) => major.is_ascii_digit() && minor.is_ascii_digit(),
        _ => false,
    };
    if well_formed {
        Refusal::Version
    } else {
        Refusal::RequestLine
    }
}

/// Where the chunked coding of a body is (RFC 9112, section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// The chunk size's hex digits, `digits` of them so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// Blanks after the size.
    SizeBlank {
        size: u64,
    },
    /// A chunk extension, up to its CR.
    Extension {
        size: u64,
    },
    /// The LF that ends a chunk-size line.
    SizeLf {
        size: u64,
    },
    /// Data bytes left in the chunk.
    Data(u64),
    DataCr,
    DataLf,
    /// The start of a trailer line, or of the empty line that ends the body.
    LineStart,
    Trailer,
    TrailerLf,
    EndLf,
}

/// A chunked body being followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunked {
    at: Chunk,
    /// Extension and trailer bytes so far.
    extra: usize,
    trailers: usize,
}

/// Where the guard is in the connection's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a head: `scanned` bytes of it were looked at for a line end; `target_fits` once
    /// the request line's target is known to end within the limit.
    Head {
        scanned: usize,
        target_fits: bool,
    },
    /// Body bytes left.
    Length(u64),
    Chunked(Chunked),
    /// A body the guard could not follow: everything passes unchecked from here on.
    Unguarded,
    /// A head was refused: the rest of the input is discarded.
    Refused,
}

impl State {
    const HEAD: State = State::Head {
        scanned: 0,
        target_fits: false,
    };
}

/// What to do with the input not yet handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Hand on this many bytes of a body.
    Pass(usize),
    /// Drop this many bytes: empty lines before a request line, which RFC 9112 lets a server
    /// ignore (handed on, a flood of them would fill hyper's buffer to its bare 431).
    Skip(usize),
    /// Hand on a complete, valid head of this many bytes.
    Head(usize),
    /// Replace the input from here on by the synthetic request for this refusal.
    Refuse(Refusal),
    /// Drop the input from here on.
    Discard,
    /// Nothing to do until more input arrives.
    More,
}

/// Follows the input's framing: heads, bodies, and refusals.
#[derive(Debug)]
struct Scanner {
    state: State,
}

impl Scanner {
    fn new() -> Self {
        Self { state: State::HEAD }
    }

    /// Whether the input so far ends where a head may start (a head's end included only once
    /// its body has passed).
    fn between_requests(&self) -> bool {
        matches!(self.state, State::Head { .. })
    }

    fn step(&mut self, input: &[u8]) -> Step {
        match self.state {
            State::Refused => Step::Discard,
            _ if input.is_empty() => Step::More,
            State::Unguarded => Step::Pass(input.len()),
            State::Length(left) => {
                let passed = left.min(input.len() as u64);
                let rest = left - passed;
                self.state = if rest == 0 {
                    State::HEAD
                } else {
                    State::Length(rest)
                };
                // `passed` is at most `input.len()`.
                Step::Pass(passed as usize)
            }
            State::Chunked(chunked) => self.step_chunked(chunked, input),
            State::Head {
                scanned,
                target_fits,
            } => self.step_head(input, scanned, target_fits),
        }
    }

    fn refuse(&mut self, refusal: Refusal) -> Step {
        self.state = State::Refused;
        Step::Refuse(refusal)
    }

    fn step_head(&mut self, head: &[u8], scanned: usize, mut target_fits: bool) -> Step {
        let blank = match head {
            [b'\n', ..] => 1,
            [b'\r', b'\n', ..] => 2,
            _ => 0,
        };
        if blank > 0 {
            // Only a lone CR can have been scanned before: the head starts after it.
            self.state = State::HEAD;
            return Step::Skip(blank);
        }
        if head.get(scanned..).unwrap_or(head).contains(&b'\n') {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(head) {
                Ok(httparse::Status::Complete(length)) => {
                    if length > MAX_HEAD_BYTES {
                        return self.refuse(Refusal::HeadTooLarge);
                    }
                    return match check_head(&request) {
                        Ok(framing) => {
                            self.state = match framing {
                                Framing::Length(0) => State::HEAD,
                                Framing::Length(length) => State::Length(length),
                                Framing::Chunked => State::Chunked(Chunked {
                                    at: Chunk::Size { size: 0, digits: 0 },
                                    extra: 0,
                                    trailers: 0,
                                }),
                            };
                            Step::Head(length)
                        }
                        Err(refusal) => self.refuse(refusal),
                    };
                }
                Ok(httparse::Status::Partial) => {}
                Err(error) => {
                    let refusal = refusal_for(error, request.method.is_some(), head);
                    return self.refuse(refusal);
                }
            }
        }
        if !target_fits && head.len() > MAX_TARGET_BYTES {
            match target_within_limit(head) {
                Some(true) => target_fits = true,
                Some(false) => return self.refuse(Refusal::TargetTooLong),
                None => {}
            }
        }
        if head.len() >= MAX_HEAD_BYTES {
            return self.refuse(Refusal::HeadTooLarge);
        }
        self.state = State::Head {
            scanned: head.len(),
            target_fits,
        };
        Step::More
    }

    fn step_chunked(&mut self, mut chunked: Chunked, input: &[u8]) -> Step {
        let mut at = 0;
        while at < input.len() {
            let byte = input[at];
            let next = match chunked.at {
                Chunk::Size { size, digits } => match hex(byte) {
                    Some(digit) => size
                        .checked_mul(16)
                        .and_then(|size| size.checked_add(digit))
                        .map(|size| Chunk::Size {
                            size,
                            digits: digits.saturating_add(1),
                        }),
                    None if digits == 0 => None,
                    None => after_size(byte, size),
                },
                Chunk::SizeBlank { size } => after_size(byte, size),
                Chunk::Extension { size } => match byte {
                    b'\r' => Some(Chunk::SizeLf { size }),
                    b'\n' => None,
                    _ => {
                        chunked.extra += 1;
                        (chunked.extra <= CHUNK_EXTRA_BYTES).then_some(Chunk::Extension { size })
                    }
                },
                Chunk::SizeLf { size } => match byte {
                    b'\n' if size == 0 => Some(Chunk::LineStart),
                    b'\n' => Some(Chunk::Data(size)),
                    _ => None,
                },
                Chunk::Data(left) => {
                    let passed = left.min((input.len() - at) as u64);
                    // `passed` is at most what is left of `input`.
                    at += passed as usize;
                    chunked.at = match left - passed {
                        0 => Chunk::DataCr,
                        rest => Chunk::Data(rest),
                    };
                    continue;
                }
                Chunk::DataCr => (byte == b'\r').then_some(Chunk::DataLf),
                Chunk::DataLf => (byte == b'\n').then_some(Chunk::Size { size: 0, digits: 0 }),
                Chunk::LineStart => match byte {
                    b'\r' => Some(Chunk::EndLf),
                    b'\n' => None,
                    _ => {
                        chunked.extra += 1;
                        (chunked.extra <= CHUNK_EXTRA_BYTES).then_some(Chunk::Trailer)
                    }
                },
                Chunk::Trailer => match byte {
                    b'\r' => Some(Chunk::TrailerLf),
                    b'\n' => None,
                    _ => {
                        chunked.extra += 1;
                        (chunked.extra <= CHUNK_EXTRA_BYTES).then_some(Chunk::Trailer)
                    }
                },
                Chunk::TrailerLf => {
                    chunked.trailers += 1;
                    (byte == b'\n' && chunked.trailers <= MAX_HEADERS).then_some(Chunk::LineStart)
                }
                Chunk::EndLf => {
                    if byte == b'\n' {
                        self.state = State::HEAD;
                        return Step::Pass(at + 1);
                    }
                    None
                }
            };
            match next {
                Some(next) => {
                    chunked.at = next;
                    at += 1;
                }
                None => {
                    // hyper refuses this body and closes the connection; until then nothing
                    // after it can be told apart as a head.
                    debug!("a chunked body the head guard cannot follow; unguarded from here");
                    self.state = State::Unguarded;
                    return Step::Pass(input.len());
                }
            }
        }
        self.state = State::Chunked(chunked);
        Step::Pass(input.len())
    }
}

fn hex(byte: u8) -> Option<u64> {
    char::from(byte).to_digit(16).map(u64::from)
}

/// What may follow a chunk size's digits.
fn after_size(byte: u8, size: u64) -> Option<Chunk> {
    match byte {
        b' ' | b'\t' => Some(Chunk::SizeBlank { size }),
        b';' => Some(Chunk::Extension { size }),
        b'\r' => Some(Chunk::SizeLf { size }),
        _ => None,
    }
}

/// For a head longer than the target limit: whether its request line's target ends within it
/// (`None` while that cannot be told: no space after the method yet).
fn target_within_limit(head: &[u8]) -> Option<bool> {
    // Methods are short; one that is not is refused by httparse or by the head limit.
    let method_end = head.iter().take(64).position(|&b| b == b' ')?;
    let target = &head[method_end + 1..];
    let window = &target[..target.len().min(MAX_TARGET_BYTES + 1)];
    match window
        .iter()
        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
    {
        Some(_) => Some(true),
        None if window.len() > MAX_TARGET_BYTES => Some(false),
        None => None,
    }
}

/// The input the guard holds: bytes handed on to hyper (`approved`, of which `delivered` were
/// read), then those of a head not yet complete.
#[derive(Debug)]
struct Gate {
    scanner: Scanner,
    buf: Vec<u8>,
    delivered: usize,
    approved: usize,
    /// Heads handed on, synthetic ones included.
    heads: u64,
    /// Where the room made by [`Gate::spare`] starts.
    spare_from: usize,
}

impl Gate {
    fn new() -> Self {
        Self {
            scanner: Scanner::new(),
            buf: Vec::new(),
            delivered: 0,
            approved: 0,
            heads: 0,
            spare_from: 0,
        }
    }

    /// The approved bytes not yet read.
    fn ready(&self) -> &[u8] {
        &self.buf[self.delivered..self.approved]
    }

    /// Marks `n` ready bytes as read.
    fn consume(&mut self, n: usize) {
        self.delivered = (self.delivered + n).min(self.approved);
        if self.delivered == self.approved && self.approved > 0 {
            // Only a partial head, at most the head limit, is moved.
            self.buf.drain(..self.approved);
            self.delivered = 0;
            self.approved = 0;
            // A long head made it grow; an idle keep-alive connection need not keep that.
            if self.buf.is_empty() && self.buf.capacity() > 2 * READ_CHUNK {
                self.buf = Vec::new();
            }
        }
    }

    /// Room for the next read from the socket (zeroed: no unsafe code for uninitialised bytes).
    fn spare(&mut self) -> &mut [u8] {
        self.spare_from = self.buf.len();
        self.buf.resize(self.spare_from + READ_CHUNK, 0);
        &mut self.buf[self.spare_from..]
    }

    /// Keeps `n` of the bytes read into [`Gate::spare`] and follows them.
    fn commit(&mut self, n: usize) {
        self.buf.truncate(self.spare_from + n);
        self.scan();
    }

    /// Drops the room [`Gate::spare`] made, when nothing was read into it.
    fn unspare(&mut self) {
        self.buf.truncate(self.spare_from);
    }

    fn scan(&mut self) {
        loop {
            match self.scanner.step(&self.buf[self.approved..]) {
                Step::Pass(n) => self.approved += n,
                Step::Skip(n) => {
                    self.buf.drain(self.approved..self.approved + n);
                }
                Step::Head(n) => {
                    self.approved += n;
                    self.heads += 1;
                }
                Step::Refuse(refusal) => {
                    debug!(?refusal, "request head refused");
                    self.buf.truncate(self.approved);
                    self.buf
                        .extend_from_slice(synthetic_request(refusal).as_bytes());
                    self.approved = self.buf.len();
                    self.heads += 1;
                }
                Step::Discard => {
                    self.buf.truncate(self.approved);
                    return;
                }
                Step::More => return,
            }
        }
    }

    #[cfg(test)]
    fn push(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = rest.len().min(READ_CHUNK);
            self.spare()[..n].copy_from_slice(&rest[..n]);
            self.commit(n);
            rest = &rest[n..];
        }
    }
}

/// What the service of a connection tells its guard: how far hyper has handed requests over.
/// Shared by the guard and the service of one connection.
#[derive(Debug, Default)]
pub struct Progress {
    /// Requests whose service future was polled.
    started: AtomicU64,
    /// Requests whose service future was polled and whose body was read to its end or dropped.
    taken: AtomicU64,
    /// Requests whose answer was sent or dropped.
    answered: AtomicU64,
    waker: AtomicWaker,
}

impl Progress {
    fn bump(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.waker.wake();
    }

    /// All the steps so far: a change means hyper moved on.
    fn steps(&self) -> u64 {
        self.started.load(Ordering::SeqCst)
            + self.taken.load(Ordering::SeqCst)
            + self.answered.load(Ordering::SeqCst)
    }
}

const POLLED: u8 = 1;
const BODY_DONE: u8 = 2;

/// One request's way through the service, reported to its connection's [`Progress`].
#[derive(Debug, Clone)]
struct Tracker {
    progress: Arc<Progress>,
    flags: Arc<AtomicU8>,
}

impl Tracker {
    fn mark(&self, flag: u8) {
        let before = self.flags.fetch_or(flag, Ordering::SeqCst);
        if before & flag != 0 {
            return;
        }
        if flag == POLLED {
            self.progress.bump(&self.progress.started);
        }
        if before | flag == POLLED | BODY_DONE {
            self.progress.bump(&self.progress.taken);
        }
    }
}

/// Tracks `request` for its connection's guard: returns it with its body watched, and the
/// [`Dispatched`] to mark when its service future first runs.
pub fn track<B: http_body::Body>(
    request: Request<B>,
    progress: &Arc<Progress>,
) -> (Request<TrackedBody<B>>, Dispatched) {
    let tracker = Tracker {
        progress: progress.clone(),
        flags: Arc::new(AtomicU8::new(0)),
    };
    if request.body().is_end_stream() {
        tracker.mark(BODY_DONE);
    }
    let request = request.map(|inner| TrackedBody {
        inner,
        tracker: tracker.clone(),
    });
    (request, Dispatched(tracker))
}

/// A request handed to the service, not yet polled.
#[derive(Debug)]
pub struct Dispatched(Tracker);

impl Dispatched {
    /// Marks the request's service future as running; the [`Answering`] returned marks its answer
    /// done when dropped (keep it with the response body).
    pub fn polled(self) -> Answering {
        self.0.mark(POLLED);
        Answering(self.0.progress)
    }
}

/// Marks a request answered when dropped.
#[derive(Debug)]
pub struct Answering(Arc<Progress>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.bump(&self.0.answered);
    }
}

/// A request body that tells its connection's guard when it was read to its end or dropped.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    tracker: Tracker,
}

impl<B> Drop for TrackedBody<B> {
    fn drop(&mut self) {
        self.tracker.mark(BODY_DONE);
    }
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None | Some(Err(_))) => this.tracker.mark(BODY_DONE),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.tracker.mark(BODY_DONE),
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How the socket's input ended.
#[derive(Debug)]
enum End {
    Eof,
    Error(io::Error),
    /// Handed on to hyper: from now on every read ends at once.
    Passed,
}

/// The end of input, held back until hyper moves on or the hold runs out.
#[derive(Debug)]
struct Hold {
    deadline: Pin<Box<Sleep>>,
    /// [`Progress::steps`] when the deadline was last set.
    steps: u64,
}

/// A socket whose input hyper reads only through the head checks (see the module's doc).
#[derive(Debug)]
pub struct HeadGuard<T> {
    inner: T,
    gate: Gate,
    progress: Arc<Progress>,
    end: Option<End>,
    hold: Option<Hold>,
    hold_for: Duration,
}

impl<T> HeadGuard<T> {
    /// Guards `inner`; `progress` is what the connection's service reports to (see [`track`]).
    pub fn new(inner: T, progress: Arc<Progress>) -> Self {
        Self {
            inner,
            gate: Gate::new(),
            progress,
            end: None,
            hold: None,
            hold_for: HOLD_EOF_FOR,
        }
    }

    /// Whether every request handed on got as far as the end of input needs it to: a request
    /// whose body passed whole, to its handler with the body read (so that the end of input
    /// drops a handler that logs); one cut short, to its service (which then reads the body's
    /// error); the synthetic request, to its answer.
    fn caught_up(&self) -> bool {
        let counter = match self.gate.scanner.state {
            State::Refused => &self.progress.answered,
            _ if self.gate.scanner.between_requests() => &self.progress.taken,
            _ => &self.progress.started,
        };
        counter.load(Ordering::SeqCst) >= self.gate.heads
    }

    /// Hands on the end of input once hyper caught up, or the hold ran out.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !matches!(self.end, Some(End::Passed)) && !self.caught_up() {
            let steps = self.progress.steps();
            match &mut self.hold {
                Some(hold) if hold.steps != steps => {
                    hold.deadline.as_mut().reset(Instant::now() + self.hold_for);
                    hold.steps = steps;
                }
                Some(_) => {}
                None => {
                    self.hold = Some(Hold {
                        deadline: Box::pin(tokio::time::sleep(self.hold_for)),
                        steps,
                    })
                }
            }
            self.progress.waker.register(cx.waker());
            // Checked again once registered, so that a step taken in between is not missed.
            if !self.caught_up() {
                let expired = self
                    .hold
                    .as_mut()
                    .is_some_and(|hold| hold.deadline.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                debug!("hyper did not take the last request in time; passing the end of input");
            }
        }
        self.hold = None;
        match self.end.replace(End::Passed) {
            Some(End::Error(error)) => Poll::Ready(Err(error)),
            _ => Poll::Ready(Ok(())),
        }
    }

    #[cfg(test)]
    fn hold_for(mut self, hold_for: Duration) -> Self {
        self.hold_for = hold_for;
        self
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..READS_PER_POLL {
            let ready = this.gate.ready();
            if !ready.is_empty() {
                let n = ready.len().min(out.remaining());
                out.put_slice(&ready[..n]);
                this.gate.consume(n);
                return Poll::Ready(Ok(()));
            }
            if this.end.is_some() {
                return this.poll_end(cx);
            }
            let mut read = ReadBuf::new(this.gate.spare());
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        this.gate.unspare();
                        this.end = Some(End::Eof);
                    } else {
                        this.gate.commit(n);
                    }
                }
                Poll::Ready(Err(error)) => {
                    this.gate.unspare();
                    this.end = Some(End::Error(error));
                }
                Poll::Pending => {
                    this.gate.unspare();
                    return Poll::Pending;
                }
            }
        }
        // Each round read something (a head still incomplete, or input discarded after a
        // refusal): let other tasks run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::task::Waker;

    use proptest::prelude::*;

    use super::*;

    /// Valid requests of every framing, among them bodies that look like heads.
    fn valid_requests() -> Vec<Vec<u8>> {
        let json = br#"{"input": "Hi", "max_length": 5}"#;
        let mut requests = vec![
            b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            b"GET / HTTP/1.0\r\n\r\n".to_vec(),
            b"GET /x?y=1 HTTP/1.1\nHost: bare-lf\n\n".to_vec(),
            b"HEAD /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec(),
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            // A body that holds a whole head: it must pass as body bytes.
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\nGET / HTTP/1.1\r\n\r\n"
                .to_vec(),
            // Chunked, with extensions, upper-case hex, blanks after a size and trailers.
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
              5;name=value\r\nhello\r\nA ; x=\"y\"\r\nGET /\r\n\r\nx\r\n0;last\r\nX-Trailer: 1\r\n\
              Other: two\r\n\r\n"
                .to_vec(),
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              1\r\n{\r\n0\r\n\r\n"
                .to_vec(),
            // The same Content-Length twice is allowed, as hyper allows it.
            b"POST /invocations HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 2\r\n\r\n{}"
                .to_vec(),
        ];
        let mut post = format!(
            "POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            json.len()
        )
        .into_bytes();
        post.extend_from_slice(json);
        requests.push(post);
        // At the limits: 100 headers, and a target of exactly the longest length.
        let mut many = b"GET /ping HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            many.extend_from_slice(format!("x-h{i}: {i}\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        requests.push(many);
        let target = format!("/{}", "a".repeat(MAX_TARGET_BYTES - 1));
        requests.push(format!("GET {target} HTTP/1.1\r\n\r\n").into_bytes());
        requests
    }

    /// Feeds `input` in pieces of the sizes of `splits` (cycled) and reads it out in pieces of
    /// `reads` (cycled); returns what came out and the heads counted.
    fn through_gate(input: &[u8], splits: &[usize], reads: &[usize]) -> (Vec<u8>, u64) {
        let mut gate = Gate::new();
        let mut out = Vec::new();
        let mut reads = reads.iter().cycle();
        let mut drain = |gate: &mut Gate, out: &mut Vec<u8>| loop {
            let ready = gate.ready();
            if ready.is_empty() {
                break;
            }
            let n = ready
                .len()
                .min(*reads.next().unwrap_or(&usize::MAX).max(&1));
            out.extend_from_slice(&ready[..n]);
            gate.consume(n);
        };
        let mut rest = input;
        for &split in splits.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = split.clamp(1, rest.len());
            gate.push(&rest[..n]);
            rest = &rest[n..];
            drain(&mut gate, &mut out);
        }
        drain(&mut gate, &mut out);
        (out, gate.heads)
    }

    #[test]
    fn pipelined_valid_requests_pass_byte_for_byte_in_any_pieces() {
        let requests = valid_requests();
        let input = requests.concat();
        for (splits, reads) in [
            (vec![usize::MAX], vec![usize::MAX]),
            (vec![1], vec![1]),
            (vec![3, 7, 1, 100], vec![5, 1, 64]),
            (vec![READ_CHUNK], vec![8192]),
        ] {
            let (out, heads) = through_gate(&input, &splits, &reads);
            assert!(out == input, "changed with splits {splits:?}");
            assert_eq!(heads, requests.len() as u64);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn any_split_of_any_pipeline_of_valid_requests_passes_unchanged(
            picks in proptest::collection::vec(0usize..12, 1..8),
            splits in proptest::collection::vec(1usize..200, 1..20),
            reads in proptest::collection::vec(1usize..300, 1..20),
        ) {
            let requests = valid_requests();
            let chosen: Vec<&Vec<u8>> = picks.iter().map(|&i| &requests[i % requests.len()]).collect();
            let input: Vec<u8> = chosen.iter().flat_map(|r| r.iter().copied()).collect();
            let (out, heads) = through_gate(&input, &splits, &reads);
            prop_assert!(out == input);
            prop_assert_eq!(heads, chosen.len() as u64);
        }

        #[test]
        fn a_refused_head_after_valid_ones_becomes_the_synthetic_request_in_any_pieces(
            picks in proptest::collection::vec(0usize..12, 0..4),
            splits in proptest::collection::vec(1usize..200, 1..20),
        ) {
            let requests = valid_requests();
            let valid: Vec<u8> = picks
                .iter()
                .flat_map(|&i| requests[i % requests.len()].iter().copied())
                .collect();
            let mut input = valid.clone();
            input.extend_from_slice(b"GET / HTTP/1.1\r\nBad: a\x01b\r\n\r\nGET /ping HTTP/1.1\r\n\r\n");
            let (out, heads) = through_gate(&input, &splits, &[usize::MAX]);
            let mut expected = valid;
            expected.extend_from_slice(synthetic_request(Refusal::HeaderValue).as_bytes());
            prop_assert!(out == expected);
            prop_assert_eq!(heads, picks.len() as u64 + 1);
        }
    }

    #[test]
    fn leading_empty_lines_are_dropped() {
        let (out, heads) = through_gate(b"\r\n\n\r\nGET / HTTP/1.1\r\n\r\n", &[1], &[1]);
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(heads, 1);
        // A flood of them never fills anything.
        let flood = b"\r\n".repeat(100_000);
        let (out, heads) = through_gate(&flood, &[4096], &[usize::MAX]);
        assert!(out.is_empty());
        assert_eq!(heads, 0);
    }

    /// What `head` (sent whole, then in single bytes) is refused as.
    fn refused_as(head: &[u8]) -> Refusal {
        let mut found = None;
        for splits in [vec![usize::MAX], vec![1]] {
            let (out, heads) = through_gate(head, &splits, &[usize::MAX]);
            assert_eq!(heads, 1, "{:?}", String::from_utf8_lossy(&out));
            let refusal = Refusal::ALL
                .into_iter()
                .find(|r| out == synthetic_request(*r).as_bytes())
                .unwrap_or_else(|| panic!("not refused: {:?}", String::from_utf8_lossy(&out)));
            assert!(
                found.is_none_or(|f| f == refusal),
                "{found:?} then {refusal:?}"
            );
            found = Some(refusal);
        }
        found.unwrap_or(Refusal::RequestLine)
    }

    #[test]
    fn each_kind_of_bad_head_is_replaced_by_its_synthetic_request() {
        let long_target = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_TARGET_BYTES));
        let unended_target = format!("GET /{}", "a".repeat(3 * MAX_TARGET_BYTES));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-h{i}: {i}\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let big = format!(
            "GET / HTTP/1.1\r\nx-big: {}\r\n\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        let unended_big = format!(
            "GET / HTTP/1.1\r\nx-big: {}",
            "a".repeat(2 * MAX_HEAD_BYTES)
        );
        let cases: Vec<(&[u8], Refusal)> =
            vec![
            (b"GET / HTTP/1.1\r\nx: a\x01b\r\n\r\n", Refusal::HeaderValue),
            (b"GET / HTTP/1.1\r\nx: a\x7fb\r\n\r\n", Refusal::HeaderValue),
            (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", Refusal::HeaderName),
            (b"GET / HTTP/1.1\r\n: x\r\n\r\n", Refusal::HeaderName),
            (long_target.as_bytes(), Refusal::TargetTooLong),
            (unended_target.as_bytes(), Refusal::TargetTooLong),
            (&many, Refusal::TooManyHeaders),
            (big.as_bytes(), Refusal::HeadTooLarge),
            (unended_big.as_bytes(), Refusal::HeadTooLarge),
            (b"HELLO\r\n\r\n", Refusal::RequestLine),
            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", Refusal::RequestLine),
            (b"GET / FOO/1.1\r\n\r\n", Refusal::RequestLine),
            (b"GET /\r\n\r\n", Refusal::Target),
            (b"GET /a\x01b HTTP/1.1\r\n\r\n", Refusal::Target),
            // httparse lets these through; hyper's URI parser would not.
            (b"GET { HTTP/1.1\r\n\r\n", Refusal::TargetSyntax),
            (b"GET http://a:b:c/ HTTP/1.1\r\n\r\n", Refusal::TargetSyntax),
            (b"GET / HTTP/1.1 extra\r\n\r\n", Refusal::LineEnd),
            (b"GET / HTTP/1.1\r\nx: y\rz\r\n\r\n", Refusal::HeaderValue),
            (b"\rGET / HTTP/1.1\r\n\r\n", Refusal::LineEnd),
            (b"GET / HTTP/1.2\r\n\r\n", Refusal::Version),
            (b"GET / HTTP/2.0\r\n\r\n", Refusal::Version),
            (b"GET / HTTP/3\r\n\r\n", Refusal::Version),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Refusal::Http2),
            (b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", Refusal::ContentLength),
            (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello", Refusal::ContentLength),
            (b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\nhello", Refusal::ContentLength),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                Refusal::ContentLength,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                Refusal::ContentLengths,
            ),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", Refusal::TransferEncoding),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Refusal::TransferEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
                Refusal::TransferEncoding,
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                Refusal::TransferEncodingHttp10,
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                Refusal::LengthAndEncoding,
            ),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                Refusal::LengthAndEncoding,
            ),
        ];
        for (head, expected) in cases {
            assert_eq!(
                refused_as(head),
                expected,
                "{:?}",
                String::from_utf8_lossy(&head[..head.len().min(80)])
            );
        }
    }

    #[test]
    fn after_a_refusal_the_rest_of_the_input_is_dropped() {
        let mut gate = Gate::new();
        gate.push(b"GET /ping HTTP/1.1\r\n\r\nGET / HTTP/9.9\r\n\r\nGET /ping HTTP/1.1\r\n\r\n");
        gate.push(b"more bytes that are never read");
        let mut expected = b"GET /ping HTTP/1.1\r\n\r\n".to_vec();
        expected.extend_from_slice(synthetic_request(Refusal::Version).as_bytes());
        assert_eq!(gate.ready(), expected);
        assert_eq!(gate.heads, 2);
    }

    #[test]
    fn a_chunked_body_it_cannot_follow_leaves_the_rest_unguarded() {
        let input: &[u8] = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nGET /a\x01 HTTP/1.1\r\n\r\n";
        let (out, heads) = through_gate(input, &[1], &[usize::MAX]);
        assert_eq!(
            out, input,
            "hyper gets it as it is, and refuses the body itself"
        );
        assert_eq!(heads, 1);
    }

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

    /// A socket that yields `chunks`, then the end of input.
    struct Script(VecDeque<Vec<u8>>);

    impl AsyncRead for Script {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(chunk) = self.get_mut().0.pop_front() {
                out.put_slice(&chunk);
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Reads once with a waker that does nothing.
    fn read_once<T: AsyncRead + Unpin>(guard: &mut HeadGuard<T>) -> Poll<Vec<u8>> {
        let mut storage = vec![0; 64 * 1024];
        let mut out = ReadBuf::new(&mut storage);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(guard).poll_read(&mut cx, &mut out) {
            Poll::Ready(result) => {
                result.expect("no error");
                Poll::Ready(out.filled().to_vec())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn post(body: &[u8]) -> Vec<u8> {
        let mut request = format!(
            "POST /invocations HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);
        request
    }

    #[tokio::test]
    async fn the_end_of_input_waits_until_the_handler_has_its_request_and_body() {
        let progress = Arc::new(Progress::default());
        let request = post(b"{}");
        let mut guard = HeadGuard::new(Script(VecDeque::from([request.clone()])), progress.clone());
        assert_eq!(read_once(&mut guard), Poll::Ready(request));
        // hyper parsed it and called the service, which has not run yet: the end waits.
        assert_eq!(read_once(&mut guard), Poll::Pending);
        let (request, dispatched) = track(Request::new(axum::body::Body::from("{}")), &progress);
        let answering = dispatched.polled();
        assert_eq!(
            read_once(&mut guard),
            Poll::Pending,
            "the body is not read yet"
        );
        drop(request);
        assert_eq!(read_once(&mut guard), Poll::Ready(Vec::new()));
        assert_eq!(
            read_once(&mut guard),
            Poll::Ready(Vec::new()),
            "and it stays ended"
        );
        drop(answering);
    }

    #[tokio::test]
    async fn the_end_of_input_comes_anyway_when_the_hold_runs_out() {
        let progress = Arc::new(Progress::default());
        let mut guard = HeadGuard::new(Script(VecDeque::from([post(b"{}")])), progress)
            .hold_for(Duration::from_millis(50));
        assert!(read_once(&mut guard).is_ready());
        assert_eq!(read_once(&mut guard), Poll::Pending);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(read_once(&mut guard), Poll::Ready(Vec::new()));
    }

    #[tokio::test]
    async fn a_request_cut_short_needs_only_its_service_to_run_before_the_end() {
        let progress = Arc::new(Progress::default());
        let mut cut = post(b"{\"input\": \"Hi\"}");
        cut.truncate(cut.len() - 4);
        let mut guard = HeadGuard::new(Script(VecDeque::from([cut.clone()])), progress.clone());
        assert_eq!(read_once(&mut guard), Poll::Ready(cut));
        assert_eq!(read_once(&mut guard), Poll::Pending);
        let (_request, dispatched) = track(Request::new(axum::body::Body::from("{}")), &progress);
        let _answering = dispatched.polled();
        assert_eq!(read_once(&mut guard), Poll::Ready(Vec::new()));
    }

    #[tokio::test]
    async fn after_a_refusal_the_end_of_input_waits_for_the_answer() {
        let progress = Arc::new(Progress::default());
        let mut guard = HeadGuard::new(
            Script(VecDeque::from([
                b"GET / HTTP/1.1\r\nx: \x01\r\n\r\n".to_vec(),
                b"junk".to_vec(),
            ])),
            progress.clone(),
        );
        assert_eq!(
            read_once(&mut guard),
            Poll::Ready(synthetic_request(Refusal::HeaderValue).into_bytes())
        );
        assert_eq!(
            read_once(&mut guard),
            Poll::Pending,
            "junk dropped, the end held"
        );
        let (request, dispatched) = track(Request::new(axum::body::Body::empty()), &progress);
        let answering = dispatched.polled();
        drop(request);
        assert_eq!(
            read_once(&mut guard),
            Poll::Pending,
            "taken, not answered yet"
        );
        drop(answering);
        assert_eq!(read_once(&mut guard), Poll::Ready(Vec::new()));
    }

    #[tokio::test]
    async fn an_idle_connection_ends_at_once() {
        let progress = Arc::new(Progress::default());
        let mut guard = HeadGuard::new(
            Script(VecDeque::from([b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec()])),
            progress,
        );
        assert_eq!(
            read_once(&mut guard),
            Poll::Ready(Vec::new()),
            "a partial head is dropped"
        );
    }
}
