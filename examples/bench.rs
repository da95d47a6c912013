//! The end-to-end benchmark (`bash scripts/bench.sh`): the release `qsysd` as a child process
//! against the local Redis and MariaDB, a fake GPU fleet in this process with instant completion
//! (by default the lean one, [`fakefleet::LeanFleet`], which costs least; `--fleet full` runs the
//! tests' tiny_http-based fleet), and `qsys-push` for the producer side. Prints one line per measure and, with `--record FILE`,
//! appends a dated section with the machine and settings to that file (BENCHMARKS.md).
//!
//! Measures:
//! - throughput: N tasks pushed at once, first push to last `finished` row (MySQL timestamps);
//! - push -> dispatch latency p50/p99: tasks pushed one by one at a steady rate below capacity, from
//!   the push to the fake GPU receiving the request;
//! - slot gap p50/p99 under saturation: a slot's attempt ending to the next attempt starting on it
//!   (from `task_attempts`, millisecond timestamps);
//! - qsysd peak RSS and CPU seconds per 1,000 tasks (from /proc), and the others' CPU per 1,000
//!   tasks: mariadbd, redis-server, and this process (the fake fleet and the driver);
//! - MariaDB's counters per task: commits, statements, fsyncs, rows written (the server's
//!   `SHOW GLOBAL STATUS`: the run must be alone on it);
//! - RSS with 100,000 tasks waiting in Redis;
//! - start to `READY=1`;
//! - `qsys-push` rate from NDJSON.
//!
//! `QSYS_BENCH_QSYSD=target/profiling/qsysd` runs another build of the daemon: the `profiling`
//! profile (Cargo.toml) is the release code with symbols, for `perf record`.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use fakefleet::{Completion, Fleet, FleetConfig, LeanFleet};
use mysql::prelude::Queryable;

#[derive(Parser)]
struct Args {
    /// Tasks in the throughput run.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    #[arg(long, default_value_t = 16)]
    gpus: usize,
    #[arg(long, default_value_t = 4)]
    slots: usize,
    /// qsysd instances sharing the run (scale-out throughput).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Dispatch threads per instance (qsysd's default is one per slot, at most 64).
    #[arg(long, default_value_t = 64)]
    dispatch_threads: usize,
    /// Callbacks the fake fleet makes at once (its caller threads).
    #[arg(long, default_value_t = 32)]
    fleet_callers: usize,
    /// How the fake GPUs complete: "callback" (a callback once done) or "response" (the answer
    /// to the dispatch is the completion).
    #[arg(long, default_value = "callback")]
    completion: String,
    /// The fake fleet: "lean" (no thread hand-offs, no shared lock: the harness costs least) or
    /// "full" (the tests' fleet, on tiny_http).
    #[arg(long, default_value = "lean")]
    fleet: String,
    /// SQL run on the benchmark's database once qsysd has made its schema, before the push (may
    /// be repeated): to weigh what a part of the schema costs, e.g. `DROP INDEX idx_tasks_type ON
    /// tasks`. Not for recorded runs of the product.
    #[arg(long)]
    before_push: Vec<String>,
    /// Skip the slower measures (latency at a steady rate, 100k backlog RSS, push rate).
    #[arg(long)]
    quick: bool,
    /// Append the results to this Markdown file.
    #[arg(long)]
    record: Option<PathBuf>,
}

const DB: &str = "qsys_bench";
const MYSQL: &str = "mysql://root@127.0.0.1:3306";

fn bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/release")
        .join(name)
}

fn mysql() -> anyhow::Result<mysql::Conn> {
    Ok(mysql::Conn::new(mysql::Opts::from_url(MYSQL)?)?)
}

fn redis() -> anyhow::Result<redis::Connection> {
    let c = redis::Client::open("redis://127.0.0.1:6379/0")?
        .get_connection_with_timeout(Duration::from_secs(3))?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    Ok(c)
}

fn reset(queue: &str) -> anyhow::Result<()> {
    mysql()?.query_drop(format!("DROP DATABASE IF EXISTS {DB}"))?;
    let mut r = redis()?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("bench:*").query(&mut r)?;
    if !keys.is_empty() {
        redis::cmd("DEL").arg(keys).query::<()>(&mut r)?;
    }
    redis::cmd("DEL").arg(queue).query::<()>(&mut r)?;
    Ok(())
}

/// Writes instance `instance`'s config; returns its path and the admin listener's port (for
/// `/metrics`).
fn config(
    dir: &Path,
    urls: &[String],
    a: &Args,
    instance: usize,
) -> anyhow::Result<(PathBuf, u16)> {
    let (slots, threads, completion) = (a.slots, a.dispatch_threads, &a.completion);
    // A port free now; nothing else on this machine binds loopback ports meanwhile.
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut s = format!(
        r#"[redis]
queues = ["bench:q"]
key_prefix = "bench"
[mysql]
url = "{MYSQL}/{DB}"
[callback]
listen = "127.0.0.1:0"
secret = "bench-secret-0123456789"
[admin]
listen = "127.0.0.1:{admin}"
[gpu]
slots = {slots}
completion = "{completion}"
[daemon]
instance_id = "bench-{instance}"
log_level = "warn"
log_target = "stderr"
dispatch_threads = {threads}
"#
    );
    for (i, u) in urls.iter().enumerate() {
        s.push_str(&format!(
            "[[gpu.endpoints]]\nid = \"g{i}\"\nurl = \"{u}\"\n"
        ));
    }
    let p = dir.join(format!("qsysd-{instance}.toml"));
    std::fs::write(&p, s)?;
    Ok((p, admin))
}

/// CPU seconds a process has used (utime + stime), from /proc.
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of stat(5); after the ')' they are 12 and 13.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// The pid of the one process named `name`, if there is one.
fn pid_of(name: &str) -> Option<String> {
    let out = Command::new("pidof").arg("-s").arg(name).output().ok()?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!pid.is_empty()).then_some(pid)
}

/// What the run cost besides qsysd: MariaDB's and Redis's CPU, this process's (the fake fleet and
/// the driver), and MariaDB's counters (the server's, so the run must be alone on it).
#[derive(Clone, Copy, Default)]
struct Others {
    mariadb_cpu: f64,
    redis_cpu: f64,
    bench_cpu: f64,
    commits: f64,
    statements: f64,
    fsyncs: f64,
    rows_written: f64,
}

impl Others {
    fn now(c: &mut mysql::Conn) -> anyhow::Result<Others> {
        let status: Vec<(String, String)> = c.query(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('Com_commit', 'Questions', \
             'Innodb_data_fsyncs', 'Handler_write', 'Handler_update', 'Handler_delete')",
        )?;
        let get = |k: &str| -> f64 {
            status
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0.0)
        };
        let cpu = |name: &str| {
            pid_of(name)
                .and_then(|p| cpu_seconds(&p).ok())
                .unwrap_or(0.0)
        };
        Ok(Others {
            mariadb_cpu: cpu("mariadbd").max(cpu("mysqld")),
            redis_cpu: cpu("redis-server"),
            bench_cpu: cpu_seconds("self")?,
            commits: get("Com_commit"),
            statements: get("Questions"),
            fsyncs: get("Innodb_data_fsyncs"),
            // MariaDB has no Innodb_rows_* counters; the handler's count every engine's rows.
            rows_written: get("Handler_write") + get("Handler_update") + get("Handler_delete"),
        })
    }

    fn since(&self, before: &Others) -> Others {
        Others {
            mariadb_cpu: self.mariadb_cpu - before.mariadb_cpu,
            redis_cpu: self.redis_cpu - before.redis_cpu,
            bench_cpu: self.bench_cpu - before.bench_cpu,
            commits: self.commits - before.commits,
            statements: self.statements - before.statements,
            fsyncs: self.fsyncs - before.fsyncs,
            rows_written: self.rows_written - before.rows_written,
        }
    }

    /// The measures, per 1,000 tasks (CPU) or per task (counters).
    fn per_task(&self, tasks: usize) -> Vec<(&'static str, String)> {
        let k = 1000.0 / tasks as f64;
        let n = tasks as f64;
        vec![
            (
                "mariadbd CPU seconds per 1,000 tasks",
                format!("{:.3}", self.mariadb_cpu * k),
            ),
            (
                "redis-server CPU seconds per 1,000 tasks",
                format!("{:.3}", self.redis_cpu * k),
            ),
            (
                "fake fleet + driver CPU seconds per 1,000 tasks",
                format!("{:.3}", self.bench_cpu * k),
            ),
            (
                "MariaDB per task: commits / statements",
                format!("{:.2} / {:.2}", self.commits / n, self.statements / n),
            ),
            (
                "MariaDB per task: fsyncs / rows written",
                format!("{:.2} / {:.2}", self.fsyncs / n, self.rows_written / n),
            ),
        ]
    }
}

/// A qsysd child with a notify socket, started and waited for until READY=1.
struct Qsysd {
    child: Child,
    ready_after: Duration,
    /// Its admin listener's port.
    admin: u16,
}

/// Who claimed the GPU slots, as `qsys_slot_claims_total{by}` counts them.
const CLAIMED_BY: [&str; 3] = ["scheduler", "ending", "intake"];

impl Qsysd {
    fn start((config, admin): &(PathBuf, u16), dir: &Path, n: usize) -> anyhow::Result<Qsysd> {
        let sock_path = dir.join(format!("notify-{n}.sock"));
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let t0 = Instant::now();
        // `QSYS_BENCH_QSYSD=target/profiling/qsysd`: the same code with symbols, for perf.
        let qsysd =
            std::env::var_os("QSYS_BENCH_QSYSD").map_or_else(|| bin("qsysd"), PathBuf::from);
        let child = Command::new(qsysd)
            .arg("--config")
            .arg(config)
            .env_clear()
            .env("NOTIFY_SOCKET", &sock_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("qsysd-{n}.log")))?)
            .spawn()?;
        let mut buf = [0u8; 512];
        loop {
            if let Ok(k) = sock.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..k]).contains("READY=1") {
                    return Ok(Qsysd {
                        child,
                        ready_after: t0.elapsed(),
                        admin: *admin,
                    });
                }
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("qsysd not ready after 20 s; see {}", dir.display());
            }
        }
    }

    /// The slots it claimed, by who claimed them ([`CLAIMED_BY`]), from its `/metrics`.
    fn claims(&self) -> anyhow::Result<[u64; 3]> {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        let text = qsys::http::agent()
            .get(&url)
            .call()?
            .body_mut()
            .read_to_string()?;
        let mut out = [0; 3];
        for (n, by) in out.iter_mut().zip(CLAIMED_BY) {
            let name = format!("qsys_slot_claims_total{{by=\"{by}\"}} ");
            *n = text
                .lines()
                .find_map(|l| l.strip_prefix(name.as_str()))
                .and_then(|v| v.trim().parse().ok())
                .context("qsys_slot_claims_total")?;
        }
        Ok(out)
    }

    /// (peak RSS in KiB, CPU seconds) from /proc.
    fn usage(&self) -> anyhow::Result<(u64, f64)> {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let hwm = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmHWM")?;
        Ok((hwm, cpu_seconds(&pid.to_string())?))
    }
}

/// A benchmark that fails part-way must not leave a qsysd running against the bench database.
impl Drop for Qsysd {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn push_ndjson(lines: &[String]) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut child = Command::new(bin("qsys-push"))
        .args(["--file", "-", "--queue", "bench:q"])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    {
        let mut stdin = child.stdin.take().context("stdin")?;
        for l in lines {
            writeln!(stdin, "{l}")?;
        }
    }
    if !child.wait()?.success() {
        bail!("qsys-push failed");
    }
    Ok(t0.elapsed())
}

/// Seconds since the Unix epoch, to compare with MySQL's `UNIX_TIMESTAMP`.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn task_line(i: usize, tag: &str) -> String {
    format!(
        r#"{{"type":"start_transcribe","data":{{"s3_key":"rec/{i}.wav","task_id":"{tag}-{i}"}}}}"#
    )
}

/// The fleet of a run, lean or full.
enum BenchFleet {
    Lean(LeanFleet),
    Full(Fleet),
}

impl BenchFleet {
    fn start(kind: &str, gpus: usize, completion: &str, callers: usize) -> anyhow::Result<Self> {
        let completion = match completion {
            "callback" => Completion::Callback,
            "response" => Completion::Response,
            other => bail!("--completion: {other:?} is neither callback nor response"),
        };
        Ok(match kind {
            "lean" => BenchFleet::Lean(LeanFleet::start(gpus, 0, completion, true)?),
            "full" => BenchFleet::Full(Fleet::start(FleetConfig {
                gpus,
                delay: (Duration::ZERO, Duration::ZERO),
                callers,
                completion,
                ..FleetConfig::default()
            })?),
            other => bail!("--fleet: {other:?} is neither lean nor full"),
        })
    }

    fn urls(&self) -> &[String] {
        match self {
            BenchFleet::Lean(f) => f.urls(),
            BenchFleet::Full(f) => f.urls(),
        }
    }

    /// The fleet's own count of completions: callbacks accepted, or in response mode dispatches
    /// received (each answered at once).
    fn completions(&self, response: bool) -> usize {
        let gpus = self.urls().len();
        match self {
            BenchFleet::Lean(f) if response => (0..gpus).map(|g| f.received(g)).sum(),
            BenchFleet::Lean(f) => f.callbacks().0 as usize,
            BenchFleet::Full(f) if response => (0..gpus).map(|g| f.stats().received(g)).sum(),
            BenchFleet::Full(f) => {
                (f.stats().callback_replies().get(&200).copied()).unwrap_or(0) as usize
            }
        }
    }

    /// Each task's latest arrival at its GPU.
    fn arrivals(&self) -> std::collections::HashMap<String, Instant> {
        match self {
            BenchFleet::Lean(f) => f.arrivals(),
            BenchFleet::Full(f) => f.stats().received_at(),
        }
    }

    /// What the fleet saw of the callbacks, for a run that is stuck.
    fn callback_replies(&self) -> String {
        match self {
            BenchFleet::Lean(f) => format!("answered 2xx / not: {:?}", f.callbacks()),
            BenchFleet::Full(f) => format!("by status: {:?}", f.stats().callback_replies()),
        }
    }

    /// The most tasks any GPU ran at once.
    fn max_running(&self) -> usize {
        let gpus = self.urls().len();
        match self {
            BenchFleet::Lean(f) => (0..gpus).map(|g| f.max_running(g)).max(),
            BenchFleet::Full(f) => (0..gpus).map(|g| f.stats().max_running(g)).max(),
        }
        .unwrap_or(0)
    }

    fn stop(self) {
        match self {
            BenchFleet::Lean(f) => f.stop(),
            BenchFleet::Full(f) => f.stop(),
        }
    }
}

/// Waits until `n` tasks are finished. The fleet's own count of completions is watched (it
/// costs nothing; counting rows every few milliseconds cost MariaDB a share of the CPU being
/// measured), then MySQL confirms. A run that stops moving for 30 s fails with what the fleet saw,
/// rather than waiting out the leases.
fn wait_finished(
    c: &mut mysql::Conn,
    n: usize,
    fleet: &BenchFleet,
    response: bool,
) -> anyhow::Result<()> {
    let (mut last, mut moved) = (0, Instant::now());
    loop {
        let seen = fleet.completions(response);
        if seen >= n && finished(c)? >= n as u64 {
            return Ok(());
        }
        if seen != last {
            (last, moved) = (seen, Instant::now());
        } else if moved.elapsed() > Duration::from_secs(30) {
            let done = finished(c)?;
            let processing: Vec<String> = c.query(format!(
                "SELECT task_id FROM {DB}.tasks WHERE state = 'processing' LIMIT 20"
            ))?;
            bail!(
                "stuck at {done} of {n} finished for 30 s; processing: {processing:?}; \
                 fleet callback replies {}",
                fleet.callback_replies()
            );
        }
        std::thread::sleep(Duration::from_millis(if seen >= n { 50 } else { 5 }));
    }
}

fn finished(c: &mut mysql::Conn) -> anyhow::Result<u64> {
    Ok(c.query_first::<u64, _>(format!(
        "SELECT COUNT(*) FROM {DB}.tasks WHERE state = 'finished'"
    ))?
    .unwrap_or(0))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = std::env::temp_dir().join("qsys-bench");
    std::fs::create_dir_all(&dir)?;
    reset("bench:q")?;
    let fleet = BenchFleet::start(&a.fleet, a.gpus, &a.completion, a.fleet_callers)?;
    let mut results: Vec<(String, String)> = Vec::new();
    let mut say = |k: &str, v: String| {
        println!("{k:<44} {v}");
        results.push((k.to_string(), v));
    };

    // Throughput, CPU, RSS, slot gap.
    let mut daemons = Vec::new();
    for i in 0..a.instances {
        let cfg = config(&dir, fleet.urls(), &a, i)?;
        daemons.push(Qsysd::start(&cfg, &dir, i)?);
    }
    say(
        "start to READY=1 (ms)",
        format!("{:.0}", daemons[0].ready_after.as_secs_f64() * 1e3),
    );
    let lines: Vec<String> = (0..a.tasks).map(|i| task_line(i, "t")).collect();
    let cpu0: f64 = daemons
        .iter()
        .map(|d| d.usage().map(|u| u.1).unwrap_or(0.0))
        .sum();
    let mut c = mysql()?;
    if !a.before_push.is_empty() {
        c.query_drop(format!("USE {DB}"))?;
    }
    for sql in &a.before_push {
        c.query_drop(sql)
            .with_context(|| format!("--before-push {sql:?}"))?;
    }
    let others0 = Others::now(&mut c)?;
    let pushed_at = unix_now();
    let push_took = push_ndjson(&lines)?;
    wait_finished(&mut c, a.tasks, &fleet, a.completion == "response")?;
    let others = Others::now(&mut c)?.since(&others0);
    // First push (this clock) to the last finished row (the database's clock, same host).
    let last: f64 = c
        .query_first::<f64, _>(format!(
            "SELECT UNIX_TIMESTAMP(MAX(finished_at)) FROM {DB}.tasks"
        ))?
        .unwrap_or(f64::NAN);
    let wall = last - pushed_at;
    let span: f64 = c
        .query_first::<f64, _>(format!(
            "SELECT TIMESTAMPDIFF(MICROSECOND, MIN(created_at), MAX(finished_at)) / 1e6 FROM {DB}.tasks"
        ))?
        .unwrap_or(f64::NAN);
    let (mut rss, mut cpu) = (0, 0.0);
    for d in &daemons {
        let (r, c) = d.usage()?;
        rss = rss.max(r);
        cpu += c;
    }
    say(
        &format!(
            "throughput, {} tasks, {}x{} slots, {} instance(s) (tasks/s)",
            a.tasks, a.gpus, a.slots, a.instances
        ),
        format!(
            "{:.0} (first push to last finish {wall:.2} s, push {:.2} s; first take to last \
             finish {span:.2} s)",
            a.tasks as f64 / wall,
            push_took.as_secs_f64(),
        ),
    );
    say(
        "qsysd CPU seconds per 1,000 tasks",
        format!("{:.3}", (cpu - cpu0) / a.tasks as f64 * 1000.0),
    );
    for (what, v) in others.per_task(a.tasks) {
        say(what, v);
    }
    say(
        "most tasks a GPU ran at once (slots: the fleet's count)",
        format!("{} ({} allowed)", fleet.max_running(), a.slots),
    );
    say(
        "qsysd peak RSS during the run (MiB)",
        format!("{:.1}", rss as f64 / 1024.0),
    );
    let mut gaps: Vec<f64> = c.query(format!(
        "SELECT TIMESTAMPDIFF(MICROSECOND, prev_end, started_at) / 1000 FROM ( \
           SELECT started_at, LAG(ended_at) OVER (PARTITION BY gpu_id, slot_index ORDER BY started_at) AS prev_end \
           FROM {DB}.task_attempts) g WHERE prev_end IS NOT NULL"
    ))?;
    gaps.sort_by(f64::total_cmp);
    say(
        "slot freed -> next dispatch, saturated (ms p50 / p99)",
        format!(
            "{:.1} / {:.1}  ({} gaps, ms resolution)",
            percentile(&gaps, 0.5),
            percentile(&gaps, 0.99),
            gaps.len()
        ),
    );
    // An unanswered dispatch or callback shows as an attempt that did not finish (its lease or
    // request timeout ended it) and a task run more than once.
    let (unfinished, again): (u64, u64) = c
        .query_first(format!(
            "SELECT (SELECT COUNT(*) FROM {DB}.task_attempts WHERE outcome <> 'finished'), \
                    (SELECT COUNT(*) FROM {DB}.tasks WHERE attempts > 1)"
        ))?
        .unwrap_or((u64::MAX, u64::MAX));
    say(
        "attempts that did not finish / tasks run more than once",
        format!("{unfinished} / {again}"),
    );
    let mut claims = [0; 3];
    for d in &daemons {
        for (sum, n) in claims.iter_mut().zip(d.claims()?) {
            *sum += n;
        }
    }
    let total = claims.iter().sum::<u64>().max(1) as f64;
    say(
        "slots claimed by the scheduler / an ending / a record (share)",
        format!(
            "{:.0}% / {:.0}% / {:.0}%",
            claims[0] as f64 * 100.0 / total,
            claims[1] as f64 * 100.0 / total,
            claims[2] as f64 * 100.0 / total
        ),
    );
    for d in daemons {
        drop(d);
    }

    if !a.quick {
        // Latency at a steady rate below capacity: one push every 2 ms for 5 s.
        reset("bench:q")?;
        let cfg = config(&dir, fleet.urls(), &a, 0)?;
        let d = Qsysd::start(&cfg, &dir, 0)?;
        let client = redis::Client::open("redis://127.0.0.1:6379/0")?;
        let mut r = client.get_connection_with_timeout(Duration::from_secs(3))?;
        let n = 2500;
        let mut pushed = Vec::with_capacity(n);
        let mut c = mysql()?;
        let (others0, cpu0) = (Others::now(&mut c)?, d.usage()?.1);
        let start = Instant::now();
        for i in 0..n {
            let due = start + Duration::from_millis(2 * i as u64);
            if let Some(w) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(w);
            }
            pushed.push(Instant::now());
            redis::cmd("RPUSH")
                .arg("bench:q")
                .arg(task_line(i, "lat"))
                .query::<()>(&mut r)?;
        }
        wait_finished(&mut c, n, &fleet, a.completion == "response")?;
        let steady = Others::now(&mut c)?.since(&others0);
        say(
            "at 500 tasks/s: qsysd / mariadbd CPU s per 1,000 tasks",
            format!(
                "{:.3} / {:.3}",
                (d.usage()?.1 - cpu0) / n as f64 * 1000.0,
                steady.mariadb_cpu / n as f64 * 1000.0
            ),
        );
        say(
            "at 500 tasks/s: MariaDB commits / statements per task",
            format!(
                "{:.2} / {:.2}",
                steady.commits / n as f64,
                steady.statements / n as f64
            ),
        );
        let received = fleet.arrivals();
        let mut lat: Vec<f64> = (0..n)
            .filter_map(|i| {
                let at = received.get(&format!("lat-{i}"))?;
                Some(at.saturating_duration_since(pushed[i]).as_secs_f64() * 1e3)
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        say(
            "push -> dispatch at 500 tasks/s (ms p50 / p99)",
            format!(
                "{:.2} / {:.2}",
                percentile(&lat, 0.5),
                percentile(&lat, 0.99)
            ),
        );
        drop(d);

        // RSS with 100,000 tasks waiting: every slot busy for good (the fleet never answers).
        reset("bench:q")?;
        let hung = Fleet::start(FleetConfig {
            gpus: a.gpus,
            hang_rate: 1.0,
            ..FleetConfig::default()
        })?;
        let cfg = config(&dir, hung.urls(), &a, 0)?;
        let d = Qsysd::start(&cfg, &dir, 0)?;
        let backlog: Vec<String> = (0..100_000).map(|i| task_line(i, "w")).collect();
        let took = push_ndjson(&backlog)?;
        say(
            "qsys-push, 100,000 tasks as NDJSON (tasks/s)",
            format!("{:.0}", 100_000.0 / took.as_secs_f64()),
        );
        std::thread::sleep(Duration::from_secs(5));
        let waiting: u64 = redis::cmd("LLEN").arg("bench:q").query(&mut redis()?)?;
        let (rss, _) = d.usage()?;
        say(
            "qsysd RSS with 100,000 tasks waiting (MiB)",
            format!("{:.1} ({waiting} still in Redis)", rss as f64 / 1024.0),
        );
        drop(d);
        hung.stop();
    }
    fleet.stop();

    if let Some(path) = a.record {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let cpus = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
            })
            .unwrap_or_default();
        let flush: Option<String> =
            mysql()?.query_first("SELECT @@innodb_flush_log_at_trx_commit")?;
        writeln!(f, "\n### Run of {}\n", chrono_like_now())?;
        writeln!(f, "Machine: {} cores of {cpus}; MariaDB innodb_flush_log_at_trx_commit={}; settings: {} tasks, {} GPUs x {} slots, {} instance(s), {} completion, instant, {} fleet.\n", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), flush.unwrap_or_default(), a.tasks, a.gpus, a.slots, a.instances, a.completion, a.fleet)?;
        writeln!(f, "| measure | result |\n|---|---|")?;
        for (k, v) in &results {
            writeln!(f, "| {k} | {v} |")?;
        }
    }
    Ok(())
}

/// The current UTC time as `YYYY-MM-DD HH:MM`, from `date` (no time crate needed for one line).
fn chrono_like_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
