//! A fake GPU fleet that speaks only qsysd's GPU contract (docs/contracts.md §5): one HTTP port per GPU, a delay distribution,
//! injected 500s, hangs, lost callbacks and failed results, and its own count of concurrent tasks per
//! GPU. Tests, the quickstart demo (`cargo run --example fake-fleet`) and the benchmark drive qsysd
//! against it. A crate of its own, so that none of it is in the product (`cargo tree -e normal -p
//! qsysd` does not list it).
//!
//! It knows nothing of qsysd's internals: it reads `task_id` and `callback_url` from the request body
//! and later POSTs `{"task_id", "status"}` to that URL (again, up to four times, after no answer
//! or a 5xx, as a GPU should), so what it counts (tasks seen, most tasks
//! running at once per GPU) is an independent check of the daemon.
//!
//! The contract's extensions, each off or harmless by default:
//!
//! - **Cancel**: every GPU also serves `POST /g{i}/cancel` ([`Fleet::cancel_url`]) with
//!   `{"task_id", "attempt"}`; [`CancelMode`] says whether it stops the task, refuses or lies.
//! - **Heartbeats** ([`FleetConfig::heartbeat`]): while a callback-mode task runs, the fleet POSTs
//!   `{"task_id", "status": "running", "progress", "message"}` to its callback URL every interval.
//! - **Results** ([`FleetConfig::result_bytes`]): a `finished` completion carries a `result` of about
//!   that size (in response mode the answer's body is the result itself).
//! - **A GPU that dies silently** ([`Fleet::fall_silent`]): it keeps accepting work and answering,
//!   but never completes, heartbeats or frees anything again; unlike [`Fleet::vanish`] (bare 503s).
//! - **Speeds and work sizes** ([`FleetConfig::speeds`], [`FleetConfig::per_cost`]): a task whose
//!   body says how much work it is takes that work divided by its GPU's speed, so that placement by
//!   predicted finish can be measured against a mixed fleet (`examples/placement.rs`).
//!
//! Threads: one `fake-gpu-N` per GPU serving its port, one `fake-timer` that fires due completions
//! and heartbeats, and a few `fake-callback-N` that make the callback and heartbeat calls and answer
//! response-mode dispatches.

mod lean;

pub use lean::LeanFleet;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use rand::Rng;
use serde_json::{json, Value};
use tiny_http::{Request, Response, Server};

/// How the fake GPUs report completion (docs/contracts.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Accept at once (2xx), call back when done.
    Callback,
    /// Answer the dispatch when done.
    Response,
}

/// How a GPU answers `POST /g{i}/cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CancelMode {
    /// Stop the task if it runs here (200; a held response-mode dispatch gets 409), else 404.
    #[default]
    Stop,
    /// Answer 500 and change nothing.
    Refuse,
    /// Answer 200 and keep running the task: a GPU that lies.
    Ignore,
}

/// An agent for the callbacks: statuses are values, every phase of a call is bounded. Kept-alive
/// connections to every instance (ureq keeps 10 idle in all by default: nearly every callback
/// would open a new one), and no global or resolve timeout: with one, ureq resolves each request's
/// host on a thread of its own, which made the fleet, not qsysd, the benchmark's bottleneck.
fn agent() -> ureq::Agent {
    let phase = Some(Duration::from_secs(2));
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_idle_connections(256)
        .max_idle_connections_per_host(64)
        .timeout_connect(phase)
        .timeout_send_request(phase)
        .timeout_send_body(phase)
        .timeout_recv_response(phase)
        .timeout_recv_body(phase)
        .build()
        .into()
}

/// POSTs a callback; its HTTP status, 0 when there was no answer. The reply is read to its end:
/// only then does ureq keep the connection for the next callback.
fn post_callback(agent: &ureq::Agent, url: &str, body: &str) -> u16 {
    match agent
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
    {
        Ok(mut r) => {
            let _ = r.body_mut().read_to_vec();
            r.status().as_u16()
        }
        Err(_) => 0,
    }
}

/// How the fleet behaves. Rates are probabilities in `[0, 1]`, drawn per request.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub gpus: usize,
    /// Work time per task, uniform between the two.
    pub delay: (Duration, Duration),
    pub completion: Completion,
    /// Answer the dispatch with HTTP 500 (nothing runs).
    pub fail_rate: f64,
    /// Accept the connection and never answer (until the fleet stops).
    pub hang_rate: f64,
    /// Run the task but never call back (its heartbeats are still sent: only the completion is lost).
    pub lose_rate: f64,
    /// Run the task and report `failed`.
    pub task_fail_rate: f64,
    /// Send every callback twice.
    pub duplicate_callbacks: bool,
    /// The bearer token every request must carry, if any.
    pub token: Option<String>,
    /// First port; GPU i listens on `base_port + i`. 0: any free port.
    pub base_port: u16,
    /// Threads making callbacks: how many the fleet has in flight at once (a real fleet calls
    /// back from every GPU independently).
    pub callers: usize,
    /// How the GPUs answer a cancel.
    pub cancel: CancelMode,
    /// While a callback-mode task runs, POST a `running` heartbeat to its callback URL this often
    /// (once each, never retried). `None`: no heartbeats.
    pub heartbeat: Option<Duration>,
    /// When above 0, a `finished` completion carries a `result` whose JSON is about this many bytes.
    pub result_bytes: usize,
    /// GPU i works at `speeds[i]` times the base speed. A missing entry (the default is empty), or
    /// one that is not a positive finite number, means 1.0. Only sized work ([`Self::per_cost`])
    /// feels it: the `delay` draw is the same on every GPU.
    pub speeds: Vec<f64>,
    /// When set, a task whose body carries a work size takes `size * per_cost / speed` on its GPU
    /// instead of a `delay` draw. The size is what qsysd would read from the same fields: the body
    /// is the task's `data` plus `task_id` and `callback_url`, so a numeric `cost`, else
    /// `audio_seconds`, else `duration_s` (the first that is finite and not negative). Each task
    /// runs on its own: a GPU is no slower for running several at once, as with slots that are
    /// real hardware each. `None` (the default): every task draws from `delay`.
    pub per_cost: Option<Duration>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            gpus: 4,
            delay: (Duration::from_millis(5), Duration::from_millis(50)),
            completion: Completion::Callback,
            fail_rate: 0.0,
            hang_rate: 0.0,
            lose_rate: 0.0,
            task_fail_rate: 0.0,
            duplicate_callbacks: false,
            token: None,
            base_port: 0,
            callers: 4,
            cancel: CancelMode::Stop,
            heartbeat: None,
            result_bytes: 0,
            speeds: Vec::new(),
            per_cost: None,
        }
    }
}

/// Per-GPU counters.
#[derive(Debug, Default)]
pub struct GpuStats {
    pub running: AtomicUsize,
    pub max_running: AtomicUsize,
    pub received: AtomicUsize,
    pub refused: AtomicUsize,
}

/// What the fleet observed.
#[derive(Debug, Default)]
pub struct Stats {
    pub gpus: Vec<GpuStats>,
    /// Dispatches per task id, over the whole fleet.
    pub seen: Mutex<HashMap<String, u32>>,
    /// The latest request body per task id.
    pub bodies: Mutex<HashMap<String, Value>>,
    /// When the latest request for each task id arrived (the benchmark's latency).
    received_at: Mutex<HashMap<String, Instant>>,
    /// Tasks running now, fleet-wide, and how often a task arrived while already running.
    running_tasks: Mutex<std::collections::HashSet<String>>,
    overlaps: AtomicUsize,
    overlapped: Mutex<Vec<String>>,
    /// Callback replies by HTTP status (0: transport error).
    pub callback_replies: Mutex<HashMap<u16, u32>>,
    /// Heartbeats sent (counted once answered, or not).
    pub heartbeats: AtomicUsize,
    /// Heartbeat replies by HTTP status (0: transport error).
    pub heartbeat_replies: Mutex<HashMap<u16, u32>>,
    /// Every authorised, well-formed cancel: task id, attempt, the status it was answered.
    pub cancels: Mutex<Vec<(String, u32, u16)>>,
    /// The latest result the fleet sent per task id.
    results: Mutex<HashMap<String, Value>>,
}

/// Locks `m`, ignoring poison: a panicking test thread must not hide the fleet's counts.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn count_reply(replies: &Mutex<HashMap<u16, u32>>, code: u16) {
    *lock(replies).entry(code).or_insert(0) += 1;
}

impl Stats {
    pub fn max_running(&self, gpu: usize) -> usize {
        self.gpus[gpu].max_running.load(Ordering::SeqCst)
    }
    /// Starts GPU `gpu`'s high-water mark again from what it runs now (a test that lowered its
    /// slots checks the new count from here on).
    pub fn reset_max_running(&self, gpu: usize) {
        let g = &self.gpus[gpu];
        g.max_running
            .store(g.running.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    pub fn received(&self, gpu: usize) -> usize {
        self.gpus[gpu].received.load(Ordering::SeqCst)
    }
    pub fn running(&self, gpu: usize) -> usize {
        self.gpus[gpu].running.load(Ordering::SeqCst)
    }
    pub fn seen(&self) -> HashMap<String, u32> {
        lock(&self.seen).clone()
    }
    pub fn received_at(&self) -> HashMap<String, Instant> {
        lock(&self.received_at).clone()
    }

    /// How often a task was dispatched while the fleet was still running it.
    pub fn overlaps(&self) -> usize {
        self.overlaps.load(Ordering::SeqCst)
    }

    /// The task ids that arrived while already running.
    pub fn overlapped(&self) -> Vec<String> {
        lock(&self.overlapped).clone()
    }

    fn start_running(&self, task_id: &str) {
        let fresh = lock(&self.running_tasks).insert(task_id.to_string());
        if !fresh {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
            lock(&self.overlapped).push(task_id.to_string());
        }
    }

    fn stop_running(&self, task_id: &str) {
        lock(&self.running_tasks).remove(task_id);
    }

    pub fn body(&self, task_id: &str) -> Option<Value> {
        lock(&self.bodies).get(task_id).cloned()
    }
    pub fn callback_replies(&self) -> HashMap<u16, u32> {
        lock(&self.callback_replies).clone()
    }
    /// Heartbeats sent so far.
    pub fn heartbeats(&self) -> usize {
        self.heartbeats.load(Ordering::SeqCst)
    }
    pub fn heartbeat_replies(&self) -> HashMap<u16, u32> {
        lock(&self.heartbeat_replies).clone()
    }
    pub fn cancels(&self) -> Vec<(String, u32, u16)> {
        lock(&self.cancels).clone()
    }
    /// The `result` the fleet last sent for `task_id` (recorded before it was sent).
    pub fn result_of(&self, task_id: &str) -> Option<Value> {
        lock(&self.results).get(task_id).cloned()
    }
}

/// A task a GPU runs: in its GPU's table from its dispatch until its completion or a cancel
/// takes it out.
struct Job {
    gpu: usize,
    task_id: String,
    /// The attempt its callback URL names, if it does: a cancel for another attempt of the same
    /// task (a stale one) must not stop this one.
    attempt: Option<u32>,
    callback_url: String,
    status: &'static str,
    lost: bool,
    started: Instant,
    delay: Duration,
    /// Response mode: the dispatch, answered when the job ends.
    held: Option<Request>,
}

/// What the timer does at a time: complete a job, or send it a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tick {
    Beat,
    Done,
}

/// An entry of the timer's heap, earliest first (`at` is the first field, so it orders them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Timed {
    at: Instant,
    gpu: usize,
    id: u64,
    tick: Tick,
}

/// Work for the callback threads.
enum Post {
    /// A job that ended by itself (finished or failed): its callback, or in response mode its answer.
    Done(Box<Job>),
    /// A heartbeat for job `id` on GPU `gpu`, built when sent so its progress is current.
    Beat { gpu: usize, id: u64 },
}

struct Inner {
    config: FleetConfig,
    stats: Stats,
    stopping: AtomicBool,
    vanished: Vec<AtomicBool>,
    silent: Vec<AtomicBool>,
    hung: Mutex<Vec<Request>>,
    /// Per GPU, the jobs it runs by job id. Taking a job out of its table is what ends it, so a
    /// completion and a cancel racing for it are settled by this lock: one of them gets it.
    jobs: Vec<Mutex<HashMap<u64, Job>>>,
    next_job: AtomicU64,
}

impl Inner {
    /// The heartbeat interval, if any; at least 1 ms, so that a zero cannot spin the timer.
    fn beat_every(&self) -> Option<Duration> {
        self.config
            .heartbeat
            .map(|d| d.max(Duration::from_millis(1)))
    }

    /// A job that was taken out of its table stops counting as running. Only whoever took it out
    /// calls this, so the count drops exactly once.
    fn ended(&self, job: &Job) {
        self.stats.gpus[job.gpu]
            .running
            .fetch_sub(1, Ordering::SeqCst);
        self.stats.stop_running(&job.task_id);
    }

    /// Ends job `id` on GPU `gpu` as done; `None` if a cancel ended it first.
    fn finish(&self, gpu: usize, id: u64) -> Option<Job> {
        let job = lock(&self.jobs[gpu]).remove(&id)?;
        self.ended(&job);
        Some(job)
    }

    /// Ends, as cancelled, the jobs of `task_id` attempt `attempt` that GPU `gpu` runs.
    fn cancel(&self, gpu: usize, task_id: &str, attempt: u32) -> Vec<Job> {
        let stopped: Vec<Job> = {
            let mut jobs = lock(&self.jobs[gpu]);
            let ids: Vec<u64> = jobs
                .iter()
                .filter(|(_, j)| j.task_id == task_id && j.attempt.is_none_or(|a| a == attempt))
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| jobs.remove(id)).collect()
        };
        for job in &stopped {
            self.ended(job);
        }
        stopped
    }

    /// The URL and body of a heartbeat for job `id` on GPU `gpu`, or `None` when it gets none
    /// (any more): it ended, its GPU vanished or fell silent, or the fleet stops.
    fn heartbeat(&self, gpu: usize, id: u64) -> Option<(String, String)> {
        if self.stopping.load(Ordering::SeqCst)
            || self.vanished[gpu].load(Ordering::SeqCst)
            || self.silent[gpu].load(Ordering::SeqCst)
        {
            return None;
        }
        let jobs = lock(&self.jobs[gpu]);
        let job = jobs.get(&id)?;
        let body = json!({
            "task_id": job.task_id,
            "status": "running",
            "progress": progress(job.started.elapsed(), job.delay),
            "message": "transcribing",
        });
        Some((job.callback_url.clone(), body.to_string()))
    }
}

/// The fraction of `delay` that `elapsed` is, in `[0, 1]`, rounded to 2 decimals.
fn progress(elapsed: Duration, delay: Duration) -> f64 {
    if delay.is_zero() {
        return 1.0;
    }
    let fraction = (elapsed.as_secs_f64() / delay.as_secs_f64()).clamp(0.0, 1.0);
    (fraction * 100.0).round() / 100.0
}

/// The longest a sized task works: an absurd size must not overflow the timer's `Instant`s, and
/// no test waits this long anyway.
const MAX_WORK: Duration = Duration::from_secs(86_400);

/// How long GPU `gpu` works on the task `body` describes, when the fleet sizes work
/// ([`FleetConfig::per_cost`]) and the body says its size; `None`: draw from `delay`.
fn sized_work(cfg: &FleetConfig, gpu: usize, body: &Value) -> Option<Duration> {
    let per = cfg.per_cost?;
    let size = ["cost", "audio_seconds", "duration_s"]
        .iter()
        .find_map(|k| {
            body.get(k)?
                .as_f64()
                .filter(|size| size.is_finite() && *size >= 0.0)
        })?;
    let speed = (cfg.speeds.get(gpu).copied())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(1.0);
    let work = Duration::try_from_secs_f64(per.as_secs_f64() * size / speed).unwrap_or(MAX_WORK);
    Some(work.min(MAX_WORK))
}

/// The attempt a callback URL names (`?attempt=N&token=T`, docs/contracts.md §5), if any.
fn attempt_of(callback_url: &str) -> Option<u32> {
    let (_, query) = callback_url.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("attempt="))?
        .parse()
        .ok()
}

/// The words a fake transcript is made of.
const WORDS: [&str; 9] = [
    "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog",
];

/// The `result` of a finished task: `{"transcript", "words", "gpu"}` whose JSON is within a word of
/// `bytes` long (at least the task id: tiny when `bytes` is small). The transcript is ASCII and
/// starts with the task id (its ASCII letters, digits, `-` and `_`), so that a result stored for the
/// wrong task shows.
fn result_for(task_id: &str, gpu: usize, bytes: usize) -> Value {
    // `{"gpu":,"transcript":"","words":}` is 33 bytes, plus the digits of the two numbers.
    const FRAME: usize = 40;
    let room = bytes.saturating_sub(FRAME);
    let mut transcript: String = task_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(64)
        .collect();
    let mut words = usize::from(!transcript.is_empty());
    for word in WORDS.iter().cycle() {
        if transcript.len() + 1 + word.len() > room {
            break;
        }
        if !transcript.is_empty() {
            transcript.push(' ');
        }
        transcript.push_str(word);
        words += 1;
    }
    json!({"transcript": transcript, "words": words, "gpu": gpu})
}

/// A running fake fleet. Dropping it stops every thread.
pub struct Fleet {
    inner: Arc<Inner>,
    urls: Vec<String>,
    cancel_urls: Vec<String>,
    threads: Vec<JoinHandle<()>>,
}

fn bump_max(max: &AtomicUsize, now: usize) {
    max.fetch_max(now, Ordering::SeqCst);
}

fn respond(req: Request, status: u16, body: Value) {
    let _ = req.respond(Response::from_string(body.to_string()).with_status_code(status));
}

impl Fleet {
    pub fn start(config: FleetConfig) -> std::io::Result<Fleet> {
        let mut servers = Vec::with_capacity(config.gpus);
        let mut urls = Vec::with_capacity(config.gpus);
        let mut cancel_urls = Vec::with_capacity(config.gpus);
        for i in 0..config.gpus {
            let port = if config.base_port == 0 {
                0
            } else {
                config.base_port + i as u16
            };
            let server = Server::http(("127.0.0.1", port)).map_err(std::io::Error::other)?;
            let addr = server
                .server_addr()
                .to_ip()
                .expect("bound to an IP address");
            urls.push(format!(
                "http://{addr}/g{i}/ai/get_detailed_transcript_from_s3?sort_by=start"
            ));
            cancel_urls.push(format!("http://{addr}/g{i}/cancel"));
            servers.push(server);
        }
        let flags = || (0..config.gpus).map(|_| AtomicBool::new(false)).collect();
        let inner = Arc::new(Inner {
            stats: Stats {
                gpus: (0..config.gpus).map(|_| GpuStats::default()).collect(),
                ..Stats::default()
            },
            vanished: flags(),
            silent: flags(),
            stopping: AtomicBool::new(false),
            hung: Mutex::new(Vec::new()),
            jobs: (0..config.gpus).map(|_| Mutex::default()).collect(),
            next_job: AtomicU64::new(0),
            config,
        });
        let (timer_tx, timer_rx) = unbounded::<Timed>();
        let (post_tx, post_rx) = unbounded::<Post>();
        let mut threads = Vec::new();
        for (i, server) in servers.into_iter().enumerate() {
            let (inner, timer_tx) = (Arc::clone(&inner), timer_tx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fake-gpu-{i}"))
                    .spawn(move || serve_gpu(&inner, i, server, &timer_tx))?,
            );
        }
        drop(timer_tx);
        let timer_inner = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("fake-timer".into())
                .spawn(move || run_timer(&timer_inner, &timer_rx, &post_tx))?,
        );
        for i in 0..inner.config.callers.max(1) {
            let (inner, rx) = (Arc::clone(&inner), post_rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fake-callback-{i}"))
                    .spawn(move || send_posts(&inner, &rx))?,
            );
        }
        Ok(Fleet {
            inner,
            urls,
            cancel_urls,
            threads,
        })
    }

    /// The endpoint URL of each GPU.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// GPU `i`'s cancel endpoint, on the same port as its dispatch URL.
    pub fn cancel_url(&self, i: usize) -> String {
        self.cancel_urls[i].clone()
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// GPU `i` vanishes: every request to it, on new or kept-alive connections, gets a bare 503
    /// that closes the connection, and its pending callbacks and heartbeats are never sent.
    pub fn vanish(&self, i: usize) {
        self.inner.vanished[i].store(true, Ordering::SeqCst);
    }

    /// GPU `i` wedges while its HTTP layer keeps working: it still accepts dispatches (202 in
    /// callback mode; in response mode it holds them unanswered until the fleet stops) and answers
    /// cancels 202 without acting on them, but it never completes, heartbeats or frees anything
    /// again: the tasks it runs or receives count as running for good.
    pub fn fall_silent(&self, i: usize) {
        self.inner.silent[i].store(true, Ordering::SeqCst);
    }

    /// Stops every thread and waits for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        // Dropping a request answers it (500): the hung ones and those a silent GPU holds are let
        // go now rather than when the last thread lets go of the fleet. Dropped outside the locks.
        let hung = std::mem::take(&mut *lock(&self.inner.hung));
        let held: Vec<_> = (self.inner.jobs.iter())
            .map(|jobs| std::mem::take(&mut *lock(jobs)))
            .collect();
        drop((hung, held));
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The JSON body of a request (read up to 1 MiB), if it is JSON.
fn read_json(req: &mut Request) -> Option<Value> {
    let mut body = Vec::new();
    let _ = req.as_reader().take(1 << 20).read_to_end(&mut body);
    serde_json::from_slice(&body).ok()
}

fn serve_gpu(inner: &Inner, i: usize, server: Server, timer: &Sender<Timed>) {
    let stats = &inner.stats.gpus[i];
    while !inner.stopping.load(Ordering::SeqCst) {
        let req = match server.recv_timeout(Duration::from_millis(50)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            // An accept error concerns one connection; the GPU keeps serving the others (returning
            // here would leave requests on open keep-alive connections unanswered).
            Err(_) => continue,
        };
        if inner.vanished[i].load(Ordering::SeqCst) {
            // Gone: tiny_http cannot reset a connection, and dropping the server would leave
            // requests on kept-alive connections hanging; the nearest is a bare 503 that closes it.
            let close = tiny_http::Header::from_bytes("Connection", "close")
                .expect("static header is valid");
            let _ = req.respond(Response::empty(503).with_header(close));
            continue;
        }
        if let Some(want) = &inner.config.token {
            let auth = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
                .map(|h| h.value.as_str().to_string());
            if auth.as_deref() != Some(format!("Bearer {want}").as_str()) {
                stats.refused.fetch_add(1, Ordering::SeqCst);
                respond(req, 401, json!({"error": "bad token"}));
                continue;
            }
        }
        let path = req.url().split_once('?').map_or(req.url(), |(p, _)| p);
        if path.ends_with("/cancel") {
            cancel(inner, i, req);
        } else {
            dispatch(inner, i, req, timer);
        }
    }
}

/// `POST /g{i}/cancel`. Cancels are read by the thread that reads GPU `i`'s dispatches, so a job
/// is always in its table before a cancel sent after its 202 is looked at.
fn cancel(inner: &Inner, i: usize, mut req: Request) {
    let parsed = read_json(&mut req).and_then(|v| {
        Some((
            v.get("task_id")?.as_str()?.to_string(),
            u32::try_from(v.get("attempt")?.as_u64()?).ok()?,
        ))
    });
    let Some((task_id, attempt)) = parsed else {
        inner.stats.gpus[i].refused.fetch_add(1, Ordering::SeqCst);
        respond(req, 400, json!({"error": "task_id and attempt required"}));
        return;
    };
    let cancelled = json!({"task_id": task_id, "cancelled": true});
    let (code, answer) = if inner.silent[i].load(Ordering::SeqCst) {
        // Wedged: its HTTP layer takes the cancel in, the worker never acts on it.
        (202, json!({"accepted": true}))
    } else {
        match inner.config.cancel {
            CancelMode::Refuse => (500, json!({"error": "injected cancel failure"})),
            CancelMode::Ignore => (200, cancelled),
            CancelMode::Stop => {
                let stopped = inner.cancel(i, &task_id, attempt);
                if stopped.is_empty() {
                    (404, json!({"error": "not running here"}))
                } else {
                    for held in stopped.into_iter().filter_map(|job| job.held) {
                        respond(held, 409, json!({"status": "cancelled"}));
                    }
                    (200, cancelled)
                }
            }
        }
    };
    // Recorded before the answer, so a test that has the answer also finds the record.
    lock(&inner.stats.cancels).push((task_id, attempt, code));
    respond(req, code, answer);
}

/// A dispatch to GPU `i`: counted, then refused, hung or run.
fn dispatch(inner: &Inner, i: usize, mut req: Request, timer: &Sender<Timed>) {
    let cfg = &inner.config;
    let stats = &inner.stats.gpus[i];
    let body = read_json(&mut req);
    let parsed = body.as_ref().and_then(|v| {
        Some((
            v.get("task_id")?.as_str()?.to_string(),
            v.get("callback_url")?.as_str()?.to_string(),
        ))
    });
    let (Some(body), Some((task_id, callback_url))) = (body, parsed) else {
        stats.refused.fetch_add(1, Ordering::SeqCst);
        respond(
            req,
            400,
            json!({"error": "task_id and callback_url required"}),
        );
        return;
    };
    // Read before the body is kept: it is moved into the stats.
    let sized = sized_work(cfg, i, &body);
    stats.received.fetch_add(1, Ordering::SeqCst);
    *lock(&inner.stats.seen).entry(task_id.clone()).or_insert(0) += 1;
    lock(&inner.stats.bodies).insert(task_id.clone(), body);
    lock(&inner.stats.received_at).insert(task_id.clone(), Instant::now());

    let mut rng = rand::thread_rng();
    if rng.gen_bool(cfg.fail_rate.clamp(0.0, 1.0)) {
        respond(req, 500, json!({"error": "injected failure"}));
        return;
    }
    if rng.gen_bool(cfg.hang_rate.clamp(0.0, 1.0)) {
        lock(&inner.hung).push(req);
        return;
    }
    inner.stats.start_running(&task_id);
    let now_running = stats.running.fetch_add(1, Ordering::SeqCst) + 1;
    bump_max(&stats.max_running, now_running);
    let (lo, hi) = cfg.delay;
    let delay = match sized {
        Some(work) => work,
        None if hi > lo => rng.gen_range(lo..=hi),
        None => lo,
    };
    let status = if rng.gen_bool(cfg.task_fail_rate.clamp(0.0, 1.0)) {
        "failed"
    } else {
        "finished"
    };
    let held = match cfg.completion {
        Completion::Callback => {
            respond(req, 202, json!({"accepted": true}));
            None
        }
        // The answer is the completion: the request waits in the job until it ends.
        Completion::Response => Some(req),
    };
    let beat_every = inner.beat_every().filter(|_| held.is_none());
    let started = Instant::now();
    let id = inner.next_job.fetch_add(1, Ordering::SeqCst);
    let job = Job {
        gpu: i,
        attempt: attempt_of(&callback_url),
        task_id,
        callback_url,
        status,
        lost: rng.gen_bool(cfg.lose_rate.clamp(0.0, 1.0)),
        started,
        delay,
        held,
    };
    lock(&inner.jobs[i]).insert(id, job);
    let at = |after, tick| Timed {
        at: started + after,
        gpu: i,
        id,
        tick,
    };
    let _ = timer.send(at(delay, Tick::Done));
    if let Some(every) = beat_every {
        let _ = timer.send(at(every, Tick::Beat));
    }
}

fn run_timer(inner: &Inner, timed: &Receiver<Timed>, posts: &Sender<Post>) {
    let mut heap: BinaryHeap<Reverse<Timed>> = BinaryHeap::new();
    loop {
        let now = Instant::now();
        while let Some(Reverse(t)) = heap.peek().copied() {
            if t.at > now {
                break;
            }
            heap.pop();
            match t.tick {
                Tick::Done => {
                    // A silent GPU never finishes: the job stays in its table, running, for good.
                    if inner.silent[t.gpu].load(Ordering::SeqCst) {
                        continue;
                    }
                    // `None`: a cancel ended it first.
                    let Some(job) = inner.finish(t.gpu, t.id) else {
                        continue;
                    };
                    let heard = !job.lost && !inner.vanished[t.gpu].load(Ordering::SeqCst);
                    if job.held.is_some() || heard {
                        let _ = posts.send(Post::Done(Box::new(job)));
                    }
                }
                Tick::Beat => {
                    // The next one is due an interval after this one is queued; none once the
                    // job ended or went quiet.
                    if let (Some(every), Some(_)) =
                        (inner.beat_every(), inner.heartbeat(t.gpu, t.id))
                    {
                        let _ = posts.send(Post::Beat {
                            gpu: t.gpu,
                            id: t.id,
                        });
                        heap.push(Reverse(Timed {
                            at: now + every,
                            ..t
                        }));
                    }
                }
            }
        }
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let wait = heap
            .peek()
            .map(|Reverse(t)| t.at.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        match timed.recv_timeout(wait) {
            Ok(t) => heap.push(Reverse(t)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) if heap.is_empty() => return,
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
        }
    }
}

/// How often a callback is sent before the fleet gives up on it (the lease then settles the task).
const CALLBACK_TRIES: u32 = 4;

fn send_posts(inner: &Inner, rx: &Receiver<Post>) {
    let agent = agent();
    while !inner.stopping.load(Ordering::SeqCst) {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Post::Done(job)) => complete(inner, &agent, *job),
            Ok(Post::Beat { gpu, id }) => beat(inner, &agent, gpu, id),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Reports a job that ended by itself: answers its held dispatch (response mode) or calls back.
fn complete(inner: &Inner, agent: &ureq::Agent, job: Job) {
    let result = (job.status == "finished" && inner.config.result_bytes > 0)
        .then(|| result_for(&job.task_id, job.gpu, inner.config.result_bytes));
    if let Some(result) = &result {
        lock(&inner.stats.results).insert(job.task_id.clone(), result.clone());
    }
    if let Some(req) = job.held {
        let code = if job.status == "finished" { 200 } else { 500 };
        let body = result.unwrap_or_else(|| json!({"task_id": job.task_id, "status": job.status}));
        respond(req, code, body);
        return;
    }
    let mut body = json!({"task_id": job.task_id, "status": job.status});
    if job.status == "failed" {
        body["error"] = json!("injected task failure");
    }
    if let Some(result) = result {
        body["result"] = result;
    }
    let body = body.to_string();
    let times = if inner.config.duplicate_callbacks {
        2
    } else {
        1
    };
    for _ in 0..times {
        // Like a real GPU (docs/contracts.md §5), a callback that got no answer or a 5xx is sent again.
        for retry in 0..CALLBACK_TRIES {
            let code = post_callback(agent, &job.callback_url, &body);
            count_reply(&inner.stats.callback_replies, code);
            if (1..500).contains(&code) || inner.stopping.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100 << retry));
        }
    }
}

/// Sends one heartbeat, never again on failure: the next one is due soon anyway. Looked up again
/// here, so none goes out for a job that ended or went quiet while this waited in the queue.
fn beat(inner: &Inner, agent: &ureq::Agent, gpu: usize, id: u64) {
    let Some((url, body)) = inner.heartbeat(gpu, id) else {
        return;
    };
    let code = post_callback(agent, &url, &body);
    inner.stats.heartbeats.fetch_add(1, Ordering::SeqCst);
    count_reply(&inner.stats.heartbeat_replies, code);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A callback receiver: every body it was sent, answered 200.
    struct Sink {
        url: String,
        bodies: Receiver<Value>,
        _thread: JoinHandle<()>,
    }

    fn sink() -> Sink {
        let server = Server::http("127.0.0.1:0").expect("bind the sink");
        let addr = server.server_addr().to_ip().expect("an IP address");
        let (tx, bodies) = unbounded();
        let thread = std::thread::Builder::new()
            .name("test-sink".into())
            .spawn(move || {
                // Ends when the test drops the receiver (the next send fails) or after a minute.
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    let Ok(Some(mut req)) = server.recv_timeout(Duration::from_millis(50)) else {
                        continue;
                    };
                    let body = read_json(&mut req).unwrap_or(Value::Null);
                    respond(req, 200, json!({}));
                    if tx.send(body).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the sink");
        Sink {
            url: format!("http://{addr}/callback?attempt=3&token=t"),
            bodies,
            _thread: thread,
        }
    }

    fn post(url: &str, body: Value) -> (u16, Value) {
        let mut r = agent().post(url).send(body.to_string()).expect("an answer");
        let text = r.body_mut().read_to_string().expect("a body");
        (
            r.status().as_u16(),
            serde_json::from_str(&text).expect("JSON"),
        )
    }

    fn fleet(delay: Duration, config: FleetConfig) -> Fleet {
        Fleet::start(FleetConfig {
            gpus: 1,
            delay: (delay, delay),
            ..config
        })
        .expect("start the fleet")
    }

    #[test]
    fn results_are_about_the_size_asked() {
        for bytes in [64, 100, 1_000, 4_096, 100_000, 1 << 20] {
            for gpu in [0, 7, 1_000] {
                let size = result_for("3f2a-task_id/with:odd chars", gpu, bytes)
                    .to_string()
                    .len();
                assert!(size.abs_diff(bytes) <= 64, "{bytes} asked, {size} made");
            }
        }
        let small = result_for("t1", 0, 1);
        assert!(small.to_string().len() < 64, "{small}");
        assert_eq!(small["transcript"], "t1");
        let r = result_for("t1", 2, 500);
        let transcript = r["transcript"].as_str().expect("a transcript");
        assert!(transcript.is_ascii() && transcript.starts_with("t1 "));
        assert_eq!(r["words"], transcript.split(' ').count());
        assert_eq!(r["gpu"], 2);
    }

    #[test]
    fn progress_and_attempt() {
        let ms = Duration::from_millis;
        assert_eq!(progress(ms(333), ms(1_000)), 0.33);
        assert_eq!(progress(ms(5_000), ms(1_000)), 1.0);
        assert_eq!(progress(ms(1), Duration::ZERO), 1.0);
        assert_eq!(attempt_of("http://h/cb?attempt=12&token=x"), Some(12));
        assert_eq!(attempt_of("http://h/cb?token=x&attempt=2"), Some(2));
        assert_eq!(attempt_of("http://h/cb"), None);
    }

    #[test]
    fn sized_work_is_its_size_over_the_gpu_speed() {
        let cfg = FleetConfig {
            speeds: vec![1.0, 2.0, 0.0],
            per_cost: Some(Duration::from_millis(1)),
            ..FleetConfig::default()
        };
        let ms = |gpu, body| sized_work(&cfg, gpu, &body).map(|d| d.as_secs_f64() * 1e3);
        let near = |got: Option<f64>, want: f64| got.is_some_and(|g| (g - want).abs() < 1e-3);
        assert!(near(ms(0, json!({"cost": 100})), 100.0));
        assert!(near(ms(1, json!({"cost": 100})), 50.0), "2x: half the time");
        // A speed that is no speed, or none at all: the base speed.
        assert!(near(ms(2, json!({"cost": 100})), 100.0));
        assert!(near(ms(9, json!({"cost": 100})), 100.0));
        // `cost` first, then `audio_seconds`, then `duration_s`; one that is no size is passed over.
        let all = json!({"cost": 3, "audio_seconds": 7, "duration_s": 9});
        assert!(near(ms(0, all), 3.0));
        assert!(near(ms(0, json!({"cost": "3", "audio_seconds": 7.5})), 7.5));
        assert!(near(ms(0, json!({"cost": -1, "duration_s": 9})), 9.0));
        assert_eq!(ms(0, json!({"s3_key": "a.wav"})), None);
        assert_eq!(sized_work(&cfg, 0, &json!({"cost": 1e300})), Some(MAX_WORK));
        let plain = FleetConfig {
            per_cost: None,
            ..cfg.clone()
        };
        assert_eq!(sized_work(&plain, 0, &json!({"cost": 100})), None);
    }

    #[test]
    fn a_fast_gpu_finishes_the_same_work_first() {
        let sink = sink();
        let f = Fleet::start(FleetConfig {
            gpus: 2,
            speeds: vec![1.0, 4.0],
            per_cost: Some(Duration::from_millis(2)),
            ..FleetConfig::default()
        })
        .expect("start the fleet");
        let started = Instant::now();
        let task = |id: &str| json!({"task_id": id, "cost": 100, "callback_url": sink.url});
        assert_eq!(post(&f.urls()[0], task("slow")).0, 202);
        assert_eq!(post(&f.urls()[1], task("fast")).0, 202);
        let next = || {
            let body = (sink.bodies.recv_timeout(Duration::from_secs(5))).expect("a callback");
            assert_eq!(body["status"], "finished", "{body}");
            body["task_id"].clone()
        };
        // 50 ms of work at 4x, 200 ms at 1x.
        assert_eq!(next(), "fast");
        assert_eq!(next(), "slow");
        assert!(started.elapsed() >= Duration::from_millis(200));
        f.stop();
    }

    #[test]
    fn heartbeats_then_a_result_and_a_cancel_stops_a_task() {
        let sink = sink();
        let f = fleet(
            Duration::from_millis(300),
            FleetConfig {
                heartbeat: Some(Duration::from_millis(50)),
                result_bytes: 200,
                ..FleetConfig::default()
            },
        );
        let task = |id: &str| json!({"task_id": id, "callback_url": sink.url});
        assert_eq!(post(&f.urls()[0], task("a")).0, 202);
        assert_eq!(post(&f.urls()[0], task("b")).0, 202);
        let cancel = |id: &str, attempt: u32| {
            post(&f.cancel_url(0), json!({"task_id": id, "attempt": attempt}))
        };
        assert_eq!(cancel("b", 2).0, 404, "another attempt");
        assert_eq!(
            cancel("b", 3),
            (200, json!({"task_id": "b", "cancelled": true}))
        );
        assert_eq!(cancel("b", 3).0, 404, "no longer running");
        assert_eq!(f.stats().running(0), 1);

        let mut finished = None;
        while finished.is_none() {
            let body = sink
                .bodies
                .recv_timeout(Duration::from_secs(5))
                .expect("a callback");
            if body["status"] == "finished" {
                assert_eq!(body["task_id"], "a", "no completion once cancelled: {body}");
                finished = Some(body);
            } else {
                assert_eq!(body["status"], "running");
                let p = body["progress"].as_f64().expect("progress");
                assert!((0.0..=1.0).contains(&p), "{body}");
            }
        }
        // "b" would have completed with "a": nothing at all comes for it now.
        while let Ok(body) = sink.bodies.recv_timeout(Duration::from_millis(150)) {
            assert_ne!(body["task_id"], "b", "{body}");
        }
        let finished = finished.expect("finished");
        assert_eq!(Some(finished["result"].clone()), f.stats().result_of("a"));
        assert!(f.stats().heartbeats() >= 2, "{}", f.stats().heartbeats());
        assert_eq!(f.stats().running(0), 0);
        assert_eq!(
            f.stats().cancels(),
            [
                ("b".into(), 2, 404),
                ("b".into(), 3, 200),
                ("b".into(), 3, 404)
            ]
        );
        f.stop();
    }

    #[test]
    fn a_silent_gpu_accepts_and_never_finishes() {
        let sink = sink();
        let f = fleet(
            Duration::from_millis(20),
            FleetConfig {
                heartbeat: Some(Duration::from_millis(5)),
                ..FleetConfig::default()
            },
        );
        f.fall_silent(0);
        let task = json!({"task_id": "s", "callback_url": sink.url});
        assert_eq!(post(&f.urls()[0], task).0, 202);
        let cancel = json!({"task_id": "s", "attempt": 3});
        assert_eq!(post(&f.cancel_url(0), cancel).0, 202);
        assert!(sink
            .bodies
            .recv_timeout(Duration::from_millis(200))
            .is_err());
        assert_eq!(f.stats().running(0), 1, "wedged, not done");
        assert_eq!(f.stats().heartbeats(), 0);
        f.stop();
    }

    #[test]
    fn response_mode_answers_with_the_result_or_409_when_cancelled() {
        let f = fleet(
            Duration::from_millis(300),
            FleetConfig {
                completion: Completion::Response,
                result_bytes: 100,
                ..FleetConfig::default()
            },
        );
        let task = |id: &str| json!({"task_id": id, "callback_url": "http://unused/?attempt=1"});
        let url = f.urls()[0].clone();
        let cancelled = std::thread::Builder::new()
            .name("test-held".into())
            .spawn(move || post(&url, task("e")))
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(5);
        while f.stats().received(0) < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let cancel = json!({"task_id": "e", "attempt": 1});
        assert_eq!(post(&f.cancel_url(0), cancel).0, 200);
        assert_eq!(
            cancelled.join().expect("no panic"),
            (409, json!({"status": "cancelled"}))
        );
        assert_eq!(f.stats().running(0), 0);
        let (code, body) = post(&f.urls()[0], task("d"));
        assert_eq!(code, 200);
        assert_eq!(
            Some(body),
            f.stats().result_of("d"),
            "the answer is the result"
        );
        assert_eq!(f.stats().running(0), 0);
        f.stop();
    }

    #[test]
    fn a_cancel_racing_the_completion_ends_the_task_once() {
        let sink = sink();
        let f = Fleet::start(FleetConfig {
            gpus: 1,
            delay: (Duration::ZERO, Duration::from_millis(2)),
            ..FleetConfig::default()
        })
        .expect("start the fleet");
        let tasks = 100;
        let mut cancelled = 0;
        for n in 0..tasks {
            let id = format!("r{n}");
            let task = json!({"task_id": id, "callback_url": sink.url});
            assert_eq!(post(&f.urls()[0], task).0, 202);
            let (code, _) = post(&f.cancel_url(0), json!({"task_id": id, "attempt": 3}));
            assert!(code == 200 || code == 404, "{code}");
            cancelled += usize::from(code == 200);
        }
        let mut finished = 0;
        while let Ok(body) = sink.bodies.recv_timeout(Duration::from_millis(300)) {
            finished += usize::from(body["status"] == "finished");
        }
        assert_eq!(cancelled + finished, tasks, "{cancelled} cancelled");
        assert_eq!(f.stats().running(0), 0);
        assert_eq!(f.stats().max_running(0), 1);
        f.stop();
    }
}
