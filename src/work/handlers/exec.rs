//! The `exec` handler: a local program per task, in an environment and a process group of its
//! own, its pipes serviced on the worker's thread without blocking.

use std::ffi::OsString;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{retryable, tail, Failure, STDERR_TAIL};
use crate::shared::{Shared, Task};
use crate::sync::Locked;

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

    let cancelled = || shared.cancel_asked(&task.msg.task_id, task.attempts + 1);
    let status = wait(&mut child, &mut pipes, Instant::now() + timeout, cancelled);
    if !matches!(status, Run::Exited(_)) {
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
    verdict(status, timeout, &stderr_tail)
}

/// How a program's run ended.
enum Run {
    Exited(ExitStatus),
    /// Its deadline passed (or it could not be waited for).
    TimedOut,
    /// An operator cancelled its task.
    Cancelled,
}

/// Services the pipes until the program ends, `deadline` passes or `cancelled` says so (asked
/// every [`TICK`]).
fn wait(
    child: &mut Child,
    pipes: &mut Pipes,
    deadline: Instant,
    cancelled: impl Fn() -> bool,
) -> Run {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Run::Exited(status),
            Ok(None) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Run::TimedOut;
                }
                if cancelled() {
                    return Run::Cancelled;
                }
                pipes.pump(left.min(TICK));
            }
            Err(e) => {
                log::error!(error:% = e; "waiting for exec handler failed");
                return Run::TimedOut;
            }
        }
    }
}

/// A run's outcome, with its stderr's tail.
fn verdict(status: Run, timeout: Duration, stderr_tail: &str) -> Result<(), Failure> {
    let with_stderr = |what: String| {
        if stderr_tail.is_empty() {
            what
        } else {
            format!("{what}: {stderr_tail}")
        }
    };
    match status {
        Run::TimedOut => Err(retryable(with_stderr(format!(
            "timed out after {} (process group killed)",
            crate::config::format_duration(timeout)
        )))),
        // The task is cancelled whatever this says; the attempt's history keeps it.
        Run::Cancelled => Err(Failure {
            error: with_stderr("cancelled (process group killed)".into()),
            retryable: false,
        }),
        Run::Exited(s) if s.success() => Ok(()),
        Run::Exited(s) => Err(retryable(with_stderr(match (s.code(), s.signal()) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
