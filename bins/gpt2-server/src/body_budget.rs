//! A byte budget shared by every request body being received (`--body-budget-mb`).
//!
//! Each body is capped at 6 MiB, but 300 slow clients each holding 6 MiB minus one byte raised
//! the resident memory from 515 MB to 2.3 GB. The budget bounds that sum: a body reserves its
//! bytes as it arrives (all of them up front when it declares a `Content-Length`) and gives them
//! back once read. A body that does not fit is still read to its end, but discarded, so the client
//! gets a clean `503 overloaded` with `Retry-After` instead of a connection reset under its
//! answer; an upload waiting for `100 Continue` is refused without being invited.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api_error::ApiError;

/// The budget's unit: permits count KiB, so a `u32` of permits covers 4 TiB.
const UNIT: usize = 1024;

/// The bytes every body being received may hold together.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    total_bytes: usize,
}

impl BodyBudget {
    /// A budget of `bytes` (rounded down to whole KiB, at least one).
    pub fn new(bytes: usize) -> Self {
        let units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        Self {
            permits: Arc::new(Semaphore::new(units)),
            total_bytes: units * UNIT,
        }
    }

    /// The budget, in bytes.
    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Bytes the bodies being received hold now.
    pub fn reserved_bytes(&self) -> usize {
        self.total_bytes - self.permits.available_permits() * UNIT
    }

    fn try_reserve(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let units = u32::try_from(bytes.div_ceil(UNIT)).ok()?;
        self.permits.clone().try_acquire_many_owned(units).ok()
    }
}

/// The error a body over the budget ends with, once the rest of it has been read and discarded.
#[derive(Debug)]
pub struct OverBudget;

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request bodies being received exceed the server's --body-budget-mb")
    }
}

impl std::error::Error for OverBudget {}

/// The answer to a body that did not fit.
pub fn over_budget() -> ApiError {
    ApiError::overloaded(
        "the server is receiving too many request bodies at once (--body-budget-mb); retry",
    )
}

/// Whether a body read failed because it did not fit the budget.
pub fn is_over_budget(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<OverBudget>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Middleware: puts every request body under the budget.
pub async fn reserve(State(budget): State<BodyBudget>, request: Request, next: Next) -> Response {
    if request.body().is_end_stream() {
        return next.run(request).await;
    }
    let state = match crate::routes::declared_length(request.headers()) {
        // Over the per-body cap: the body limit answers 413 before much of it is read.
        Some(length) if length > crate::routes::MAX_BODY_BYTES as u64 => Reservation::Unbudgeted,
        // At most the 6 MiB cap here.
        Some(length) => match budget.try_reserve(length as usize) {
            Some(permit) => Reservation::Reserved { _held: permit },
            None if crate::routes::waits_for_continue(request.headers()) => {
                return over_budget().into_response()
            }
            None => Reservation::Discarding,
        },
        None => Reservation::PerFrame(Vec::new()),
    };
    let request = request.map(|body| {
        Body::new(BudgetedBody {
            inner: body,
            budget,
            state,
        })
    });
    next.run(request).await
}

enum Reservation {
    /// The declared length is reserved.
    Reserved { _held: OwnedSemaphorePermit },
    /// No declared length: each piece reserves its bytes as it arrives.
    PerFrame(Vec<OwnedSemaphorePermit>),
    /// Did not fit: the rest is read and dropped, then the body ends with [`OverBudget`].
    Discarding,
    /// Left to the per-body cap.
    Unbudgeted,
}

/// A request body whose bytes count against the budget until it is dropped.
struct BudgetedBody {
    inner: Body,
    budget: BodyBudget,
    state: Reservation,
}

impl http_body::Body for BudgetedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        loop {
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(None) if matches!(this.state, Reservation::Discarding) => {
                    return Poll::Ready(Some(Err(axum::Error::new(OverBudget))));
                }
                other => return other,
            };
            match &mut this.state {
                Reservation::Discarding => continue,
                Reservation::PerFrame(held) => {
                    let bytes = frame.data_ref().map_or(0, |data| data.len());
                    match this.budget.try_reserve(bytes) {
                        Some(permit) => held.push(permit),
                        None => {
                            // Give back what the earlier pieces held: the body is refused anyway.
                            this.state = Reservation::Discarding;
                            continue;
                        }
                    }
                }
                Reservation::Reserved { .. } | Reservation::Unbudgeted => {}
            }
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    fn is_end_stream(&self) -> bool {
        !matches!(self.state, Reservation::Discarding) && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(pieces: &[&[u8]]) -> Body {
        let pieces: Vec<Result<Bytes, std::convert::Infallible>> = pieces
            .iter()
            .map(|p| Ok(Bytes::copy_from_slice(p)))
            .collect();
        Body::from_stream(futures_util::stream::iter(pieces))
    }

    #[tokio::test]
    async fn pieces_reserve_as_they_arrive_and_give_back_when_dropped() {
        let budget = BodyBudget::new(4 * UNIT);
        let body = BudgetedBody {
            inner: body_of(&[&[b'a'; 1500], &[b'b'; 1000]]),
            budget: budget.clone(),
            state: Reservation::PerFrame(Vec::new()),
        };
        let bytes = axum::body::to_bytes(Body::new(body), usize::MAX)
            .await
            .expect("fits");
        assert_eq!(bytes.len(), 2500);
        assert_eq!(budget.reserved_bytes(), 0, "dropped with its body");
    }

    #[tokio::test]
    async fn a_body_over_the_budget_is_read_to_its_end_then_refused() {
        let budget = BodyBudget::new(2 * UNIT);
        let held = budget.try_reserve(UNIT).expect("room for one KiB");
        let body = BudgetedBody {
            inner: body_of(&[&[b'a'; 500], &[b'b'; 1500], &[b'c'; 10]]),
            budget: budget.clone(),
            state: Reservation::PerFrame(Vec::new()),
        };
        let error = axum::body::to_bytes(Body::new(body), usize::MAX)
            .await
            .expect_err("1 KiB left, 2 KiB sent");
        assert!(is_over_budget(&error), "{error}");
        drop(held);
        assert_eq!(budget.reserved_bytes(), 0);
    }

    #[test]
    fn the_budget_counts_whole_kib() {
        let budget = BodyBudget::new(10 * UNIT + 5);
        assert_eq!(budget.total_bytes(), 10 * UNIT);
        let permit = budget.try_reserve(1).expect("room");
        assert_eq!(budget.reserved_bytes(), UNIT);
        assert!(budget.try_reserve(10 * UNIT).is_none());
        drop(permit);
        assert!(budget.try_reserve(10 * UNIT).is_some());
    }
}
