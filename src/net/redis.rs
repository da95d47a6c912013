//! The one Redis connector: every connection qsysd or its tools open has a connect timeout and
//! read and write timeouts, so no Redis that stops answering can hold a thread.

use std::time::Duration;

use redis::{Client, Connection, RedisResult};

/// The bounds of one connection. A read timeout must outlast any blocking command sent on the
/// connection: a read timeout during a blocking pop makes the client drop the late reply, and
/// the popped element with it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) read: Duration,
    pub(crate) write: Duration,
}

impl Timeouts {
    /// For short commands: 5 s to connect, 10 s per read or write.
    pub(crate) const SHORT: Timeouts = Timeouts {
        connect: Duration::from_secs(5),
        read: Duration::from_secs(10),
        write: Duration::from_secs(10),
    };

    /// [`Timeouts::SHORT`] with replies allowed `read`.
    pub(crate) fn reading(read: Duration) -> Timeouts {
        Timeouts {
            read,
            ..Timeouts::SHORT
        }
    }
}

/// A connection to `client`'s server within `t`.
pub(crate) fn connect(client: &Client, t: Timeouts) -> RedisResult<Connection> {
    let conn = client.get_connection_with_timeout(t.connect)?;
    conn.set_read_timeout(Some(t.read))?;
    conn.set_write_timeout(Some(t.write))?;
    Ok(conn)
}
