//! The handler pool (`qsys-handler-N`): runs the task types that are not GPU work (email, reports,
//! cleanup) through their configured handler, never taking a GPU slot.
//!
//! - `exec`: the program gets the task JSON on stdin and `QSYS_TASK_ID` / `QSYS_TASK_TYPE` in an
//!   environment of its own (`PATH`, `LANG`, `LC_ALL` and the type's `env` list of the daemon's, no
//!   more: the daemon's secrets stay out), runs in its own process group, and is killed with the
//!   whole group at its timeout. Exit 0 = finished; otherwise the tail of its stderr becomes the
//!   task's error.
//! - `http`: the task JSON is POSTed to the configured URL; 2xx = finished.
//!
//! Each worker takes a task from the scheduler's rendezvous channel, moves it to `processing`, runs
//! it, records the end through [`Shared::finish`] and wakes the scheduler, which may then hand it the
//! next one.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use serde_json::{json, Value};

use crate::config::Handler;
use crate::http;
use crate::shared::{Shared, Task};
use crate::store::Ending;

/// How much of an `exec` handler's stderr is kept as the error.
const STDERR_TAIL: usize = 2048;

/// The JSON a handler receives: the seed's message plus the id and the attempt number.
pub fn task_json(task: &Task, attempt: u32) -> String {
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
pub struct Failure {
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

/// Runs one `exec` handler to completion or timeout. A program that cannot be started fails for
/// good (retrying will not install it); a crash, a non-zero exit or a timeout may pass.
pub fn run_exec(
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
    let pgid = child.id() as i32;
    shared
        .children
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(pgid);

    // Feed stdin and drain stderr on their own threads: a child that ignores stdin or floods stderr
    // must not block us past the timeout.
    let mut stdin = child.stdin.take().expect("stdin was piped");
    let input = input.as_bytes().to_vec();
    let feeder = std::thread::Builder::new()
        .name("qsys-exec-stdin".into())
        .spawn(move || {
            let _ = stdin.write_all(&input);
        });
    let mut stderr = child.stderr.take().expect("stderr was piped");
    let (err_tx, err_rx) = crossbeam_channel::bounded(1);
    let drainer = std::thread::Builder::new()
        .name("qsys-exec-stderr".into())
        .spawn(move || {
            let mut kept: Vec<u8> = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * STDERR_TAIL {
                    kept.drain(..kept.len() - STDERR_TAIL);
                }
            }
            let _ = err_tx.send(kept);
        });

    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => break Err(()),
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                log::error!(error:% = e; "waiting for exec handler failed");
                break Err(());
            }
        }
    };
    if status.is_err() {
        // SAFETY: kill(2) on our child's process group; no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = child.wait();
    }
    shared
        .children
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&pgid);
    drop(feeder);
    // The pipe closes when the whole group is gone; a grandchild that left the group could hold it
    // open, so the wait for the stderr tail is bounded.
    let stderr_tail = err_rx
        .recv_timeout(Duration::from_secs(2))
        .map(|b| tail(&b, STDERR_TAIL))
        .unwrap_or_default();
    drop(drainer);
    let with_stderr = |what: String| {
        if stderr_tail.is_empty() {
            what
        } else {
            format!("{what}: {stderr_tail}")
        }
    };
    match status {
        Err(()) => Err(retryable(with_stderr(format!(
            "timed out after {} (process group killed)",
            crate::config::format_duration(timeout)
        )))),
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(retryable(with_stderr(match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "ended abnormally".to_string(),
        }))),
    }
}

pub fn run_worker(shared: Arc<Shared>, jobs: Receiver<Task>) {
    let agent = http::agent();
    while let Ok(task) = jobs.recv() {
        run_one(&shared, &agent, &task);
        shared.wake_scheduler();
    }
}

fn run_one(shared: &Shared, agent: &ureq::Agent, task: &Task) {
    let task_id = task.msg.task_id.as_str();
    // The scheduler only sends configured non-GPU types here.
    let config = shared.config();
    let handler = config.types.get(&task.msg.kind);
    let configured = match handler {
        Some(Handler::Exec { timeout, .. } | Handler::Http { timeout, .. }) => *timeout,
        Some(Handler::Gpu) | None => return,
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
            log::error!(task_id, error:% = e; "mysql error starting handler; task stays pending");
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
        Some(Handler::Gpu) | None => return,
    };
    if result.is_err() {
        shared.metrics.errors.inc("handler");
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
    match http::post_json(agent, url, token, input, connect, timeout) {
        Ok(r) if r.is_success() => Ok(()),
        Ok(r) => Err(Failure {
            error: format!(
                "handler {url} answered HTTP {}: {}",
                r.status,
                r.body.trim()
            ),
            retryable: crate::dispatch::retryable_status(r.status),
        }),
        Err(e) => Err(retryable(format!("handler {url}: {}", http::describe(&e)))),
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
