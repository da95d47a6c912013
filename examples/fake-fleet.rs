//! Runs the fake GPU fleet ([`fakefleet`]) on fixed local ports for the quickstart demo and the
//! benchmark. Prints one endpoint URL per line, then serves until SIGINT/SIGTERM or `--for`. GPU
//! i's cancel endpoint is its URL's `/g<i>` prefix plus `/cancel`.
//!
//! `cargo run --example fake-fleet -- --gpus 4 --base-port 9100 --delay-ms 200-2000`; with `--lean`,
//! the benchmark's instant fleet ([`fakefleet::LeanFleet`]), cheapest per task.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use fakefleet::Completion;
use fakefleet::{Fleet, FleetConfig, LeanFleet};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 4)]
    gpus: usize,
    /// GPU i listens on base-port + i (0: any free ports).
    #[arg(long, default_value_t = 9100)]
    base_port: u16,
    /// Work time per task in milliseconds, MIN-MAX.
    #[arg(long, default_value = "200-2000")]
    delay_ms: String,
    /// "callback" or "response".
    #[arg(long, default_value = "callback")]
    completion: String,
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    hang_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    lose_rate: f64,
    #[arg(long, default_value_t = 0.0)]
    task_fail_rate: f64,
    /// Bearer token every request must carry.
    #[arg(long)]
    token: Option<String>,
    /// Stop after this many seconds (default: run until a signal).
    #[arg(long = "for")]
    run_for: Option<u64>,
    /// Callbacks made at once (the fleet's caller threads).
    #[arg(long, default_value_t = 16)]
    callers: usize,
    /// Heartbeat every running task at this interval (0: none).
    #[arg(long, default_value_t = 0)]
    heartbeat_ms: u64,
    /// Size of the result each finished task carries (0: none).
    #[arg(long, default_value_t = 0)]
    result_bytes: usize,
    /// Run the lean fleet instead ([`fakefleet::LeanFleet`]: instant GPUs that cost least, for
    /// benchmarks): only --gpus, --base-port, --completion and --for apply.
    #[arg(long)]
    lean: bool,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let (lo, hi) = a
        .delay_ms
        .split_once('-')
        .unwrap_or((a.delay_ms.as_str(), a.delay_ms.as_str()));
    let completion = match a.completion.as_str() {
        "callback" => Completion::Callback,
        "response" => Completion::Response,
        other => anyhow::bail!("--completion: expected callback or response, got {other:?}"),
    };
    if a.lean {
        let fleet = LeanFleet::start(a.gpus, a.base_port, completion, false)?;
        for url in fleet.urls() {
            println!("{url}");
        }
        wait_for_stop(a.run_for)?;
        for g in 0..a.gpus {
            eprintln!(
                "fake-fleet: g{g} received {} tasks, at most {} at once",
                fleet.received(g),
                fleet.max_running(g)
            );
        }
        fleet.stop();
        return Ok(());
    }
    let fleet = Fleet::start(FleetConfig {
        gpus: a.gpus,
        delay: (
            Duration::from_millis(lo.trim().parse()?),
            Duration::from_millis(hi.trim().parse()?),
        ),
        completion,
        fail_rate: a.fail_rate,
        hang_rate: a.hang_rate,
        lose_rate: a.lose_rate,
        task_fail_rate: a.task_fail_rate,
        duplicate_callbacks: false,
        token: a.token,
        base_port: a.base_port,
        callers: a.callers,
        heartbeat: (a.heartbeat_ms > 0).then(|| Duration::from_millis(a.heartbeat_ms)),
        result_bytes: a.result_bytes,
        ..FleetConfig::default()
    })?;
    for url in fleet.urls() {
        println!("{url}");
    }
    wait_for_stop(a.run_for)?;
    let stats = fleet.stats();
    for g in 0..a.gpus {
        eprintln!(
            "fake-fleet: g{g} received {} tasks, at most {} at once",
            stats.received(g),
            stats.max_running(g)
        );
    }
    fleet.stop();
    Ok(())
}

/// Returns on SIGINT or SIGTERM, or after `run_for` seconds.
fn wait_for_stop(run_for: Option<u64>) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    let started = Instant::now();
    while !stop.load(Ordering::SeqCst)
        && run_for.is_none_or(|s| started.elapsed() < Duration::from_secs(s))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
