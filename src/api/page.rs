//! The dashboard page and its script and style, embedded in the binary. Script and
//! style are files of their own so that the Content-Security-Policy can allow this
//! server's files only, never inline code.

use actix_web::HttpResponse;

/// `GET /`: the page.
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("dashboard.html"))
}

/// `GET /dashboard.js`.
pub async fn script() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(include_str!("dashboard.js"))
}

/// `GET /dashboard.css`.
pub async fn style() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .body(include_str!("dashboard.css"))
}
