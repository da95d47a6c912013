//! The one Redis connector: every connection qsysd or its tools open has a connect timeout and
//! read and write timeouts, so no Redis that stops answering can hold a thread.

use std::time::Duration;

use redis::{Client, Connection, RedisResult};

/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long writing one command may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to `client`'s server whose replies may take up to `read` (longer than any
/// blocking command sent on it: a read timeout during a blocking pop makes the client drop the
/// late reply, and the popped element with it).
pub(crate) fn connect(client: &Client, read: Duration) -> RedisResult<Connection> {
    let conn = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    conn.set_read_timeout(Some(read))?;
    conn.set_write_timeout(Some(WRITE_TIMEOUT))?;
    Ok(conn)
}
