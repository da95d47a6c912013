//! The two HTTP listeners (callback and admin): what any one client may cost them.
//!
//! Both face clients qsysd does not control (GPU endpoints, anything that can reach the port),
//! so every limit is set before the first byte is read: the patched `tiny_http` (vendor/README.md)
//! reads a request's head and body on the connection's own thread, within
//! [`REQUEST_TIMEOUT`], and only then hands it to qsysd's threads. A client that trickles bytes,
//! sends an endless header, declares an absurd `Content-Length` or stops reading therefore holds
//! one connection thread for a bounded time, never a callback or admin thread.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tiny_http::{Header, Limits, Request, Response, Server};

use crate::net::tls::Renewable;

/// From a request's first byte until its head and body are in memory.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// One read or write on a socket, and a kept-alive connection's wait for its next request.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once per listener; one more is closed at accept, before it costs a
/// thread. Well under the file descriptors [`raise_fd_limit`] makes room for.
pub(crate) const MAX_CONNECTIONS: usize = 1024;
/// Longest request line plus headers.
pub(crate) const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines in one request.
pub(crate) const MAX_HEADERS: usize = 64;

/// Binds `addr` and serves it with the limits above and bodies of at most `max_body` bytes, over
/// TLS with `tls`'s certificate when given.
pub(crate) fn bind(
    addr: SocketAddr,
    max_body: usize,
    tls: Option<&Arc<Renewable>>,
) -> std::io::Result<Server> {
    let listener = TcpListener::bind(addr)?;
    let limits = Limits {
        max_body,
        max_head_bytes: MAX_HEAD_BYTES,
        max_headers: MAX_HEADERS,
        request_timeout: REQUEST_TIMEOUT,
        idle_timeout: IDLE_TIMEOUT,
        max_connections: MAX_CONNECTIONS,
    };
    match tls {
        None => Server::from_listener_with_limits(listener, None, limits),
        Some(cert) => {
            let config = cert.server_config().map_err(std::io::Error::other)?;
            Server::from_listener_with_tls(listener, config, limits)
        }
    }
    .map_err(std::io::Error::other)
}

/// True when the request's body was over the listener's limit and so was never read: answer 413.
pub(crate) fn body_refused(req: &Request, max_body: usize) -> bool {
    req.closes_connection() || req.body_length().is_some_and(|n| n > max_body)
}

/// Raises the soft limit on open files to the hard limit (systemd starts services at 1,024), so
/// that both listeners at [`MAX_CONNECTIONS`] plus MySQL, Redis and GPU connections fit. Best
/// effort: where the limit cannot move, the connection cap still keeps accept from failing.
pub(crate) fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// 405, with the `Allow` header RFC 9110 requires: the methods `allow` names.
pub(crate) fn not_allowed(req: Request, allow: &'static str) {
    let header = Header::from_bytes("Allow", allow).expect("static header is valid");
    let ctype =
        Header::from_bytes("Content-Type", "application/json").expect("static header is valid");
    let resp = Response::from_string(json!({ "error": "method not allowed" }).to_string())
        .with_status_code(405)
        .with_header(ctype)
        .with_header(header);
    let _ = req.respond(resp);
}

pub(crate) fn reply(req: Request, status: u16, body: &Value) {
    let header =
        Header::from_bytes("Content-Type", "application/json").expect("static header is valid");
    let resp = Response::from_string(body.to_string())
        .with_status_code(status)
        .with_header(header);
    let _ = req.respond(resp);
}

/// Reads the body, refusing more than `max` bytes. `None`: too large. The listener has read it
/// into memory already ([`crate::net::server`]), so this never waits on the client.
pub(crate) fn read_body(req: &mut Request, max: usize) -> Option<Vec<u8>> {
    if crate::net::server::body_refused(req, max) {
        return None;
    }
    let mut body = Vec::new();
    let limit = max as u64 + 1;
    if req.as_reader().take(limit).read_to_end(&mut body).is_err() {
        return Some(Vec::new()); // a broken body parses as malformed
    }
    (body.len() <= max).then_some(body)
}
