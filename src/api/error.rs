//! API errors: every 4xx/5xx answer is JSON `{"error": {"code", "message"}}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::dlq::DlqError;
use crate::failures::FailureError;
use crate::operator::OperatorError;
use crate::store::StoreError;
use crate::transport::TransportError;

/// What went wrong with an API request, with the status it answers.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (body, query, path, filter).
    #[error("{0}")]
    BadRequest(String),
    /// 401: a token is configured and the request did not present it.
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// 403: mutations are refused without a token on a non-loopback address.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 409: the action conflicts with the resource's state.
    #[error("{0}")]
    Conflict(String),
    /// 405: the path exists, the method does not; `Allow` lists the methods.
    #[error("method not allowed; allowed: {allow}")]
    MethodNotAllowed {
        /// The methods the path serves, as in the `Allow` header (`GET, POST`).
        allow: String,
    },
    /// 413: the body is over the limit.
    #[error("{0}")]
    TooLarge(String),
    /// 414: the request target (path and query) is over the limit.
    #[error("{0}")]
    UriTooLong(String),
    /// 415: a body (or a `Content-Type`) that is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 431: the request's headers are over the limit.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// 503: a dependency (PostgreSQL, RabbitMQ) is unavailable.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    /// The machine-readable code in the error body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::TooLarge(_) => "payload_too_large",
            ApiError::UriTooLong(_) => "uri_too_long",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::Unavailable(_) => "unavailable",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unauthorized => {
                response.insert_header(("WWW-Authenticate", "Bearer"));
            }
            ApiError::MethodNotAllowed { allow } => {
                response.insert_header(("Allow", allow.as_str()));
            }
            _ => {}
        }
        response.json(json!({ "error": { "code": self.code(), "message": self.to_string() } }))
    }
}

// A dependency's own error text (SQL, server messages) goes to the log, never to the
// client: input is validated before it reaches PostgreSQL, so what is left here is
// an outage (or a bug, which the log shows).
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "API: database error");
        ApiError::Unavailable("the database is unavailable; try again".into())
    }
}

impl From<TransportError> for ApiError {
    fn from(e: TransportError) -> Self {
        tracing::warn!(error = %e, "API: broker error");
        ApiError::Unavailable("the broker is unavailable; try again".into())
    }
}

impl From<DlqError> for ApiError {
    fn from(e: DlqError) -> Self {
        match e {
            DlqError::NotFound(_) => ApiError::NotFound(e.to_string()),
            DlqError::Discarded(_) | DlqError::NotParked(..) => ApiError::Conflict(e.to_string()),
            DlqError::BadPayload(_) => ApiError::BadRequest(e.to_string()),
            DlqError::Store(s) => s.into(),
            DlqError::Transport(t) => t.into(),
        }
    }
}

impl From<OperatorError> for ApiError {
    fn from(e: OperatorError) -> Self {
        match e {
            OperatorError::NotFound(_) => ApiError::NotFound(e.to_string()),
            OperatorError::Conflict(_) => ApiError::Conflict(e.to_string()),
            OperatorError::Store(s) => s.into(),
            OperatorError::Transport(t) => t.into(),
            OperatorError::Dlq(d) => d.into(),
        }
    }
}

impl From<FailureError> for ApiError {
    fn from(e: FailureError) -> Self {
        match e {
            FailureError::NotFound(_) => ApiError::NotFound(e.to_string()),
            FailureError::Store(s) => s.into(),
            FailureError::Operator(o) => o.into(),
            FailureError::Dlq(d) => d.into(),
        }
    }
}
