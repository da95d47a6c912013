//! The one outgoing-HTTP helper: POST a JSON body with an optional bearer token under explicit
//! timeouts, and read at most a short reply.
//!
//! Shared by the dispatch workers (GPU endpoints), the `http` handler workers and the fake GPU
//! fleet's callbacks. One `ureq::Agent` per pool, so connections to an endpoint are reused; HTTP
//! error statuses come back as values, not errors, because the caller decides what a 500 means.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

use crate::secret::Secret;
use crate::sync::Locked;

/// How much of a reply body is kept (for error messages).
const MAX_REPLY: u64 = 2048;

/// What an endpoint answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// The start of the body, lossily decoded.
    pub body: String,
}

impl Reply {
    pub(crate) fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// How long a host name's addresses are used before they are looked up again.
const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// ureq's resolver with a short cache. ureq looks the host up before every request, pooled
/// connection or not, and when the request has a timeout (ours always do) it runs each lookup on a
/// new thread: a thread created and torn down per dispatch, which the profile showed as a good
/// share of qsysd's CPU. A lookup still runs with the request's timeout, once per host per
/// [`RESOLVE_TTL`], so a DNS change is seen within that.
#[derive(Debug, Default)]
struct CachingResolver {
    inner: DefaultResolver,
    cache: Mutex<HashMap<String, (Instant, ResolvedSocketAddrs)>>,
}

impl Resolver for CachingResolver {
    fn resolve(
        &self,
        uri: &Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let key = uri
            .authority()
            .map(|a| a.as_str())
            .unwrap_or("")
            .to_string();
        let now = Instant::now();
        if let Some((at, addrs)) = self.cache().get(&key) {
            if now.duration_since(*at) < RESOLVE_TTL {
                return Ok(addrs.clone());
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        self.cache().insert(key, (now, addrs.clone()));
        Ok(addrs)
    }
}

impl CachingResolver {
    fn cache(&self) -> MutexGuard<'_, HashMap<String, (Instant, ResolvedSocketAddrs)>> {
        self.cache.locked()
    }
}

/// An agent whose statuses are values and whose idle connections are bounded.
pub fn agent() -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_idle_connections_per_host(64)
        // ureq's default keeps 10 idle connections in all: with a 16-GPU fleet behind one agent
        // nearly every dispatch opened a new connection (and a resolver thread).
        .max_idle_connections(256)
        .user_agent(concat!("qsysd/", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::with_parts(
        config,
        DefaultConnector::default(),
        CachingResolver::default(),
    )
}

/// A client that trusts only the certificates in `pem` (a self-signed certificate, or a chain
/// that holds the server's issuer): how `qsysd status` reaches an HTTPS admin listener without a
/// CA set up for it. A request may take 30 s at most unless it sets its own bound.
pub fn agent_trusting(pem: &[u8]) -> ureq::Agent {
    let roots: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c.to_owned()),
            _ => None,
        })
        .collect();
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)))
                .build(),
        )
        .build();
    ureq::Agent::new_with_config(config)
}

/// One agent per endpoint. ureq keeps an agent's idle connections in one list that every request
/// scans for its host; with a whole fleet behind one agent that scan cost more than the request.
#[derive(Default)]
pub(crate) struct Agents(Mutex<HashMap<String, ureq::Agent>>);

impl Agents {
    /// The agent for endpoint `id`, made on first use (a reload may add endpoints).
    pub(crate) fn get(&self, id: &str) -> ureq::Agent {
        let mut agents = self.0.locked();
        agents.entry(id.to_string()).or_insert_with(agent).clone()
    }
}

/// POSTs `body` as JSON. `connect` bounds the connection, `total` the whole exchange; the
/// reply's first 2 KiB are kept.
pub fn post_json(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&Secret>,
    body: &str,
    connect: Duration,
    total: Duration,
) -> Result<Reply, ureq::Error> {
    post_json_keeping(agent, url, token, body, (connect, total), MAX_REPLY)
}

/// [`post_json`] keeping the reply's first `keep` bytes: a response-mode GPU's answer is its
/// task's result.
pub(crate) fn post_json_keeping(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&Secret>,
    body: &str,
    (connect, total): (Duration, Duration),
    keep: u64,
) -> Result<Reply, ureq::Error> {
    let req = agent
        .post(url)
        .config()
        .timeout_connect(Some(connect.min(total)))
        .timeout_global(Some(total))
        .build()
        .header("Content-Type", "application/json");
    let req = authorize(req, token);
    let mut resp = req.send(body)?;
    let status = resp.status().as_u16();
    // Only the start of the reply is kept; one cut short still has a status worth reporting.
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(
        &mut std::io::Read::take(resp.body_mut().as_reader(), keep),
        &mut buf,
    );
    Ok(Reply {
        status,
        body: String::from_utf8_lossy(&buf).into_owned(),
    })
}

/// The `Authorization` value that presents `token`: the one form every qsysd client sends and the
/// admin listener expects.
pub(crate) fn bearer(token: &Secret) -> String {
    format!("Bearer {}", token.expose())
}

/// `req` with `token` presented, when there is one.
pub(crate) fn authorize<B>(
    req: ureq::RequestBuilder<B>,
    token: Option<&Secret>,
) -> ureq::RequestBuilder<B> {
    match token {
        Some(t) => req.header("Authorization", bearer(t)),
        None => req,
    }
}

/// True when the request may have reached the server before the error: a timeout once the
/// connection was up. In callback mode the GPU may then be working on the task.
pub(crate) fn maybe_delivered(e: &ureq::Error) -> bool {
    matches!(e, ureq::Error::Timeout(t)
        if !matches!(t, ureq::Timeout::Connect | ureq::Timeout::Resolve))
}

/// A short description of a transport error for logs and the task's `error` column. Never includes
/// request headers, so a bearer token cannot leak through it.
pub(crate) fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t:?})"),
        ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::Io(io) => format!("i/o error: {io}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_timeout_after_connecting_may_have_delivered() {
        assert!(maybe_delivered(&ureq::Error::Timeout(
            ureq::Timeout::Global
        )));
        assert!(maybe_delivered(&ureq::Error::Timeout(
            ureq::Timeout::RecvResponse
        )));
        assert!(!maybe_delivered(&ureq::Error::Timeout(
            ureq::Timeout::Connect
        )));
        assert!(!maybe_delivered(&ureq::Error::ConnectionFailed));
    }

    #[test]
    fn lookups_are_cached_per_host() {
        let r = CachingResolver::default();
        let config = ureq::config::Config::default();
        let uri: Uri = "http://127.0.0.1:8080/a".parse().expect("uri");
        let addrs = r
            .resolve(&uri, &config, NextTimeout::default())
            .expect("resolve");
        assert_eq!(addrs[0], "127.0.0.1:8080".parse().expect("addr"));
        let other: Uri = "http://127.0.0.1:8080/b?c=d".parse().expect("uri");
        r.resolve(&other, &config, NextTimeout::default())
            .expect("resolve");
        assert_eq!(r.cache().len(), 1, "one entry per host and port");
    }
}
