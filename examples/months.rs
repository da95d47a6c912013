//! Issue 17's measures at scale: `/status` and a `/metrics` scrape over a `tasks` table of
//! millions of rows, against the `COUNT(*)` they replaced, and the rate of a prune.
//!
//! `cargo run --release --example months -- --rows 10000000` (about 10 minutes: most of it is
//! loading the rows). It makes the database `qsys_months` on the local MariaDB (dropped first),
//! loads `--rows` terminal tasks (70% finished, 20% failed, 10% cancelled, each with one attempt)
//! that ended over the last 14.6 days, so about 4% of the finished ones are past the default
//! 14-day retention, and a few in flight; then:
//! - the first rollup of the counts (every row once);
//! - `GET /status` and `GET /metrics` of a daemon on that database, 20 times each;
//! - the old count, `SELECT state, type, COUNT(*) FROM tasks GROUP BY state, type`;
//! - `qsysd prune` (ops::prune) of the rows past retention: rows per second.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use mysql::prelude::Queryable;

#[derive(Parser)]
struct Args {
    /// Terminal tasks to load.
    #[arg(long, default_value_t = 10_000_000)]
    rows: u64,
}

const BASE: &str = "mysql://root@127.0.0.1:3306";
const DB: &str = "qsys_months";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median and worst of `n` runs of `f`, in milliseconds.
fn timed(n: usize, mut f: impl FnMut()) -> (f64, f64) {
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            ms(s.elapsed())
        })
        .collect();
    t.sort_by(f64::total_cmp);
    (t[n / 2], t[n - 1])
}

fn get(url: &str) -> anyhow::Result<String> {
    let mut r = qsys::http::agent()
        .get(url)
        .call()
        .with_context(|| url.to_string())?;
    Ok(r.body_mut().read_to_string()?)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut root = mysql::Conn::new(mysql::Opts::from_url(BASE)?)?;
    root.query_drop(format!("DROP DATABASE IF EXISTS {DB}"))?;
    let url = format!("{BASE}/{DB}");
    let store = qsys::Store::connect(&url, false, "months", 4)?;
    store.migrate()?;
    let mut c = mysql::Conn::new(mysql::Opts::from_url(&url)?)?;
    let load = Instant::now();
    let chunk = 1_000_000;
    let mut lo = 1;
    while lo <= args.rows {
        let hi = (lo + chunk - 1).min(args.rows);
        // Ended 0 to 14.6 days ago (21 minutes apart per thousand), one attempt each.
        c.query_drop(format!(
            "INSERT INTO tasks (task_id, queue, state, type, payload, attempts, created_at, \
             dispatched_at, finished_at, instance_id) \
             SELECT CONCAT('m-', seq), 'task_queue_1', \
               ELT(1 + seq % 10, 'finished', 'finished', 'finished', 'finished', 'finished', \
                   'finished', 'finished', 'failed', 'failed', 'cancelled'), \
               'start_transcribe', \
               CONCAT('{{\"type\":\"start_transcribe\",\"data\":{{\"s3_key\":\"r/', seq, \
                      '.wav\",\"task_id\":\"m-', seq, '\"}}}}'), 1, \
               NOW(3) - INTERVAL ((seq % 1000) * 21 + 2) MINUTE, \
               NOW(3) - INTERVAL ((seq % 1000) * 21 + 1) MINUTE, \
               NOW(3) - INTERVAL ((seq % 1000) * 21) MINUTE, 'months' \
             FROM seq_{lo}_to_{hi}"
        ))?;
        c.query_drop(format!(
            "INSERT INTO task_attempts (task_id, attempt, gpu_id, slot_index, instance_id, \
             started_at, ended_at, outcome) \
             SELECT CONCAT('m-', seq), 1, CONCAT('g', seq % 16), seq % 4, 'months', \
               NOW(3) - INTERVAL ((seq % 1000) * 21 + 1) MINUTE, \
               NOW(3) - INTERVAL ((seq % 1000) * 21) MINUTE, \
               ELT(1 + seq % 10, 'finished', 'finished', 'finished', 'finished', 'finished', \
                   'finished', 'finished', 'failed', 'failed', 'cancelled') \
             FROM seq_{lo}_to_{hi}"
        ))?;
        println!("loaded {hi} tasks ({:.0} s)", load.elapsed().as_secs_f64());
        lo = hi + 1;
    }
    c.query_drop(
        "INSERT INTO tasks (task_id, queue, state, type, payload, attempts, created_at) \
         SELECT CONCAT('p-', seq), 'task_queue_1', 'pending', 'start_transcribe', '{}', 0, NOW(3) \
         FROM seq_1_to_100",
    )?;
    println!(
        "loaded {} tasks and attempts in {:.0} s",
        args.rows,
        load.elapsed().as_secs_f64()
    );

    let (old, old_worst) = timed(3, || {
        let _: Vec<(Option<String>, Option<String>, u64)> = c
            .query("SELECT state, type, COUNT(*) FROM tasks GROUP BY state, type")
            .unwrap_or_default();
    });
    println!("old count (GROUP BY over every row): median {old:.0} ms, worst {old_worst:.0} ms");

    let toml = format!(
        "[redis]\nqueues = [\"months:q\"]\n[mysql]\nurl = \"{url}\"\n[callback]\n\
         listen = \"127.0.0.1:0\"\nsecret = \"months-measure-secret-0123\"\n[admin]\n\
         listen = \"127.0.0.1:0\"\n[daemon]\ninstance_id = \"months\"\n\
         [[gpu.endpoints]]\nid = \"g0\"\nurl = \"http://127.0.0.1:9/\"\n"
    );
    let config = qsys::Config::from_toml(
        &toml,
        std::path::Path::new("months.toml"),
        &qsys::Env::new(),
    )?;
    let daemon = qsys::Daemon::start(config.clone())?;
    let admin = format!("http://{}", daemon.admin_addr());
    // The first rollup counts every row once; the daemon's thread runs it within seconds.
    let first = Instant::now();
    let caught_up = || -> bool {
        mysql::Conn::new(mysql::Opts::from_url(&url).expect("url"))
            .and_then(|mut c| {
                c.query_first::<bool, _>(
                    "SELECT through >= NOW(3) - INTERVAL 2 MINUTE FROM task_totals_mark",
                )
            })
            .ok()
            .flatten()
            .unwrap_or(false)
    };
    while !caught_up() {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "first rollup of {} rows: {:.1} s",
        args.rows,
        first.elapsed().as_secs_f64()
    );
    for (what, path) in [("/status", "/status"), ("/metrics scrape", "/metrics")] {
        let url = format!("{admin}{path}");
        get(&url)?;
        let (median, worst) = timed(20, || {
            let _ = get(&url);
        });
        println!(
            "{what} at {} rows: median {median:.1} ms, worst {worst:.1} ms",
            args.rows
        );
    }
    daemon.stop();
    daemon.wait()?;

    let eligible: u64 = c
        .query_first(
            "SELECT COUNT(*) FROM tasks WHERE state = 'finished' \
             AND finished_at < NOW(3) - INTERVAL 14 DAY",
        )?
        .unwrap_or(0);
    let start = Instant::now();
    let pruned = qsys::ops::prune(&config, false)?;
    let took = start.elapsed().as_secs_f64();
    let n: u64 = pruned.iter().map(|(_, n)| n).sum();
    println!(
        "prune: {n} tasks (of {eligible} past retention) with their attempts in {took:.1} s: \
         {:.0} tasks/s (batches of 1,000, unpaced; the daemon's thread pauses twice each batch's time)",
        n as f64 / took
    );
    Ok(())
}
