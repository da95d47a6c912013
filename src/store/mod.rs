//! MySQL: the durable record of every task and the fleet-wide owner of every GPU slot.
//!
//! Every thread that changes a task's state calls into this module through a shared [`Store`] (a
//! `mysql::Pool` is thread-safe): the poller inserts rows, the scheduler claims slots, dispatch and
//! handler workers and the callback server finish attempts. The busy paths (recording, claiming,
//! ending) take a batch and apply it in one short transaction with few statements, because per-commit
//! and per-statement costs, not rows, are what limit MySQL (BENCHMARKS.md). Each change either states
//! what it expects in its `WHERE` clause (the state, the attempt number, an empty slot) or locks the
//! rows and checks them first, so two threads, or two instances, can never both win: the loser is told
//! why through a typed result rather than an error.
//!
//! The schema is created at start and migrated in place, including a table made by the seed README's
//! DDL. Migrations only use statements every MySQL-protocol server understands (no `ADD COLUMN IF NOT
//! EXISTS`, a MariaDB extension): they look at `information_schema` first, so each step is idempotent.
//!
//! By role: [`schema`] creates and migrates the tables, [`intake`] records tasks taken from the
//! queues, [`claims`] starts attempts, [`heartbeats`] keeps them alive, [`endings`] ends them,
//! [`cancels`] stops them, [`paused`] holds paused queues and types, [`retention`] deletes old
//! tasks, [`totals`] counts them at a cost that does not grow, [`pending`] keeps track of which
//! instance holds each waiting task, [`fleet`] holds slot rows, drains and instances, and
//! [`records`] answers the operator's and the dashboard's questions.

use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, PooledConn};

mod cancels;
mod claims;
mod endings;
mod fleet;
mod heartbeats;
mod intake;
#[cfg(test)]
mod offline;
mod paused;
mod pending;
mod records;
mod retention;
mod schema;
mod totals;
mod work;

pub use cancels::Cancel;
pub(crate) use cancels::Cancelling;
pub use claims::{Claim, ClaimRequest};
pub use endings::{EndRequest, Ended, Ending, Finish, HandOver, Next};
pub(crate) use heartbeats::{Beat, Beaten};
pub use intake::{Accepted, NewTask};
pub use paused::{PauseKind, Paused};
pub(crate) use pending::{LetGo, StoredTask, Waking};
pub use records::State;
pub(crate) use records::{AttemptRecord, Liveness, TaskRecord};
pub use retention::Retention;
pub use schema::SCHEMA_VERSION;
pub(crate) use totals::Counts;
pub(crate) use work::{PendingWork, PoolStat};

/// A shared handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    instance: String,
}

/// Why a store call failed. The losses a caller expects (a slot taken, a stale attempt, a
/// duplicate) are typed results, not errors: an error is an outage, data MySQL refuses
/// (`is_rejected_data`), or a database this build cannot use.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("mysql: {0}")]
    Mysql(#[from] mysql::Error),
    #[error("mysql url: {0}")]
    Url(#[from] mysql::UrlError),
    #[error("mysql schema: {0}")]
    Schema(String),
}

/// MySQL error codes that refuse a statement's data rather than report an outage: the same
/// statement fails again however often it is retried, so the row that carries the data is failed
/// instead. Out of range (1264, 1690), too long (1406), truncated or wrong value (1265, 1292,
/// 1366, 1367), not valid in the character set (1300), NULL into NOT NULL (1048), packet or row
/// too large (1153, 1301, 1118), bad JSON (3140), a CHECK constraint (3819 MySQL, 4025 MariaDB).
const DATA_ERRORS: &[u16] = &[
    1048, 1118, 1153, 1264, 1265, 1292, 1300, 1301, 1366, 1367, 1406, 1690, 3140, 3819, 4025,
];

impl StoreError {
    /// True when MySQL (or the driver, before sending) refused the data itself, not because it
    /// is unreachable or busy: retrying the same rows cannot succeed.
    pub(crate) fn is_rejected_data(&self) -> bool {
        match self {
            StoreError::Mysql(mysql::Error::MySqlError(e)) => DATA_ERRORS.contains(&e.code),
            StoreError::Mysql(mysql::Error::DriverError(mysql::DriverError::PacketTooLarge)) => {
                true
            }
            StoreError::Mysql(mysql::Error::CodecError(
                mysql_common::proto::codec::error::PacketCodecError::PacketTooLarge,
            )) => true,
            _ => false,
        }
    }
}

/// Prepared statements kept per connection. The server's limit (`max_prepared_stmt_count`,
/// 16,382 by default) is shared by every connection of every instance.
const STMT_CACHE: usize = 128;

/// Longest error text kept per task.
const MAX_ERROR: usize = 4000;

impl Store {
    /// Connects (creating the database if it does not exist), with every I/O bounded.
    pub fn connect(
        url: &str,
        tls: bool,
        instance: &str,
        max_connections: usize,
    ) -> Result<Store, StoreError> {
        let opts = Opts::from_url(url)?;
        let db = opts
            .get_db_name()
            .ok_or_else(|| StoreError::Schema("the mysql url names no database".into()))?
            .to_string();
        let mut builder = OptsBuilder::from_opts(opts)
            .tcp_connect_timeout(Some(Duration::from_secs(5)))
            .read_timeout(Some(Duration::from_secs(30)))
            .write_timeout(Some(Duration::from_secs(30)))
            // A lock wait must end well before the read timeout so it surfaces as an error we
            // can retry, not as a dead socket.
            .init(vec!["SET SESSION innodb_lock_wait_timeout = 10"])
            // Room for every statement shape (batches are padded, see `padded`), so a busy
            // connection prepares each once.
            .stmt_cache_size(Some(STMT_CACHE));
        if tls {
            builder = builder.ssl_opts(mysql::SslOpts::default());
        }
        {
            let bootstrap = builder.clone().db_name(None::<String>);
            let mut conn = mysql::Conn::new(bootstrap)?;
            conn.query_drop(format!("CREATE DATABASE IF NOT EXISTS `{db}`"))?;
        }
        let constraints =
            PoolConstraints::new(1, max_connections.max(2)).expect("min 1 is never above max >= 2");
        let pool = Pool::new(
            builder.db_name(Some(db)).pool_opts(
                PoolOpts::default()
                    .with_constraints(constraints)
                    // A reset on every return to the pool dropped the server's prepared
                    // statements, so each statement cost a prepare round trip too.
                    .with_reset_connection(false),
            ),
        )?;
        Ok(Store {
            pool,
            instance: instance.to_string(),
        })
    }

    /// The name this instance writes into the rows it holds (and that test pause points name).
    pub(crate) fn instance(&self) -> &str {
        &self.instance
    }

    /// A connection from the pool, waiting a bounded time: a pool exhausted by stuck
    /// statements surfaces as an error the caller retries, not as a thread blocked for good.
    fn conn(&self) -> Result<PooledConn, StoreError> {
        Ok(self.pool.try_get_conn(Duration::from_secs(10))?)
    }

    /// A cheap round trip, for health checks.
    pub(crate) fn ping(&self) -> Result<(), StoreError> {
        self.conn()?.query_drop("SELECT 1")?;
        Ok(())
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `n` copies of `one`, comma-separated: the placeholders of an `IN` list or a multi-row `VALUES`.
fn placeholders(n: usize, one: &str) -> String {
    vec![one; n].join(", ")
}

/// `rows` grown to the next power of two by repeating the last. Every batch statement here means
/// the same with a row repeated (an `IN` list, an `ON DUPLICATE KEY` insert of identical rows), and
/// padding leaves each statement a handful of shapes that the prepared-statement cache keeps: with
/// one shape per batch size nearly every execution was also a prepare.
fn padded<T: Clone>(mut rows: Vec<T>) -> Vec<T> {
    if let Some(last) = rows.last().cloned() {
        rows.resize(rows.len().next_power_of_two(), last);
    }
    rows
}

/// Column `i` of a row, `None` when NULL.
fn col<T: mysql::prelude::FromValue>(r: &mut mysql::Row, i: usize) -> Option<T> {
    r.take::<Option<T>, _>(i).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn batches_pad_to_a_power_of_two() {
        assert_eq!(padded(vec![1, 2, 3]), [1, 2, 3, 3]);
        assert_eq!(padded(vec![1, 2, 3, 4]), [1, 2, 3, 4]);
        assert_eq!(padded(vec![7]), [7]);
        assert_eq!(padded((0..17).collect()).len(), 32);
        assert!(padded(Vec::<u8>::new()).is_empty());
    }

    #[test]
    fn placeholder_lists() {
        assert_eq!(placeholders(3, "?"), "?, ?, ?");
        assert_eq!(placeholders(2, "(?, ?)"), "(?, ?), (?, ?)");
        assert_eq!(placeholders(1, "?"), "?");
    }
}
