//! API errors: every 4xx/5xx answer is JSON `{"error": {"code", "message"}}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::dlq::DlqError;
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
    /// 413: the body is over the limit.
    #[error("{0}")]
    TooLarge(String),
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
            ApiError::TooLarge(_) => "payload_too_large",
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
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        response.json(json!({ "error": { "code": self.code(), "message": self.to_string() } }))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "API: database error");
        ApiError::Unavailable(format!("database: {e}"))
    }
}

impl From<TransportError> for ApiError {
    fn from(e: TransportError) -> Self {
        ApiError::Unavailable(format!("broker: {e}"))
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
