//! The dashboard: one static page built into the binary, served with headers that keep it from
//! being framed, leaking its `?token=` or running anything but its own script.

use tiny_http::{Header, Request, Response};

/// The dashboard, built into the binary: plain HTML, CSS and JavaScript, no build chain.
pub(super) const DASHBOARD: &str = include_str!("dashboard.html");
/// What `GET /` answers without a valid token: a form that asks for one.
pub(super) const LOGIN: &str = include_str!("dashboard-login.html");

/// Serves a built-in page. The headers keep it from being framed (a hidden drain button), from
/// leaking a `?token=` through `Referer`, and from running anything but its own inline script.
pub(super) fn page(req: Request, status: u16, html: &'static str) {
    let headers = [
        ("Content-Type", "text/html; charset=utf-8"),
        (
            "Content-Security-Policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; \
             frame-ancestors 'none'",
        ),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-store"),
    ];
    let mut resp = Response::from_string(html).with_status_code(status);
    for (k, v) in headers {
        resp.add_header(Header::from_bytes(k, v).expect("static header is valid"));
    }
    let _ = req.respond(resp);
}
