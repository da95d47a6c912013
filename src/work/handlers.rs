//! The handler pool (`qsys-handler-N`): runs the task types that are not GPU work (email, reports,
//! cleanup) through their configured handler, never taking a GPU slot.
//!
//! - `exec`: the program gets the task JSON on stdin and `QSYS_TASK_ID` / `QSYS_TASK_TYPE` in an
//!   environment of its own (`PATH`, `LANG`, `LC_ALL` and the type's `env` list of the daemon's, no
//!   more: the daemon's secrets stay out), runs in its own process group, and is killed with the
//!   whole group at its timeout. Exit 0 = finished; otherwise the tail of its stderr becomes the
//!   task's error. Its pipes are serviced on the worker's thread without blocking and closed when
//!   the run ends, so a descendant that keeps them open holds neither a thread nor the worker.
//! - `http`: the task JSON is POSTed to the configured URL; 2xx = finished.
//!
//! Each worker takes a task from the scheduler's rendezvous channel, moves it to `processing`, runs
//! it, records the end through [`Shared::finish`] and wakes the scheduler, which may then hand it the
//! next one.

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde_json::{json, Value};

use crate::config::Handler;
use crate::net::http;
use crate::obs::trouble::Trouble;
use crate::shared::{Shared, Task};
use crate::store::Ending;
use crate::sync::Locked;

/// How much of an `exec` handler's stderr is kept as the error.
const STDERR_TAIL: usize = 2048;

/// The JSON a handler receives: the seed's message plus the id and the attempt number.
pub(crate) fn task_json(task: &Task, attempt: u32) -> String {
    json!({
        "task_id": task.msg.task_id,
        "type": task.msg.kind,
        "data": Value::Object(task.msg.data.clone()),
        "attempt": attempt,
    })
    .to_string()
}

/// Keeps the last `max` bytes of `bytes`, lossily decoded and trimmed.
fn tail(bytes: &[u8], max: usize) -> String {
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// Why a handler run failed, and whether another attempt may do better.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub error: String,
    pub retryable: bool,
}

fn retryable(error: String) -> Failure {
    Failure {
        error,
        retryable: true,
    }
}

/// The `PATH` an `exec` program gets when the daemon has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// The daemon's variables every `exec` program gets, when set.
const KEPT_VARS: &[&str] = &["LANG", "LC_ALL"];

/// The whole environment of an `exec` program: of the daemon's variables (as `lookup` finds them)
/// only `PATH` (else [`DEFAULT_PATH`]), [`KEPT_VARS`] and the type's `pass` list, so no secret of
/// the daemon's leaks to it by accident; then the `QSYS_*` variables of the task.
fn child_env(
    pass: &[String],
    task_id: &str,
    kind: &str,
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Vec<(String, OsString)> {
    let path = lookup("PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.into());
    let mut env = vec![("PATH".to_string(), path)];
    for name in KEPT_VARS
        .iter()
        .copied()
        .chain(pass.iter().map(String::as_str))
    {
        if let Some(v) = lookup(name) {
            env.push((name.to_string(), v));
        }
    }
    env.push(("QSYS_TASK_ID".into(), task_id.into()));
    env.push(("QSYS_TASK_TYPE".into(), kind.into()));
    env
}

/// How often a run checks whether its program has ended.
const TICK: Duration = Duration::from_millis(10);
/// How long the stderr of a program that has ended may still be read, and how long a killed
/// program may take to die. A process it started may hold the pipes open for ever.
const PIPE_GRACE: Duration = Duration::from_secs(1);
/// Reads of stderr per wake-up at most: a flood must not keep the run from its deadline.
const READS_PER_PUMP: usize = 16;

/// The run's ends of the program's stdin and stderr, non-blocking and serviced on the worker's own
/// thread by [`Pipes::pump`]: no thread can block on a pipe a grandchild holds open, and the pipes
/// close when the run drops them.
struct Pipes<'a> {
    stdin: Option<ChildStdin>,
    input: &'a [u8],
    written: usize,
    stderr: Option<ChildStderr>,
    /// The latest stderr, at most twice [`STDERR_TAIL`].
    kept: Vec<u8>,
}

fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl(2) on a pipe fd this run owns; no memory is involved.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl<'a> Pipes<'a> {
    fn new(stdin: ChildStdin, stderr: ChildStderr, input: &'a str) -> std::io::Result<Pipes<'a>> {
        set_nonblocking(&stdin)?;
        set_nonblocking(&stderr)?;
        Ok(Pipes {
            stdin: Some(stdin),
            input: input.as_bytes(),
            written: 0,
            stderr: Some(stderr),
            kept: Vec::new(),
        })
    }

    /// Waits up to `wait` for a pipe to be ready (just sleeps when both are closed), then feeds
    /// stdin and drains stderr as far as they go without blocking.
    fn pump(&mut self, wait: Duration) {
        let mut fds: Vec<libc::pollfd> = [
            self.stdin.as_ref().map(|p| (p.as_raw_fd(), libc::POLLOUT)),
            self.stderr.as_ref().map(|p| (p.as_raw_fd(), libc::POLLIN)),
        ]
        .into_iter()
        .flatten()
        .map(|(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
        // Rounded up, so a wait below a millisecond does not spin.
        let ms = wait.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` holds `fds.len()` initialised pollfd structs and outlives the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        // 0: the wait is over; -1: a signal (EINTR); the caller's loop comes back either way.
        if ready > 0 {
            self.feed();
            self.drain();
        }
    }

    fn feed(&mut self) {
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        while self.written < self.input.len() {
            match stdin.write(&self.input[self.written..]) {
                Ok(0) => break,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // EPIPE: the program closed its stdin; what it did not read it did not want.
                Err(_) => break,
            }
        }
        // All written, or nobody reads: closing tells the program the input is complete.
        self.stdin = None;
    }

    fn drain(&mut self) {
        let Some(stderr) = self.stderr.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        for _ in 0..READS_PER_PUMP {
            match stderr.read(&mut buf) {
                Ok(n) if n > 0 => {
                    self.kept.extend_from_slice(&buf[..n]);
                    if self.kept.len() > 2 * STDERR_TAIL {
                        self.kept.drain(..self.kept.len() - STDERR_TAIL);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // End of file (every writer is gone), or a pipe that cannot be read.
                Ok(_) | Err(_) => {
                    self.stderr = None;
                    return;
                }
            }
        }
    }
}

/// Runs one `exec` handler to completion or timeout. A program that cannot be started fails for
/// good (retrying will not install it); a crash, a non-zero exit or a timeout may pass.
///
/// Nothing here can outlive the run or hold the worker past `timeout` plus twice [`PIPE_GRACE`]:
/// the pipes are serviced without threads and closed at the end, whatever the program's
/// descendants still hold.
pub(crate) fn run_exec(
    shared: &Shared,
    command: &[String],
    env: &[String],
    task: &Task,
    input: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .env_clear()
        .envs(child_env(env, &task.msg.task_id, &task.msg.kind, |k| {
            std::env::var_os(k)
        }))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own group, so a timeout can kill whatever it started too.
        .process_group(0)
        .spawn()
        .map_err(|e| Failure {
            error: format!("cannot start {:?}: {e}", command[0]),
            retryable: false,
        })?;
    let group = Registered::new(shared, child.id() as i32);
    let stdin = child.stdin.take().expect("stdin was piped");
    let stderr = child.stderr.take().expect("stderr was piped");
    let mut pipes = match Pipes::new(stdin, stderr, input) {
        Ok(p) => p,
        Err(e) => {
            kill_group(&mut child, group.pgid);
            return Err(retryable(format!(
                "cannot set up the pipes of {:?}: {e}",
                command[0]
            )));
        }
    };

    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break None;
                }
                pipes.pump(left.min(TICK));
            }
            Err(e) => {
                log::error!(error:% = e; "waiting for exec handler failed");
                break None;
            }
        }
    };
    if status.is_none() {
        kill_group(&mut child, group.pgid);
    }
    drop(group);
    // The program is gone, but what it started may hold the pipes open: nobody reads stdin any
    // more, and stderr gets a short grace to deliver its tail. Then the pipes close with `pipes`.
    pipes.stdin = None;
    let grace = Instant::now() + PIPE_GRACE;
    while pipes.stderr.is_some() && Instant::now() < grace {
        pipes.pump(grace.saturating_duration_since(Instant::now()));
    }
    let stderr_tail = tail(&pipes.kept, STDERR_TAIL);
    drop(pipes);
    let with_stderr = |what: String| {
        if stderr_tail.is_empty() {
            what
        } else {
            format!("{what}: {stderr_tail}")
        }
    };
    match status {
        None => Err(retryable(with_stderr(format!(
            "timed out after {} (process group killed)",
            crate::config::format_duration(timeout)
        )))),
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(retryable(with_stderr(match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "ended abnormally".to_string(),
        }))),
    }
}

/// Kills the program's process group and reaps the program, waiting at most [`PIPE_GRACE`] (a
/// process stuck in the kernel cannot be killed; it is left as it is, and said so).
fn kill_group(child: &mut Child, pgid: i32) {
    // SAFETY: kill(2) on our child's process group; no memory is involved.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let until = Instant::now() + PIPE_GRACE;
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() >= until {
            log::error!(pid = pgid; "exec handler not gone after SIGKILL; left behind");
            return;
        }
        std::thread::sleep(TICK);
    }
}

/// A program's process group, in the set the daemon kills at a stop for as long as this lives.
struct Registered<'a> {
    shared: &'a Shared,
    pgid: i32,
}

impl<'a> Registered<'a> {
    fn new(shared: &'a Shared, pgid: i32) -> Registered<'a> {
        shared.children.locked().insert(pgid);
        Registered { shared, pgid }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.children.locked().remove(&self.pgid);
    }
}

pub(crate) fn run_worker(shared: Arc<Shared>, jobs: Receiver<Task>) {
    let agent = http::agent();
    while let Ok(task) = jobs.recv() {
        run_one(&shared, &agent, &task);
        shared.wake_scheduler();
    }
}

fn run_one(shared: &Shared, agent: &ureq::Agent, task: &Task) {
    let task_id = task.msg.task_id.as_str();
    crate::pause_point!(shared.store.instance(), "handler:received");
    // The scheduler sends configured non-GPU types here; a reload may have changed the type
    // since. Its row is still `pending` and held here: back to the scheduler, which places it
    // under the configuration now in force.
    let config = shared.config();
    let handler = config.types.get(&task.msg.kind);
    let configured = match handler {
        Some(Handler::Exec { timeout, .. } | Handler::Http { timeout, .. }) => *timeout,
        Some(Handler::Gpu) | None => {
            log::info!(task_id; "task type changed by a reload; placed again");
            shared.retry_later(task_id, Duration::ZERO);
            return;
        }
    };
    let timeout = task
        .msg
        .timeout_s
        .map(Duration::from_secs)
        .unwrap_or(configured);
    let attempt = task.attempts + 1;
    // The worker's own timeout ends the run; the lease only matters if this process dies.
    let lease = timeout + LEASE_MARGIN;
    match shared
        .store
        .start_handler_attempt(task_id, task.attempts, lease)
    {
        Ok(true) => {}
        Ok(false) => {
            log::info!(task_id; "task no longer pending; not run");
            return;
        }
        Err(e) => {
            // The row is `pending` (or, if only the reply was lost, `processing` under a lease):
            // the scheduler reads it again and places it, or finds it no longer pending.
            log::error!(task_id, error:% = e; "mysql error starting handler; placed again in 1s");
            shared.retry_later(task_id, Duration::from_secs(1));
            return;
        }
    }
    log::info!(task_id, kind = task.msg.kind.as_str(), attempt, queue = task.queue.as_str();
        "handler started");
    let input = task_json(task, attempt);
    let result = match handler {
        Some(Handler::Exec { command, env, .. }) => {
            run_exec(shared, command, env, task, &input, timeout)
        }
        Some(Handler::Http {
            url, bearer_token, ..
        }) => run_http(agent, url, bearer_token.as_ref(), &input, timeout),
        Some(Handler::Gpu) | None => unreachable!("the handler was matched above"),
    };
    if let Err(f) = &result {
        shared.raise(Trouble::Handler, &f.error);
    }
    let ending = match &result {
        Ok(()) => Ending::Finished,
        Err(f) => Ending::Failed {
            error: &f.error,
            retryable: f.retryable,
        },
    };
    shared.end_attempt_patiently(task_id, attempt, ending, "handler", PATIENCE);
}

/// Runs one `http` handler call: 2xx = finished.
fn run_http(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&crate::config::Secret>,
    input: &str,
    timeout: Duration,
) -> Result<(), Failure> {
    let connect = timeout.min(Duration::from_secs(10));
    // The error is kept in MySQL and shown on the dashboard: no password of the URL in it.
    let shown = crate::obs::logging::redact_url(url);
    match http::post_json(agent, url, token, input, connect, timeout) {
        Ok(r) if r.is_success() => Ok(()),
        Ok(r) => Err(Failure {
            error: format!(
                "handler {shown} answered HTTP {}: {}",
                r.status,
                r.body.trim()
            ),
            retryable: crate::work::dispatch::retryable_status(r.status),
        }),
        Err(e) => Err(retryable(format!(
            "handler {shown}: {}",
            http::describe(&e)
        ))),
    }
}

/// What a handler's lease adds to its timeout.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// How long a handler worker keeps trying to record an outcome through a MySQL outage.
const PATIENCE: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail(b"  abc\n", 10), "abc");
        assert_eq!(tail(b"0123456789", 4), "6789");
    }

    #[test]
    fn exec_environment_is_the_minimum_plus_what_the_type_lists() {
        let daemon: std::collections::HashMap<&str, &str> = [
            ("PATH", "/opt/bin:/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("HOME", "/root"),
            ("DB_PASSWORD", "secret"),
            ("REDIS_PASSWORD", "secret"),
            ("BEARER_TOKEN", "secret"),
            ("HTTPS_PROXY", "http://proxy:3128"),
        ]
        .into();
        let lookup = |k: &str| daemon.get(k).map(OsString::from);
        let pass = ["HTTPS_PROXY".to_string(), "AWS_REGION".to_string()];
        let env = child_env(&pass, "t-1", "cleanup", lookup);
        let names: Vec<(&str, &str)> = env
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().expect("utf8")))
            .collect();
        assert_eq!(
            names,
            [
                ("PATH", "/opt/bin:/usr/bin"),
                ("LC_ALL", "C.UTF-8"),
                ("HTTPS_PROXY", "http://proxy:3128"),
                ("QSYS_TASK_ID", "t-1"),
                ("QSYS_TASK_TYPE", "cleanup"),
            ]
        );
        // No PATH, or an empty one: the safe default.
        for path in [None, Some("")] {
            let env = child_env(&[], "t", "k", |k| {
                (k == "PATH").then_some(path).flatten().map(OsString::from)
            });
            assert_eq!(env[0], ("PATH".to_string(), OsString::from(DEFAULT_PATH)));
            assert_eq!(env.len(), 3);
        }
    }
}
