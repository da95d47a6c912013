//! Least-loaded placement against placement by predicted finish, side by side, on a fleet of mixed
//! speeds: the release `qsysd` as a child process against the local Redis and MariaDB (database
//! `qsys_placement`, dropped first; Redis keys `placement:*`), the fake fleet in this process, and
//! `qsys-push` for the producer side. Only loopback addresses are used.
//!
//! ```text
//! bash scripts/services.sh
//! cargo build --release --locked --bins --example placement
//! target/release/examples/placement [--rounds 3] [--record BENCHMARKS.md]
//! ```
//!
//! The fleet: `--slow` GPUs at 1x and `--fast` GPUs at `--fast-speed` (default 4 at 1x, 2 at 4x),
//! `--slots` each, callback completion, a task's work `audio_seconds * --ms-per-unit / speed`
//! (fakefleet's `per_cost`; no slowdown with concurrency).
//!
//! The workload (`--tasks`, seeded by `--seed`, the same recordings every round): transcriptions
//! whose `data.audio_seconds` has a long tail, each drawn on its own:
//! - 80% short calls, 5 to 60 s of audio;
//! - 15% 1 to 10 minutes;
//! - 5% long recordings, 20 to 60 minutes (the "long" tasks below).
//!
//! Runs: a warm-up (`--warmup` tasks of the same mix, least-loaded) so that qsysd has learned every
//! GPU's speed and kept it in `gpu_speeds`; then `--rounds` rounds of each policy, alternating
//! (LL, PF, LL, PF, ...), qsysd restarted on the same database with the round's `[gpu] placement`,
//! every task of the round pushed at once under fresh ids (or, with `--load F`, arriving one by
//! one at that share of the fleet's capacity, each stamped as pushed), the round over when all
//! are `finished`.
//!
//! Per round:
//! - makespan: the first push (this clock) to the last `finished_at` (MySQL's, same host);
//! - enqueue -> finish mean and p95: each task's `enqueued_at` (qsys-push's stamp) to `finished_at`;
//! - ETA error: 2 s after the push (qsysd works the backlog out every second), `GET /status`
//!   gives `time_to_drain_s` of pool `default`;
//!   (predicted - actual) / actual drain, both counted from that sample, signed;
//! - long on fast: the share of long tasks whose finished attempt ran on a fast GPU.
//!
//! The summary gives per policy the median and range of makespan and p95, and PF's improvement over
//! LL paired round by round (LL round k against PF round k). `--record FILE` appends a dated section
//! with the command line, the machine, the settings and the table.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use fakefleet::{Fleet, FleetConfig};
use mysql::prelude::Queryable;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

/// When the round's ETA is read: after the push, once qsysd has measured the queue twice.
const ETA_AFTER: Duration = Duration::from_secs(2);

#[derive(Parser)]
struct Args {
    /// Tasks per round.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Tasks of the warm-up (least-loaded) that teaches qsysd the GPUs' speeds.
    #[arg(long, default_value_t = 300)]
    warmup: usize,
    /// Rounds of each policy.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// GPUs at 1x.
    #[arg(long, default_value_t = 4)]
    slow: usize,
    /// GPUs at --fast-speed.
    #[arg(long, default_value_t = 2)]
    fast: usize,
    #[arg(long, default_value_t = 4.0)]
    fast_speed: f64,
    /// Slots per GPU.
    #[arg(long, default_value_t = 4)]
    slots: usize,
    /// Work time per second of audio on a 1x GPU, in milliseconds.
    #[arg(long, default_value_t = 1.0)]
    ms_per_unit: f64,
    /// Seed of the workload.
    #[arg(long, default_value_t = 20_260_501)]
    seed: u64,
    /// Arrivals: 0 pushes a round's tasks at once (a burst); above 0, they arrive one by one at
    /// this share of the fleet's capacity (0.7: 70%), each stamped when pushed.
    #[arg(long, default_value_t = 0.0)]
    load: f64,
    /// A round that has not finished after this many seconds fails the run (default: 60 s plus ten
    /// times the ideal drain time).
    #[arg(long)]
    timeout_s: Option<u64>,
    /// Append the results to this Markdown file.
    #[arg(long)]
    record: Option<PathBuf>,
}

const MYSQL: &str = "mysql://root@127.0.0.1:3306";
const DB: &str = "qsys_placement";
const PREFIX: &str = "placement";
const QUEUE: &str = "placement:q";
/// Audio seconds from which a recording counts as long.
const LONG: f64 = 1200.0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    LeastLoaded,
    PredictedFinish,
}

impl Policy {
    fn config_name(self) -> &'static str {
        match self {
            Policy::LeastLoaded => "least_loaded",
            Policy::PredictedFinish => "predicted_finish",
        }
    }
    fn short(self) -> &'static str {
        match self {
            Policy::LeastLoaded => "LL",
            Policy::PredictedFinish => "PF",
        }
    }
}

/// `n` recordings' audio seconds (module doc for the mix), rounded to tenths.
fn workload(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (lo, hi) = match rng.gen::<f64>() {
                u if u < 0.80 => (5.0, 60.0),
                u if u < 0.95 => (60.0, 600.0),
                _ => (LONG, 3600.0),
            };
            (rng.gen_range(lo..hi) * 10.0_f64).round() / 10.0
        })
        .collect()
}

fn mysql() -> anyhow::Result<mysql::Conn> {
    Ok(mysql::Conn::new(mysql::Opts::from_url(MYSQL)?)?)
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn release_bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/release")
        .join(name)
}

/// The fleet and what qsysd's config says of it.
struct Setup {
    fleet: Fleet,
    /// Endpoint id per fleet GPU: `slow-N` then `fast-N`.
    ids: Vec<String>,
    slots: usize,
    dir: PathBuf,
    /// With `--load`, the time between two arrivals; `None`: a burst.
    every: Option<Duration>,
}

impl Setup {
    /// Writes the config of a qsysd placing by `policy`, its admin listener on `admin_port`.
    fn config(&self, policy: Policy, admin_port: u16) -> anyhow::Result<PathBuf> {
        let mut s = format!(
            "[redis]\nurl = \"redis://127.0.0.1:6379/0\"\nqueues = [\"{QUEUE}\"]\n\
             key_prefix = \"{PREFIX}\"\n[mysql]\nurl = \"{MYSQL}/{DB}\"\n\
             [callback]\nlisten = \"127.0.0.1:0\"\nsecret = \"placement-secret-0123456789\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
             [daemon]\ninstance_id = \"placement\"\nlog_level = \"warn\"\nlog_target = \"stderr\"\n\
             [gpu]\nslots = {}\nplacement = \"{}\"\n",
            self.slots,
            policy.config_name()
        );
        for (id, url) in self.ids.iter().zip(self.fleet.urls()) {
            writeln!(
                s,
                "[[gpu.endpoints]]\nid = \"{id}\"\nurl = \"{url}\"\npool = \"default\""
            )?;
        }
        let path = self
            .dir
            .join(format!("qsysd-{}.toml", policy.config_name()));
        std::fs::write(&path, s)?;
        Ok(path)
    }
}

/// A qsysd child. Dropping it stops it (SIGTERM, then SIGKILL after 20 s), on every exit path.
struct Daemon {
    child: Child,
    admin: String,
    log: PathBuf,
    http: ureq::Agent,
}

impl Daemon {
    /// Starts qsysd on `config` and waits for its `READY=1` (30 s at most).
    fn start(config: &Path, admin_port: u16, log: PathBuf) -> anyhow::Result<Daemon> {
        let sock_path = log.with_extension("sock");
        let _ = std::fs::remove_file(&sock_path);
        let sock = UnixDatagram::bind(&sock_path)?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let child = Command::new(release_bin("qsysd"))
            .arg("--config")
            .arg(config)
            .env_clear()
            .env("NOTIFY_SOCKET", &sock_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start target/release/qsysd (cargo build --release --bins)")?;
        let mut d = Daemon {
            child,
            admin: format!("http://127.0.0.1:{admin_port}"),
            log,
            http: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(5)))
                .build()
                .into(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 512];
        loop {
            if let Ok(k) = sock.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..k]).contains("READY=1") {
                    return Ok(d);
                }
            }
            if let Some(status) = d.child.try_wait()? {
                bail!(
                    "qsysd exited ({status}) before READY=1; see {}",
                    d.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!("qsysd not ready after 30 s; see {}", d.log.display());
            }
        }
    }

    fn status(&self) -> anyhow::Result<Value> {
        let url = format!("{}/status", self.admin);
        let mut r = self.http.get(&url).call().with_context(|| url.clone())?;
        let body = r.body_mut().read_to_string()?;
        if r.status() != 200 {
            bail!("{url}: {} {body}", r.status());
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// `(when, time_to_drain_s)` of pool `default`: the Unix time halfway through the request.
    fn drain_eta(&self) -> anyhow::Result<(f64, Option<f64>)> {
        let before = unix_now();
        let status = self.status()?;
        let at = f64::midpoint(before, unix_now());
        let pool =
            (status["pools"].as_array().into_iter().flatten()).find(|p| p["pool"] == "default");
        Ok((at, pool.and_then(|p| p["time_to_drain_s"].as_f64())))
    }

    /// Each GPU's learned speed as `/status` shows it (`None`: not learned).
    fn speeds(&self) -> anyhow::Result<Vec<(String, Option<f64>)>> {
        let status = self.status()?;
        Ok((status["gpus"].as_array().into_iter().flatten())
            .map(|g| {
                (
                    g["id"].as_str().unwrap_or("?").to_string(),
                    g["speed"].as_f64(),
                )
            })
            .collect())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Already reaped: its pid may belong to another process by now.
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                eprintln!("qsysd did not stop within 20 s of SIGTERM: killed");
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.wait();
    }
}

/// A free loopback port for the admin listener (qsysd's own choice, `:0`, is not reported to a
/// parent that is not systemd).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// What one round measured.
struct Round {
    policy: Policy,
    makespan: f64,
    mean: f64,
    p95: f64,
    /// Signed, in percent: (predicted - actual) / actual drain from the sample.
    eta_error: Option<f64>,
    /// Long tasks on fast GPUs, of long tasks.
    long_fast: (usize, usize),
    speeds: Vec<(String, Option<f64>)>,
}

impl Round {
    /// The ETA error and the long-on-fast share, as printed.
    fn cells(&self) -> (String, String) {
        let eta = self.eta_error.map_or("n/a".into(), |e| format!("{e:+.1}%"));
        let (fast, of) = self.long_fast;
        let share = format!(
            "{:.0}% ({fast}/{of})",
            100.0 * fast as f64 / of.max(1) as f64
        );
        (eta, share)
    }
}

/// Runs `audio` under `policy` as tasks `TAG-i` on a qsysd of its own, until all are finished.
fn run_round(
    setup: &Setup,
    policy: Policy,
    tag: &str,
    audio: &[f64],
    timeout: Duration,
) -> anyhow::Result<Round> {
    let port = free_port()?;
    let config = setup.config(policy, port)?;
    let daemon = Daemon::start(&config, port, setup.dir.join(format!("qsysd-{tag}.log")))?;
    let lines: Vec<String> = (audio.iter().enumerate())
        .map(|(i, s)| {
            format!(
                r#"{{"type":"start_transcribe","data":{{"task_id":"{tag}-{i}","s3_key":"rec/{i}.wav","audio_seconds":{s}}}}}"#
            )
        })
        .collect();
    let t0 = Instant::now();
    let pushed_at = unix_now();
    match setup.every {
        None => push(&config, &lines)?,
        Some(every) => arrive(&lines, every)?,
    }

    let mut c = mysql()?;
    let like = format!("'{tag}-%'");
    let mut sample = None;
    loop {
        // A stream below capacity has no backlog to drain: no ETA to check.
        if sample.is_none() && setup.every.is_none() && t0.elapsed() >= ETA_AFTER {
            sample = Some(daemon.drain_eta().unwrap_or_else(|e| {
                eprintln!("{tag}: no ETA sample: {e:#}");
                (unix_now(), None)
            }));
        }
        let states: HashMap<Option<String>, usize> = c
            .query::<(Option<String>, usize), _>(format!(
                "SELECT state, COUNT(*) FROM {DB}.tasks WHERE task_id LIKE {like} GROUP BY state"
            ))?
            .into_iter()
            .collect();
        let count = |s: &str| states.get(&Some(s.to_string())).copied().unwrap_or(0);
        if count("failed") + count("cancelled") > 0 {
            let why: Vec<(String, Option<String>)> = c.query(format!(
                "SELECT task_id, error FROM {DB}.tasks WHERE task_id LIKE {like} \
                 AND state IN ('failed', 'cancelled') LIMIT 3"
            ))?;
            bail!(
                "{tag}: tasks did not finish: {why:?}; see {}",
                daemon.log.display()
            );
        }
        if count("finished") >= audio.len() {
            break;
        }
        if t0.elapsed() > timeout {
            bail!(
                "{tag}: not finished after {} s (tasks by state: {states:?}); see {}",
                timeout.as_secs(),
                daemon.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let speeds = daemon.speeds().unwrap_or_else(|e| {
        eprintln!("{tag}: no speeds from /status: {e:#}");
        Vec::new()
    });
    drop(daemon);

    let rows: Vec<(f64, Option<String>)> = c.query(format!(
        "SELECT UNIX_TIMESTAMP(finished_at), JSON_VALUE(payload, '$.enqueued_at') \
         FROM {DB}.tasks WHERE task_id LIKE {like}"
    ))?;
    let last = rows.iter().map(|r| r.0).fold(f64::NEG_INFINITY, f64::max);
    let mut waits: Vec<f64> = (rows.iter())
        .map(|(done, queued)| {
            let queued = queued.as_deref().and_then(|q| q.parse().ok());
            done - queued.unwrap_or(pushed_at)
        })
        .collect();
    waits.sort_by(f64::total_cmp);
    let eta_error = sample.and_then(|(at, eta)| {
        let actual = last - at;
        Some((eta? - actual) / actual * 100.0).filter(|_| actual > 0.0)
    });
    let on: Vec<(String, Option<String>)> = c.query(format!(
        "SELECT task_id, gpu_id FROM {DB}.task_attempts WHERE task_id LIKE {like} \
         AND outcome = 'finished'"
    ))?;
    let mut long_fast = (0, 0);
    for (id, gpu) in on {
        let i: usize = id.rsplit('-').next().unwrap_or("").parse()?;
        if audio[i] >= LONG {
            long_fast.1 += 1;
            long_fast.0 += usize::from(gpu.is_some_and(|g| g.starts_with("fast-")));
        }
    }
    Ok(Round {
        policy,
        makespan: last - pushed_at,
        mean: waits.iter().sum::<f64>() / waits.len() as f64,
        p95: percentile(&waits, 0.95),
        eta_error,
        long_fast,
        speeds,
    })
}

/// Pushes `lines` as NDJSON with the release `qsys-push`, which stamps each `enqueued_at`.
fn push(config: &Path, lines: &[String]) -> anyhow::Result<()> {
    let mut child = Command::new(release_bin("qsys-push"))
        .arg("--config")
        .arg(config)
        .args(["--file", "-", "--queue", QUEUE])
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("start target/release/qsys-push")?;
    let mut stdin = child.stdin.take().context("qsys-push stdin")?;
    let written = stdin.write_all((lines.join("\n") + "\n").as_bytes());
    drop(stdin);
    let status = child.wait()?;
    written?;
    if !status.success() {
        bail!("qsys-push failed: {status}");
    }
    Ok(())
}

/// Pushes `lines` one every `every`, each stamped with its `enqueued_at` as it is pushed (a
/// steady stream below capacity: each task's own time then counts, not a burst's queue).
fn arrive(lines: &[String], every: Duration) -> anyhow::Result<()> {
    let mut r = redis::Client::open("redis://127.0.0.1:6379/0")?
        .get_connection_with_timeout(Duration::from_secs(3))?;
    let start = Instant::now();
    for (i, line) in lines.iter().enumerate() {
        if let Some(wait) = (start + every * i as u32).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let open = line
            .strip_suffix('}')
            .context("a task line is a JSON object")?;
        let stamped = format!("{open},\"enqueued_at\":{:.3}}}", unix_now());
        redis::cmd("RPUSH")
            .arg(QUEUE)
            .arg(stamped)
            .query::<()>(&mut r)?;
    }
    Ok(())
}

/// Nearest rank of a sorted slice.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Median, min and max.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (f64::midpoint(v[(n - 1) / 2], v[n / 2]), v[0], v[n - 1])
}

fn reset() -> anyhow::Result<()> {
    mysql()?.query_drop(format!("DROP DATABASE IF EXISTS {DB}"))?;
    let mut r = redis::Client::open("redis://127.0.0.1:6379/0")?
        .get_connection_with_timeout(Duration::from_secs(3))?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{PREFIX}:*"))
        .query(&mut r)?;
    if !keys.is_empty() {
        redis::cmd("DEL").arg(keys).query::<()>(&mut r)?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.tasks == 0 || a.rounds == 0 || a.slots == 0 || a.slow + a.fast == 0 {
        bail!("--tasks, --rounds, --slots and the fleet must not be 0");
    }
    if !(a.ms_per_unit > 0.0 && a.ms_per_unit.is_finite() && a.fast_speed > 0.0) {
        bail!("--ms-per-unit and --fast-speed must be positive");
    }
    let dir = std::env::temp_dir().join("qsys-placement");
    std::fs::create_dir_all(&dir)?;
    reset()?;
    let speeds: Vec<f64> = std::iter::repeat_n(1.0, a.slow)
        .chain(std::iter::repeat_n(a.fast_speed, a.fast))
        .collect();
    let ids: Vec<String> = (0..a.slow)
        .map(|i| format!("slow-{i}"))
        .chain((0..a.fast).map(|i| format!("fast-{i}")))
        .collect();
    if !(a.load >= 0.0 && a.load < 1.0) {
        bail!("--load is a share of the fleet's capacity, from 0 (a burst) to below 1");
    }
    let mut setup = Setup {
        fleet: Fleet::start(FleetConfig {
            gpus: speeds.len(),
            speeds: speeds.clone(),
            per_cost: Some(Duration::from_secs_f64(a.ms_per_unit / 1e3)),
            callers: 16,
            ..FleetConfig::default()
        })?,
        ids,
        slots: a.slots,
        dir,
        every: None,
    };

    let audio = workload(a.tasks, a.seed);
    let long = audio.iter().filter(|s| **s >= LONG).count();
    let medium = audio.iter().filter(|s| (60.0..LONG).contains(*s)).count();
    // Every slot busy until the end, each GPU at its speed: the best any placement could do.
    let ideal = audio.iter().sum::<f64>() * a.ms_per_unit
        / 1e3
        / (speeds.iter().sum::<f64>() * a.slots as f64);
    let timeout = Duration::from_secs(a.timeout_s.unwrap_or(60 + (10.0 * ideal).ceil() as u64));
    let settings = format!(
        "{} tasks a round ({} short, {medium} 1-10 min, {long} of 20-60 min; {:.1} h of audio; \
         seed {}), {} GPUs at 1x and {} at {}x, {} slots each, {} ms per audio second at 1x \
         (ideal drain {ideal:.1} s), {}, warm-up {} tasks, {} rounds per policy",
        a.tasks,
        a.tasks - medium - long,
        audio.iter().sum::<f64>() / 3600.0,
        a.seed,
        a.slow,
        a.fast,
        a.fast_speed,
        a.slots,
        a.ms_per_unit,
        if a.load > 0.0 {
            format!(
                "arriving one by one at {:.0}% of capacity over {:.1} s",
                a.load * 100.0,
                ideal / a.load
            )
        } else {
            "pushed at once".to_string()
        },
        a.warmup,
        a.rounds
    );
    println!("{settings}");

    if a.warmup > 0 {
        let warm = workload(a.warmup, a.seed ^ 0x5eed);
        let w = run_round(&setup, Policy::LeastLoaded, "warm", &warm, timeout)?;
        let learned: Vec<String> = (w.speeds.iter())
            .map(|(id, s)| format!("{id} {}", s.map_or("-".into(), |s| format!("{s:.1}"))))
            .collect();
        println!(
            "warm-up: {} tasks in {:.1} s; learned speeds (cost units/s): {}",
            a.warmup,
            w.makespan,
            learned.join(", ")
        );
        match mysql()?.query_first::<u64, _>(format!("SELECT COUNT(*) FROM {DB}.gpu_speeds")) {
            Ok(n) => println!("gpu_speeds rows: {}", n.unwrap_or(0)),
            Err(e) => eprintln!("warning: gpu_speeds unreadable, rounds may start cold: {e}"),
        }
    }

    // The warm-up is a burst; the rounds arrive as asked.
    setup.every = (a.load > 0.0).then(|| Duration::from_secs_f64(ideal / a.load / a.tasks as f64));
    let mut rounds = Vec::new();
    let mut table = vec![
        "| round | policy | makespan (s) | enqueue->finish mean (s) | p95 (s) | ETA error | long on fast |".to_string(),
        "|---|---|---|---|---|---|---|".to_string(),
    ];
    for k in 1..=a.rounds {
        for policy in [Policy::LeastLoaded, Policy::PredictedFinish] {
            let tag = format!("{}{k}", policy.short().to_lowercase());
            let r = run_round(&setup, policy, &tag, &audio, timeout)?;
            let (eta, share) = r.cells();
            let p = policy.short();
            println!(
                "round {k} {p}: makespan {:.2} s, enqueue->finish mean {:.2} s p95 {:.2} s, \
                 ETA error {eta}, long on fast {share}",
                r.makespan, r.mean, r.p95
            );
            table.push(format!(
                "| {k} | {p} | {:.2} | {:.2} | {:.2} | {eta} | {share} |",
                r.makespan, r.mean, r.p95
            ));
            rounds.push(r);
        }
    }
    drop(setup);
    let summary = summarize(&rounds);
    for line in &summary {
        println!("{line}");
    }
    if let Some(path) = &a.record {
        record(path, &settings, &table, &summary)?;
    }
    Ok(())
}

/// Per policy the median and range of makespan and p95, and PF's gain over LL round by round.
fn summarize(rounds: &[Round]) -> Vec<String> {
    let of = |p: Policy, f: fn(&Round) -> f64| -> Vec<f64> {
        rounds.iter().filter(|r| r.policy == p).map(f).collect()
    };
    let makespan: fn(&Round) -> f64 = |r| r.makespan;
    let p95: fn(&Round) -> f64 = |r| r.p95;
    let mut summary = Vec::new();
    for p in [Policy::LeastLoaded, Policy::PredictedFinish] {
        let (m, m_lo, m_hi) = spread(of(p, makespan));
        let (q, q_lo, q_hi) = spread(of(p, p95));
        let mine = || rounds.iter().filter(move |r| r.policy == p);
        let etas: Vec<f64> = mine().filter_map(|r| r.eta_error).collect();
        let eta = match etas.len() {
            0 => "n/a".to_string(),
            n => {
                let (e, lo, hi) = spread(etas);
                format!("{e:+.1}% ({lo:+.1}% to {hi:+.1}%, {n} rounds)")
            }
        };
        let (fast, long) = mine().fold((0, 0), |(f, l), r| (f + r.long_fast.0, l + r.long_fast.1));
        summary.push(format!(
            "{}: makespan median {m:.2} s ({m_lo:.2}-{m_hi:.2}), p95 median {q:.2} s \
             ({q_lo:.2}-{q_hi:.2}), ETA error median {eta}, long on fast {:.0}% overall",
            p.short(),
            100.0 * fast as f64 / long.max(1) as f64
        ));
    }
    // Round k of LL against round k of PF: each pair ran back to back.
    for (what, f) in [("makespan", makespan), ("p95", p95)] {
        let (ll, pf) = (of(Policy::LeastLoaded, f), of(Policy::PredictedFinish, f));
        let gains: Vec<f64> = ll
            .iter()
            .zip(&pf)
            .map(|(l, p)| (l - p) / l * 100.0)
            .collect();
        let n = gains.len();
        let (g, lo, hi) = spread(gains);
        summary.push(format!(
            "PF over LL, {what}: {g:+.1}% better (median of {n} paired rounds, {lo:+.1}% to {hi:+.1}%)"
        ));
    }
    summary
}

/// Appends a dated section to the Markdown file `path`.
fn record(path: &Path, settings: &str, table: &[String], summary: &[String]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| path.display().to_string())?;
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cmd: Vec<String> = std::env::args().collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    writeln!(
        f,
        "\n### Placement, least-loaded vs predicted finish: run of {date}\n"
    )?;
    writeln!(f, "Command: `{}`\n", cmd.join(" "))?;
    writeln!(f, "Machine: {cores} cores (nproc); settings: {settings}.\n")?;
    writeln!(f, "{}\n", table.join("\n"))?;
    for line in summary {
        writeln!(f, "- {line}")?;
    }
    Ok(())
}
