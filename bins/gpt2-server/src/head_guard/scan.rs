//! The head checks (with httparse, as strict as hyper's parser or more) and the body framing
//! between heads, followed byte by byte, and the [`Gate`] that applies them to the input.

use axum::http::{Method, Uri};
use tracing::debug;

use super::refusal::{synthetic_request, Refusal};

/// The longest request head accepted, leading empty lines included (hyper's own limit is its read
/// buffer, about 400 KiB).
pub(super) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header lines a request may have: hyper's default, whose parser refuses more.
pub(super) const MAX_HEADERS: usize = 100;
/// The longest request target accepted (hyper's own limit is 65,534 bytes).
pub(super) const MAX_TARGET_BYTES: usize = 8 * 1024;

/// Bytes asked of the socket at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Chunk-extension and trailer bytes of one body the guard follows (hyper refuses more than
/// 16 KiB of either).
const CHUNK_EXTRA_BYTES: usize = 16 * 1024;

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
pub(super) struct Scanner {
    state: State,
}

impl Scanner {
    fn new() -> Self {
        Self { state: State::HEAD }
    }

    /// Whether the input so far ends where a head may start (a head's end included only once
    /// its body has passed).
    pub(super) fn between_requests(&self) -> bool {
        matches!(self.state, State::Head { .. })
    }

    /// Whether a head was refused (and the rest of the input is dropped).
    pub(super) fn refused(&self) -> bool {
        matches!(self.state, State::Refused)
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
pub(super) struct Gate {
    pub(super) scanner: Scanner,
    buf: Vec<u8>,
    delivered: usize,
    approved: usize,
    /// Heads handed on, synthetic ones included.
    pub(super) heads: u64,
    /// Where the room made by [`Gate::spare`] starts.
    spare_from: usize,
}

impl Gate {
    pub(super) fn new() -> Self {
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
    pub(super) fn ready(&self) -> &[u8] {
        &self.buf[self.delivered..self.approved]
    }

    /// Marks `n` ready bytes as read.
    pub(super) fn consume(&mut self, n: usize) {
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
    pub(super) fn spare(&mut self) -> &mut [u8] {
        self.spare_from = self.buf.len();
        self.buf.resize(self.spare_from + READ_CHUNK, 0);
        &mut self.buf[self.spare_from..]
    }

    /// Keeps `n` of the bytes read into [`Gate::spare`] and follows them.
    pub(super) fn commit(&mut self, n: usize) {
        self.buf.truncate(self.spare_from + n);
        self.scan();
    }

    /// Drops the room [`Gate::spare`] made, when nothing was read into it.
    pub(super) fn unspare(&mut self) {
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

#[cfg(test)]
pub(super) mod tests {
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
    pub(in crate::head_guard) fn through_gate(
        input: &[u8],
        splits: &[usize],
        reads: &[usize],
    ) -> (Vec<u8>, u64) {
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
}
