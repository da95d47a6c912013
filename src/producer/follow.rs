//! `qsys-push --wait`: follows pushed tasks in MySQL's `tasks` table until each is terminal
//! (`finished`, `failed` or `cancelled`) or a deadline passes; with `--json`, each task's final
//! state, error and result (from `task_results`) are kept for one line per task.
//!
//! Runs on the CLI's main thread and only reads: every ~250 ms one `SELECT ... WHERE task_id IN
//! (...)` per 500 ids not yet terminal. A task without a row is still in Redis (or the daemon has
//! not created its database yet); that is waiting, not an error. Also draws the one-line progress
//! bar for a terminal.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;

use crate::config::MysqlConfig;

const POLL: Duration = Duration::from_millis(250);
/// Ids per query: keeps statements small however many tasks were pushed.
const IDS_PER_QUERY: usize = 500;
/// How long MySQL may keep failing, once it has answered, before the wait gives up.
const OUTAGE: Duration = Duration::from_secs(30);
/// Failed tasks listed by id in the summary.
const LIST: usize = 10;
/// MySQL's "unknown database" and "table doesn't exist": qsysd has not created them yet.
const NOT_YET: [u16; 2] = [1049, 1146];

#[derive(Debug, thiserror::Error)]
pub(crate) enum WaitError {
    #[error("mysql: {0}")]
    Mysql(#[from] mysql::Error),
    #[error("mysql: {0}")]
    Url(#[from] mysql::UrlError),
}

/// Counts so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub total: usize,
    pub finished: usize,
    pub failed: usize,
    pub cancelled: usize,
}

/// A task's end as `--wait --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ended {
    pub state: String,
    pub error: Option<String>,
    /// The stored result, as JSON text.
    pub result: Option<String>,
}

/// How the wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Summary {
    pub tally: Tally,
    /// Failed tasks with their recorded error, in push order.
    pub failed: Vec<(String, String)>,
    /// Every task that ended, by id (kept only when results were asked for).
    pub ended: HashMap<String, Ended>,
    /// Tasks not terminal when the deadline passed, in push order.
    pub unfinished: Vec<String>,
    /// Ids that already belonged to a task running or done before the push, with its state:
    /// qsysd drops such a copy as a duplicate, so this push does not run them again.
    pub known: Vec<(String, String)>,
    pub elapsed: Duration,
}

impl Summary {
    pub(crate) fn all_finished(&self) -> bool {
        // `finished` counts only finished tasks: a cancelled one is not.
        self.tally.finished == self.tally.total && self.known.is_empty()
    }

    /// The lines to print.
    pub(crate) fn report(&self, timeout: Duration) -> Vec<String> {
        let t = self.tally;
        let known = if self.known.is_empty() {
            String::new()
        } else {
            format!(", {} already known", self.known.len())
        };
        let cancelled = if t.cancelled == 0 {
            String::new()
        } else {
            format!(", {} cancelled", t.cancelled)
        };
        let mut lines = vec![format!(
            "{} tasks: {} finished, {} failed{cancelled}, {} not done{known} ({:.1}s)",
            t.total,
            t.finished,
            t.failed,
            self.unfinished.len(),
            self.elapsed.as_secs_f64()
        )];
        lines.extend(list(
            "already known, not run again",
            self.known
                .iter()
                .map(|(id, state)| format!("{id} ({state})")),
        ));
        lines.extend(list(
            "failed",
            self.failed.iter().map(|(id, e)| format!("{id}: {e}")),
        ));
        if !self.unfinished.is_empty() {
            lines.push(format!(
                "timed out after {}: {} tasks not done",
                crate::config::format_duration(timeout),
                self.unfinished.len()
            ));
            lines.extend(list("not done", self.unfinished.iter().cloned()));
        }
        lines
    }
}

fn list(what: &str, items: impl ExactSizeIterator<Item = String>) -> Vec<String> {
    let n = items.len();
    let mut lines: Vec<String> = items.take(LIST).map(|i| format!("{what}: {i}")).collect();
    if n > LIST {
        lines.push(format!("... and {} more {what}", n - LIST));
    }
    lines
}

fn connect(mysql: &MysqlConfig) -> Result<mysql::Conn, WaitError> {
    let mut opts = mysql::OptsBuilder::from_opts(mysql::Opts::from_url(&mysql.url)?)
        .tcp_connect_timeout(Some(Duration::from_secs(5)))
        .read_timeout(Some(Duration::from_secs(10)))
        .write_timeout(Some(Duration::from_secs(10)));
    if mysql.tls {
        opts = opts.ssl_opts(mysql::SslOpts::default());
    }
    Ok(mysql::Conn::new(opts)?)
}

fn not_yet(e: &WaitError) -> bool {
    matches!(e, WaitError::Mysql(mysql::Error::MySqlError(m)) if NOT_YET.contains(&m.code))
}

/// Ids among `ids` whose task was already running or done: `task_id -> state`. Asked before the
/// push, so `--wait` can tell a reused id (whose old row qsysd keeps, dropping the new copy) from
/// a task of this push. `pending` rows are not counted: qsysd takes a pushed copy of those over.
/// Best effort: when MySQL cannot be asked, nothing is known and the wait reports as before.
pub(crate) fn known_before(mysql: &MysqlConfig, ids: &[String]) -> HashMap<String, String> {
    let Ok(mut conn) = connect(mysql) else {
        return HashMap::new();
    };
    let mut known = HashMap::new();
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let marks = vec!["?"; chunk.len()].join(",");
        let rows: Result<Vec<(String, Option<String>)>, _> = conn.exec(
            format!(
                "SELECT task_id, state FROM tasks WHERE task_id IN ({marks}) \
                 AND (state IS NULL OR state <> 'pending')"
            ),
            chunk.to_vec(),
        );
        match rows {
            Ok(rows) => known.extend(
                rows.into_iter()
                    .map(|(id, state)| (id, state.unwrap_or_else(|| "NULL".into()))),
            ),
            Err(_) => return HashMap::new(),
        }
    }
    known
}

/// Terminal rows among `ids`, with their results when `results` (only then is the result
/// table read: a task's result may be large).
fn poll(
    conn: &mut mysql::Conn,
    ids: &[String],
    results: bool,
) -> Result<HashMap<String, Ended>, WaitError> {
    let mut done = HashMap::new();
    let result = if results {
        "(SELECT result FROM task_results r WHERE r.task_id = t.task_id)"
    } else {
        "NULL"
    };
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let marks = vec!["?"; chunk.len()].join(",");
        let rows: Vec<(String, String, Option<String>, Option<String>)> = conn.exec(
            format!(
                "SELECT task_id, state, error, {result} FROM tasks t \
                 WHERE state IN ('finished', 'failed', 'cancelled') AND task_id IN ({marks})"
            ),
            chunk.to_vec(),
        )?;
        for (id, state, error, result) in rows {
            done.insert(
                id,
                Ended {
                    state,
                    error,
                    result,
                },
            );
        }
    }
    Ok(done)
}

/// What to follow, and how.
pub(crate) struct Follow<'a> {
    pub ids: &'a [String],
    /// Ids ([`known_before`]) not waited for: they are reported as already known.
    pub known: &'a HashMap<String, String>,
    pub timeout: Duration,
    /// Keep each task's end, result included, for `--json`.
    pub results: bool,
    /// The tasks' types: the ETA is their pools' time to drain.
    pub types: &'a [String],
}

/// Pool numbers older than this are an instance's that stopped: not an ETA.
const STALE_POOLS: u32 = 30;

/// The ETA as last read, and when: read at most once a second.
#[derive(Default)]
struct Eta {
    value: Option<f64>,
    read: Option<Instant>,
}

impl Eta {
    fn refresh(&mut self, conn: Option<&mut mysql::Conn>, types: &[String]) -> Option<f64> {
        if let Some(c) = conn {
            if self
                .read
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                self.read = Some(Instant::now());
                self.value = eta(c, types);
            }
        }
        self.value
    }
}

/// When the pools of `types` will have done their backlog (these tasks included), in seconds,
/// as the daemon last published it (`pool_stats`, every 5 s); `None` when it has no estimate.
fn eta(conn: &mut mysql::Conn, types: &[String]) -> Option<f64> {
    let rows: Vec<(Option<f64>, String)> = conn
        .query(format!(
            "SELECT drain_s, types FROM pool_stats \
             WHERE updated_at > NOW(3) - INTERVAL {STALE_POOLS} SECOND"
        ))
        .ok()?;
    rows.into_iter()
        .filter(|(_, t)| {
            let theirs: Vec<String> = serde_json::from_str(t).unwrap_or_default();
            theirs.iter().any(|t| types.contains(t))
        })
        .filter_map(|(d, _)| d)
        .reduce(f64::max)
}

/// Waits until every task of `ids` is terminal or `timeout` passes, calling `progress` after each
/// poll. Fails only when MySQL cannot be reached at the start or stays unreachable for 30 s.
pub(crate) fn wait(
    mysql: &MysqlConfig,
    follow: &Follow<'_>,
    mut progress: impl FnMut(&Tally, Option<f64>),
) -> Result<Summary, WaitError> {
    let Follow {
        ids,
        known,
        timeout,
        results,
        types,
    } = *follow;
    let started = Instant::now();
    let deadline = started + timeout;
    let mut tally = Tally {
        total: ids.len(),
        ..Tally::default()
    };
    let known: Vec<(String, String)> = ids
        .iter()
        .filter_map(|id| known.get(id).map(|s| (id.clone(), s.clone())))
        .collect();
    let mut pending: Vec<String> = ids
        .iter()
        .filter(|id| !known.iter().any(|(k, _)| k == *id))
        .cloned()
        .collect();
    let mut failed = Vec::new();
    let mut ended = HashMap::new();
    let mut conn: Option<mysql::Conn> = None;
    let mut answered = false;
    let mut failing_since: Option<Instant> = None;
    let mut estimate = Eta::default();
    loop {
        let result = match conn.as_mut() {
            Some(c) => poll(c, &pending, results),
            None => connect(mysql).and_then(|mut c| {
                let r = poll(&mut c, &pending, results);
                conn = Some(c);
                r
            }),
        };
        match result {
            Ok(done) => {
                answered = true;
                failing_since = None;
                settle(&mut pending, &done, &mut tally, &mut failed);
                if results {
                    ended.extend(done);
                }
            }
            Err(e) if not_yet(&e) => {
                answered = true;
                failing_since = None;
            }
            Err(e) => {
                conn = None;
                let since = *failing_since.get_or_insert_with(Instant::now);
                if !answered || since.elapsed() >= OUTAGE {
                    return Err(e);
                }
            }
        }
        progress(&tally, estimate.refresh(conn.as_mut(), types));
        let now = Instant::now();
        if pending.is_empty() || now >= deadline {
            break;
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
    in_push_order(ids, &mut failed);
    Ok(Summary {
        tally,
        failed,
        ended,
        unfinished: pending,
        known,
        elapsed: started.elapsed(),
    })
}

/// Takes the tasks a poll found terminal off `pending`, counting them (and keeping the failed
/// ones' errors).
fn settle(
    pending: &mut Vec<String>,
    done: &HashMap<String, Ended>,
    tally: &mut Tally,
    failed: &mut Vec<(String, String)>,
) {
    pending.retain(|id| match done.get(id) {
        Some(e) if e.state == "failed" => {
            tally.failed += 1;
            failed.push((id.clone(), e.error.clone().unwrap_or_default()));
            false
        }
        Some(e) if e.state == "cancelled" => {
            tally.cancelled += 1;
            false
        }
        Some(_) => {
            tally.finished += 1;
            false
        }
        None => true,
    });
}

/// Failed tasks in push order, whatever order the polls found them in.
fn in_push_order(ids: &[String], failed: &mut [(String, String)]) {
    let order: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    failed.sort_by_key(|(id, _)| order.get(id.as_str()).copied());
}

/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
pub(crate) struct ProgressBar {
    enabled: bool,
    drawn: bool,
}

impl ProgressBar {
    pub(crate) fn new(enabled: bool) -> ProgressBar {
        ProgressBar {
            enabled,
            drawn: false,
        }
    }

    pub(crate) fn draw(&mut self, tally: &Tally, eta: Option<f64>, started: Instant) {
        if self.enabled {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{}\x1b[K", render(tally, started.elapsed(), eta));
            let _ = err.flush();
            self.drawn = true;
        }
    }

    /// Erases the bar so the summary starts on a clean line.
    pub(crate) fn clear(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[K");
            self.drawn = false;
        }
    }
}

/// `[#########...........]  45/100  finished 40  failed 5  12s  eta 3m20s`: the ETA is when
/// the tasks' pools will have done their backlog, these tasks included.
pub(crate) fn render(t: &Tally, elapsed: Duration, eta: Option<f64>) -> String {
    const WIDTH: usize = 30;
    let done = t.finished + t.failed + t.cancelled;
    let filled = (done * WIDTH).checked_div(t.total).unwrap_or(WIDTH);
    format!(
        "[{}{}] {done}/{}  finished {}  failed {}{}  {}s{}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        t.total,
        t.finished,
        t.failed,
        if t.cancelled > 0 {
            format!("  cancelled {}", t.cancelled)
        } else {
            String::new()
        },
        elapsed.as_secs(),
        match eta {
            Some(s) if done < t.total => format!(
                "  eta {}",
                crate::config::format_span(Duration::from_secs(s.ceil() as u64))
            ),
            _ => String::new(),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_terminal_tasks() {
        let t = Tally {
            total: 100,
            finished: 40,
            failed: 5,
            cancelled: 0,
        };
        let bar = render(&t, Duration::from_secs(12), None);
        assert_eq!(
            bar,
            format!(
                "[{}{}] 45/100  finished 40  failed 5  12s",
                "#".repeat(13),
                ".".repeat(17)
            )
        );
        assert!(render(&Tally::default(), Duration::ZERO, None)
            .starts_with(&format!("[{}]", "#".repeat(30))));
        // With the pools' time to drain; none once every task has ended.
        assert!(render(&t, Duration::from_secs(12), Some(199.2)).ends_with("12s  eta 3m20s"));
        let all = Tally { finished: 95, ..t };
        assert!(render(&all, Duration::from_secs(12), Some(5.0)).ends_with("12s"));
    }

    #[test]
    fn the_summary_lists_failures_and_what_is_not_done() {
        let s = Summary {
            tally: Tally {
                total: 14,
                finished: 1,
                failed: 12,
                cancelled: 0,
            },
            failed: (0..12).map(|i| (format!("f{i}"), "boom".into())).collect(),
            ended: HashMap::new(),
            unfinished: vec!["u0".into()],
            known: Vec::new(),
            elapsed: Duration::from_millis(1500),
        };
        assert!(!s.all_finished());
        let lines = s.report(Duration::from_secs(60));
        assert_eq!(
            lines[0],
            "14 tasks: 1 finished, 12 failed, 1 not done (1.5s)"
        );
        assert_eq!(lines[1], "failed: f0: boom");
        assert_eq!(lines[11], "... and 2 more failed");
        assert_eq!(lines[12], "timed out after 1m: 1 tasks not done");
        assert_eq!(lines[13], "not done: u0");
    }

    #[test]
    fn a_reused_id_is_reported_not_counted_as_finished() {
        let s = Summary {
            tally: Tally {
                total: 2,
                finished: 1,
                failed: 0,
                cancelled: 0,
            },
            failed: Vec::new(),
            ended: HashMap::new(),
            unfinished: Vec::new(),
            known: vec![("old".into(), "finished".into())],
            elapsed: Duration::from_millis(100),
        };
        assert!(!s.all_finished());
        let lines = s.report(Duration::from_secs(60));
        assert_eq!(
            lines[0],
            "2 tasks: 1 finished, 0 failed, 0 not done, 1 already known (0.1s)"
        );
        assert_eq!(lines[1], "already known, not run again: old (finished)");
    }
}
