//! Every error answer: a status code and `{"error": "<message>", "error_type": "<kind>"}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use gpt2_engine::{EngineError, RequestError, SubmitError};

/// An HTTP error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub message: String,
    /// Seconds, for 503 answers.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
            retry_after: None,
        }
    }

    /// `503 overloaded` with `Retry-After: 1`: the client should retry shortly.
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no route for {path}"),
        )
    }

    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::MalformedJson(_) => {
                Self::new(StatusCode::BAD_REQUEST, e.kind(), e.to_string())
            }
            RequestError::InvalidField { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, e.kind(), e.to_string())
            }
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { .. } => Self::overloaded(e.to_string()),
            SubmitError::DeadlineExceeded(_) => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                e.to_string(),
            ),
            SubmitError::WorkerGone => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            SubmitError::Engine(EngineError::Request(e)) => e.into(),
            SubmitError::Engine(EngineError::DeadlineExceeded) => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                e.to_string(),
            ),
            // Only a request whose client is gone is cancelled: nobody reads this answer, but the
            // request log records it as what it is (nginx's 499).
            SubmitError::Engine(EngineError::Cancelled) => Self::new(
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
                "client_disconnected",
                e.to_string(),
            ),
            SubmitError::Engine(e) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                e.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message, "error_type": self.error_type });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
