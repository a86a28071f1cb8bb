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

mod refusal;
mod scan;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::Request;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tracing::debug;

use scan::Gate;

pub use refusal::refusal_answer;

/// How long the end of input waits for hyper to hand the requests before it to the service;
/// counted again from each step it makes.
const HOLD_EOF_FOR: Duration = Duration::from_secs(1);
/// Reads from the socket in one call before yielding to other tasks (a client that keeps sending
/// after a refused head would otherwise keep this task busy).
const READS_PER_POLL: usize = 16;

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
        let scanner = &self.gate.scanner;
        let counter = if scanner.refused() {
            &self.progress.answered
        } else if scanner.between_requests() {
            &self.progress.taken
        } else {
            &self.progress.started
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

    use super::refusal::{synthetic_request, Refusal};
    use super::*;

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
