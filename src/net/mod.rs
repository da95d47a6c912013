//! Network plumbing shared by every role: the outgoing HTTP client, the listeners' limits and
//! reconnect backoff.

pub(crate) mod backoff;
pub mod http;
pub(crate) mod redis;
pub(crate) mod server;
pub(crate) mod tls;
