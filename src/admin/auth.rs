//! Who may use the admin API: the bearer token when one is configured; without one (loopback
//! only), no browser request from another site or through a non-loopback name.

use tiny_http::Request;

use crate::shared::Shared;

/// Constant time: the comparison must not leak how much of the token matched.
fn same_secret(got: &[u8], want: &[u8]) -> bool {
    got.len() == want.len() && got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn header<'a>(req: &'a Request, name: &'static str) -> Option<&'a str> {
    req.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// Whether the request carries the admin token (or none is configured). `query_token`: the page's
/// `?token=`, accepted for `GET /` only.
pub(super) fn authorized(shared: &Shared, req: &Request, query_token: Option<&str>) -> bool {
    let Some(token) = shared.config().admin.token.clone() else {
        return true;
    };
    let want = crate::net::http::bearer(&token);
    header(req, "Authorization").is_some_and(|got| same_secret(got.as_bytes(), want.as_bytes()))
        || query_token.is_some_and(|got| same_secret(got.as_bytes(), token.expose().as_bytes()))
}

/// Why a browser request must be refused, if it must. Only a listener without a token needs this:
/// a page elsewhere cannot add the bearer header to its requests, but without a token it could
/// drain a GPU (cross-site POST) or, through a name of its own that resolves to loopback (DNS
/// rebinding), read task data. Clients other than browsers send no `Origin` and are unaffected.
pub(super) fn foreign(shared: &Shared, req: &Request) -> Option<&'static str> {
    if shared.config().admin.token.is_some() {
        return None;
    }
    let host = header(req, "Host").unwrap_or("");
    if let Some(origin) = header(req, "Origin") {
        let origin_host = origin.split_once("://").map_or("", |(_, h)| h);
        if origin_host != host {
            return Some("cross-origin request refused");
        }
    }
    // A tokenless listener is loopback (the config insists), so only loopback names reach it
    // honestly.
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    let loopback = name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !host.is_empty() && !loopback {
        return Some("host name refused (use a loopback address, or set admin.token)");
    }
    None
}
