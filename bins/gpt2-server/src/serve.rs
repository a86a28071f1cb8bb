//! The connection loop: accepts connections up to a cap, serves each with hyper's HTTP/1 (a
//! header-read timeout that also closes idle keep-alive connections) behind tower-http's
//! request-body timeout, and drains them on shutdown without waiting for connections that have
//! nothing in flight.
//!
//! Past the cap, a small overflow pool still answers `GET /ping` (so health checks pass while
//! slow or idle clients hold every regular slot) and 503 to anything else; when it is full, its
//! oldest connection is closed for the new one. Every limit is a setting of hyper or tower-http,
//! not a hand-written timer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::Router;
use futures_util::future::Either;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tower_http::timeout::RequestBodyTimeout;
use tracing::warn;

use crate::api_error::ApiError;
use crate::head_guard::{self, HeadGuard};

/// Connections served at once beyond the cap, for `/ping` only (a new one evicts the oldest).
const OVERFLOW_CONNECTIONS: usize = 64;
/// How long an overflow connection may take to send its request.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Bounds on clients, whatever they send or do not send.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once (beyond it, `/ping` only).
    pub max_connections: usize,
    /// Longest wait for a request's headers, idle keep-alive time included.
    pub header_timeout: Duration,
    /// Longest wait between two pieces of a request's body.
    pub body_timeout: Duration,
    /// Whether a client that shut down its write side still gets its answer.
    pub serve_half_closed: bool,
}

/// Set when the grace period ran out and in-flight requests are being dropped: their handlers
/// log that, rather than a client disconnect.
static ABANDONED_AT_SHUTDOWN: AtomicBool = AtomicBool::new(false);

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets idle and
/// half-received connections close, and waits up to `grace` for the requests in flight; those
/// still running then are dropped (and log so) before this returns. Returns whether every
/// request finished within the grace period.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> bool {
    let regular = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // The overflow connections still open, oldest first.
    let mut overflow: VecDeque<AbortHandle> = VecDeque::with_capacity(OVERFLOW_CONNECTIONS);
    let (stop, stopping) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            // Reap finished connections as we go, so the set stays as small as the live ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, mostly: let some connections close before retrying.
                warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Ok(permit) = regular.clone().try_acquire_owned() {
            let app = app.clone();
            let stopping = stopping.clone();
            connections.spawn(serve_connection(stream, app, limits, stopping, permit));
        } else {
            overflow.retain(|connection| !connection.is_finished());
            if overflow.len() >= OVERFLOW_CONNECTIONS {
                // Evict the one that has had the longest to send its request: a health probe
                // sends at once and is answered in microseconds, so clients that only connect
                // cannot keep it out (they held all 64 slots for 2 s each before).
                if let Some(oldest) = overflow.pop_front() {
                    oldest.abort();
                }
            }
            overflow.push_back(connections.spawn(serve_overflow(stream)));
        }
    }
    drop(listener);
    let _ = stop.send(true);
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_ok() {
        return true;
    }
    ABANDONED_AT_SHUTDOWN.store(true, Ordering::Relaxed);
    connections.shutdown().await;
    false
}

async fn serve_connection(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    mut stopping: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let inner = TowerToHyperService::new(RequestBodyTimeout::new(app, limits.body_timeout));
    // Requests whose headers arrived and whose answer is not fully sent: what shutdown waits for.
    let in_flight = Arc::new(AtomicUsize::new(0));
    let counter = in_flight.clone();
    // How far hyper handed requests over, for the head guard's hold on the end of input.
    let progress = Arc::new(head_guard::Progress::default());
    let reported = progress.clone();
    let service = hyper::service::service_fn(move |request| {
        let guard = InFlight::enter(&counter);
        let (request, dispatched) = head_guard::track(request, &reported);
        // Before the router, so that neither authentication nor a route answers for a head the
        // guard refused.
        let answer = match head_guard::refusal_answer(request.headers()) {
            Some(refused) => Either::Left(std::future::ready(Ok(refused))),
            None => Either::Right(hyper::service::Service::call(&inner, request)),
        };
        async move {
            let answering = dispatched.polled();
            let response = answer.await?;
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                Body::new(GuardedBody {
                    body,
                    _guard: guard,
                    _answering: answering,
                })
            }))
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // By default the end of input means the client is gone and its generation stops: TCP
        // cannot tell a client that only shut down its write side, waiting for the answer, from
        // one that closed, and nginx's default (`proxy_ignore_client_abort off`) makes the same
        // choice, so that abandoned work never runs to its deadline. `--serve-half-closed`
        // makes the other: such clients are answered, and a closed one's non-streamed request
        // runs to its end (a streamed one stops at its next write).
        .half_close(limits.serve_half_closed);
    let stream = HeadGuard::new(stream, progress);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = stopped(&mut stopping) => {
            // A connection with nothing in flight (idle, or still receiving headers) closes now;
            // one answering a request finishes that answer.
            if in_flight.load(Ordering::SeqCst) > 0 {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
            }
        }
    }
}

/// Counts a request in flight until dropped (with its response body).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in flight until it is sent or dropped.
struct GuardedBody {
    body: Body,
    _guard: InFlight,
    /// Tells the head guard the answer is done.
    _answering: head_guard::Answering,
}

impl http_body::Body for GuardedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Resolves once the loop says stop (or is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    while !*stopping.borrow_and_update() {
        if stopping.changed().await.is_err() {
            return;
        }
    }
}

/// A connection past the cap: `GET /ping` gets its answer, anything else 503 with Retry-After.
async fn serve_overflow(stream: TcpStream) {
    let service =
        hyper::service::service_fn(|request: Request<hyper::body::Incoming>| async move {
            let id = crate::routes::request_id(request.headers());
            let mut response = if request.uri().path() == "/ping" {
                StatusCode::OK.into_response()
            } else {
                ApiError::overloaded("the server has too many open connections").into_response()
            };
            if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
                response
                    .headers_mut()
                    .insert(crate::routes::REQUEST_ID_HEADER, value);
            }
            Ok::<_, std::convert::Infallible>(response)
        });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(OVERFLOW_HEADER_TIMEOUT)
        .keep_alive(false);
    let _ = builder
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// Binds `addr` with a listen backlog as deep as the connection cap (the default 128 overflowed
/// in bursts of a few thousand connections: the kernel dropped SYNs while the cap still had room).
pub fn listen(addr: std::net::SocketAddr, max_connections: u64) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let backlog = u32::try_from(max_connections.clamp(128, 65_535)).unwrap_or(1024);
    socket.listen(backlog)
}

/// Raises the soft limit on open files to the hard one, so the connection cap, not the process
/// limit, is what bounds clients (20,000 idle connections exhausted the default 1,024).
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            // SAFETY: setrlimit reads the struct we own.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                return Some(raised.rlim_cur);
            }
        }
        Some(limit.rlim_cur)
    }
    #[cfg(not(unix))]
    None
}

/// Whether the requests being dropped now are dropped by the end of the shutdown grace period.
pub fn abandoned_at_shutdown() -> bool {
    ABANDONED_AT_SHUTDOWN.load(Ordering::Relaxed)
}
