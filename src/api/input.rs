//! Request input at the edge: JSON bodies and query strings read into the handlers'
//! own types and validated before a handler runs. A handler that takes a [`JsonBody`]
//! or a [`QueryParams`] therefore never acts on input that did not parse and validate:
//! any body or query error is a 4xx naming the field, and nothing happens.
//!
//! Rules, shared by every endpoint:
//! - a body, when sent, must be `Content-Type: application/json` (415 otherwise); a
//!   `Content-Type` other than JSON is refused even with an empty body;
//! - an empty body means the type's defaults where the body is optional
//!   ([`Input::when_empty`]), and is a 400 where it is required;
//! - a body that is not a JSON object, unknown fields, wrong types, trailing data
//!   and duplicate fields are 400; a body over [`super::MAX_BODY`] bytes is 413;
//! - no string (or object key) may contain a NUL character: PostgreSQL cannot store
//!   one, so it is a 400 here rather than a database error later.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::StatusCode;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use chrono::{DateTime, Datelike, Utc};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;

/// A request type read by [`JsonBody`] or [`QueryParams`]: how an empty body reads,
/// and the checks beyond what its type says.
pub trait Input: DeserializeOwned + 'static {
    /// The value an empty body stands for, or `None` where a body is required.
    fn when_empty() -> Option<Self> {
        None
    }

    /// Range and format checks; the error names the field.
    fn validate(&self) -> Result<(), ApiError> {
        Ok(())
    }
}

/// A JSON body read into `T` and validated (see the module rules).
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// A query string read into `T` and validated (see the module rules).
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

type Extracted<T> = Pin<Box<dyn Future<Output = Result<T, ApiError>>>>;

impl<T: Input> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = Extracted<Self>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let is_json = json_content_type(req);
        let bytes = web::Bytes::from_request(req, payload);
        Box::pin(async move {
            let bytes = bytes.await.map_err(|e| {
                if e.as_response_error().status_code() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::TooLarge(format!("the body is over {} bytes", super::MAX_BODY))
                } else {
                    ApiError::BadRequest(format!("cannot read the body: {e}"))
                }
            })?;
            match is_json? {
                Some(false) => return Err(not_json()),
                None if !bytes.is_empty() => return Err(not_json()),
                _ => {}
            }
            if bytes.is_empty() {
                return T::when_empty()
                    .map(JsonBody)
                    .ok_or_else(|| ApiError::BadRequest("a JSON body is required".into()));
            }
            let value = parse_json::<T>(&bytes)?;
            value.validate()?;
            Ok(JsonBody(value))
        })
    }
}

impl<T: Input> FromRequest for QueryParams<T> {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready(parse_query(req.query_string()).map(QueryParams))
    }
}

/// Whether the request declares a JSON body: `None` without a `Content-Type`.
fn json_content_type(req: &HttpRequest) -> Result<Option<bool>, ApiError> {
    match req.mime_type() {
        Ok(None) => Ok(None),
        Ok(Some(mime)) => Ok(Some(mime.essence_str() == "application/json")),
        Err(_) => Err(not_json()),
    }
}

fn not_json() -> ApiError {
    ApiError::UnsupportedMediaType("the body must be sent as Content-Type: application/json".into())
}

fn parse_json<T: Input>(bytes: &[u8]) -> Result<T, ApiError> {
    let invalid = |path: String, e: serde_json::Error| {
        let at = if path == "." {
            String::new()
        } else {
            format!(" at `{path}`")
        };
        ApiError::BadRequest(format!("invalid JSON body{at}: {}", plain(&e.to_string())))
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| invalid(e.path().to_string(), e.into_inner()))?;
    de.end().map_err(|e| invalid(".".into(), e))?;
    // The typed read above accepted the body; serde also reads a struct from an array
    // (`[null, null]`), which is no JSON object. This read checks the shape and looks
    // for NUL characters.
    let raw: Value = serde_json::from_slice(bytes).map_err(|e| invalid(".".into(), e))?;
    if !raw.is_object() {
        return Err(ApiError::BadRequest(
            "invalid JSON body: expected a JSON object".into(),
        ));
    }
    if let Some(path) = crate::envelope::nul_path(&raw, "") {
        return Err(ApiError::BadRequest(format!(
            "invalid JSON body at `{path}`: contains a NUL character (\\u0000)"
        )));
    }
    Ok(value)
}

fn parse_query<T: Input>(query: &str) -> Result<T, ApiError> {
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name.contains('\0') || value.contains('\0') {
            return Err(ApiError::BadRequest(format!(
                "query parameter `{}` contains a NUL character",
                name.replace('\0', "\\0")
            )));
        }
    }
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let message = plain(&e.into_inner().to_string());
        if path == "." {
            ApiError::BadRequest(format!("invalid query: {message}"))
        } else {
            ApiError::BadRequest(format!("invalid query parameter `{path}`: {message}"))
        }
    })?;
    value.validate()?;
    Ok(value)
}

/// serde names the Rust integer type it expected (`expected u32`); clients are told
/// what to send instead.
fn plain(message: &str) -> String {
    let mut out = message.to_string();
    for ty in ["u8", "u16", "u32", "u64", "usize"] {
        out = out.replace(&format!("expected {ty}"), "expected an integer ≥ 0");
    }
    for ty in ["i8", "i16", "i32", "i64", "isize"] {
        out = out.replace(&format!("expected {ty}"), "expected an integer");
    }
    out
}

/// Checks that `value`, when given, is in `range`; the error names `field`.
pub fn check_range<N>(
    field: &str,
    value: Option<N>,
    range: std::ops::RangeInclusive<N>,
) -> Result<(), ApiError>
where
    N: PartialOrd + std::fmt::Display + Copy,
{
    match value {
        Some(v) if !range.contains(&v) => Err(ApiError::BadRequest(format!(
            "`{field}` must be from {} to {}, not {v}",
            range.start(),
            range.end()
        ))),
        _ => Ok(()),
    }
}

/// Checks that a time, when given, is one PostgreSQL stores and RFC 3339 writes
/// (years 1 to 9999); the error names `field`.
pub fn check_time(field: &str, value: Option<&DateTime<Utc>>) -> Result<(), ApiError> {
    match value {
        Some(t) if !(1..=9999).contains(&t.year()) => Err(ApiError::BadRequest(format!(
            "`{field}` must be a time between the years 1 and 9999"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_no_rust_integer_type() {
        assert_eq!(
            plain("invalid value: integer `-1`, expected u32"),
            "invalid value: integer `-1`, expected an integer ≥ 0"
        );
    }
}
