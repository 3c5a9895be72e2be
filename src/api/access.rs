//! Who may call the API, and from where: the bearer token, the no-token rules
//! against cross-site requests and DNS rebinding, request-head limits, and the
//! security headers every response carries.
//!
//! **With `SKALD_API_TOKEN`**, every `/api/v1` request and `/metrics` need
//! `Authorization: Bearer <token>` (scheme case-insensitive, token compared in
//! constant time). A browser never adds that header by itself, so another site cannot
//! make the operator's browser call the API.
//!
//! **Without a token** (loopback only, see [`super::check_exposure`]), a browser is
//! the only way in from outside, so browser requests are held to this server:
//! - the `Host` header, when sent, must name a loopback address (`localhost`,
//!   `127.0.0.1`, `[::1]`, any port): a page on another name that resolves to
//!   127.0.0.1 (DNS rebinding) is refused;
//! - a mutation (any method but GET and HEAD) carrying an `Origin` header must come
//!   from this server's own origin (`http://` + the `Host` header): a form or script
//!   on another site (another port included) is refused. Without an `Origin` header
//!   (curl, the CLI) the request is not a browser's cross-site one;
//! - and mutations are refused outright when the server is not on loopback.

use std::net::IpAddr;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{ResponseError, web};

use super::{ApiError, ApiState};

/// Longest request target (path and query) answered; longer is 414.
pub(super) const MAX_URI: usize = 8 * 1024;
/// Most header bytes (names and values) answered; more is 431.
pub(super) const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The policy of the dashboard page: its own script and style only, no framing.
/// (JSON answers carry it too: harmless, and it keeps them from being framed.)
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

type Answer<B> = Result<ServiceResponse<EitherBody<B>>, actix_web::Error>;

fn refuse<B>(req: ServiceRequest, e: ApiError) -> Answer<B> {
    Ok(req.into_response(e.error_response()).map_into_right_body())
}

/// Every request: head limits, the no-token `Host`/`Origin` rules, and the security
/// headers on every answer.
pub async fn outer<B: MessageBody + 'static>(req: ServiceRequest, next: Next<B>) -> Answer<B> {
    let state = req
        .app_data::<web::Data<ApiState>>()
        .expect("ApiState is registered")
        .clone();
    let refusal = head_too_large(&req).or_else(|| {
        state
            .token
            .is_none()
            .then(|| cross_site(&req, state.loopback))
            .flatten()
    });
    let mut res = match refusal {
        Some(e) => refuse(req, e)?,
        None => next.call(req).await?.map_into_left_body(),
    };
    let headers = res.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    Ok(res)
}

/// `/api/v1` and `/metrics`: the bearer token, when one is set.
pub async fn token<B: MessageBody + 'static>(req: ServiceRequest, next: Next<B>) -> Answer<B> {
    let state = req
        .app_data::<web::Data<ApiState>>()
        .expect("ApiState is registered")
        .clone();
    if let Some(token) = &state.token {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .unwrap_or("");
        if !constant_time_eq(presented.as_bytes(), token.as_bytes()) {
            return refuse(req, ApiError::Unauthorized);
        }
    }
    Ok(next.call(req).await?.map_into_left_body())
}

/// The credentials of an `Authorization: Bearer <token>` value; the scheme is
/// case-insensitive (RFC 9110 §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim().split_once(char::is_whitespace)?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim_start())
}

fn head_too_large(req: &ServiceRequest) -> Option<ApiError> {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI {
        return Some(ApiError::UriTooLong(format!(
            "the path and query are over {MAX_URI} bytes"
        )));
    }
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    (header_bytes > MAX_HEADER_BYTES).then(|| {
        ApiError::HeadersTooLarge(format!("the headers are over {MAX_HEADER_BYTES} bytes"))
    })
}

/// The no-token rules (module docs): `None` when the request may go on.
fn cross_site(req: &ServiceRequest, loopback: bool) -> Option<ApiError> {
    let forbidden = |m: &str| Some(ApiError::Forbidden(m.to_string()));
    let host = req.headers().get(header::HOST).map(|h| h.to_str());
    let host = match host {
        None => None,
        Some(Ok(h)) if is_loopback_host(h) => Some(h),
        Some(_) => {
            return forbidden(
                "the Host header must name this server's loopback address \
                 (localhost, 127.0.0.1 or [::1]) when no SKALD_API_TOKEN is set",
            );
        }
    };
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return None;
    }
    if !loopback {
        return forbidden("mutations need SKALD_API_TOKEN when not bound to loopback");
    }
    match req.headers().get(header::ORIGIN) {
        None => None,
        Some(origin) => {
            let own = host.map(|h| format!("http://{h}"));
            let same =
                own.is_some_and(|own| origin.as_bytes().eq_ignore_ascii_case(own.as_bytes()));
            (!same)
                .then_some(())
                .and_then(|()| forbidden("cross-origin requests may not change anything"))
        }
    }
}

/// Whether a `Host` header value names a loopback address (any port).
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [::1]:8080
        Some(rest) => rest.split_once(']').map_or(rest, |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secrets"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER   abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn only_loopback_names_are_loopback_hosts() {
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "127.0.0.2",
            "[::1]:80",
            "LOCALHOST:1",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example:8080",
            "10.0.0.1:8080",
            "localhost.evil.example",
            "[::2]:80",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
