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
//! Threads: one `fake-gpu-N` per GPU serving its port, one `fake-timer` that fires due completions,
//! and a few `fake-callback-N` that make the callback calls.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
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
    /// Run the task but never call back.
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
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn received_at(&self) -> HashMap<String, Instant> {
        self.received_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How often a task was dispatched while the fleet was still running it.
    pub fn overlaps(&self) -> usize {
        self.overlaps.load(Ordering::SeqCst)
    }

    /// The task ids that arrived while already running.
    pub fn overlapped(&self) -> Vec<String> {
        self.overlapped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn start_running(&self, task_id: &str) {
        let fresh = self
            .running_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task_id.to_string());
        if !fresh {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
            self.overlapped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(task_id.to_string());
        }
    }

    fn stop_running(&self, task_id: &str) {
        self.running_tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(task_id);
    }

    pub fn body(&self, task_id: &str) -> Option<Value> {
        self.bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(task_id)
            .cloned()
    }
    pub fn callback_replies(&self) -> HashMap<u16, u32> {
        self.callback_replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A completion waiting for its time.
struct Due {
    gpu: usize,
    task_id: String,
    callback_url: String,
    status: &'static str,
    lost: bool,
}

struct Inner {
    config: FleetConfig,
    stats: Stats,
    stopping: AtomicBool,
    vanished: Vec<AtomicBool>,
    hung: Mutex<Vec<Request>>,
}

/// A running fake fleet. Dropping it stops every thread.
pub struct Fleet {
    inner: Arc<Inner>,
    urls: Vec<String>,
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
            servers.push(server);
        }
        let inner = Arc::new(Inner {
            stats: Stats {
                gpus: (0..config.gpus).map(|_| GpuStats::default()).collect(),
                ..Stats::default()
            },
            vanished: (0..config.gpus).map(|_| AtomicBool::new(false)).collect(),
            stopping: AtomicBool::new(false),
            hung: Mutex::new(Vec::new()),
            config,
        });
        let (due_tx, due_rx) = unbounded::<(Instant, Due)>();
        let (cb_tx, cb_rx) = unbounded::<Due>();
        let mut threads = Vec::new();
        for (i, server) in servers.into_iter().enumerate() {
            let (inner, due_tx) = (Arc::clone(&inner), due_tx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fake-gpu-{i}"))
                    .spawn(move || serve_gpu(inner, i, server, due_tx))?,
            );
        }
        drop(due_tx);
        let timer_inner = Arc::clone(&inner);
        threads.push(
            std::thread::Builder::new()
                .name("fake-timer".into())
                .spawn(move || run_timer(&timer_inner, due_rx, cb_tx))?,
        );
        for i in 0..inner.config.callers.max(1) {
            let (inner, rx) = (Arc::clone(&inner), cb_rx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("fake-callback-{i}"))
                    .spawn(move || send_callbacks(&inner, rx))?,
            );
        }
        Ok(Fleet {
            inner,
            urls,
            threads,
        })
    }

    /// The endpoint URL of each GPU.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }

    /// GPU `i` vanishes: every request to it, on new or kept-alive connections, gets a bare 503
    /// that closes the connection, and its pending callbacks are never sent.
    pub fn vanish(&self, i: usize) {
        self.inner.vanished[i].store(true, Ordering::SeqCst);
    }

    /// Stops every thread and waits for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner
            .hung
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
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

fn serve_gpu(inner: Arc<Inner>, i: usize, server: Server, due: Sender<(Instant, Due)>) {
    let cfg = inner.config.clone();
    let stats = &inner.stats.gpus[i];
    while !inner.stopping.load(Ordering::SeqCst) {
        let mut req = match server.recv_timeout(Duration::from_millis(50)) {
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
        if let Some(want) = &cfg.token {
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
        let mut body = Vec::new();
        let _ = req.as_reader().take(1 << 20).read_to_end(&mut body);
        let body: Option<Value> = serde_json::from_slice(&body).ok();
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
            continue;
        };
        stats.received.fetch_add(1, Ordering::SeqCst);
        *inner
            .stats
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(task_id.clone())
            .or_insert(0) += 1;
        inner
            .stats
            .bodies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task_id.clone(), body);
        inner
            .stats
            .received_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(task_id.clone(), Instant::now());

        let mut rng = rand::thread_rng();
        if rng.gen_bool(cfg.fail_rate.clamp(0.0, 1.0)) {
            respond(req, 500, json!({"error": "injected failure"}));
            continue;
        }
        if rng.gen_bool(cfg.hang_rate.clamp(0.0, 1.0)) {
            inner
                .hung
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(req);
            continue;
        }
        inner.stats.start_running(&task_id);
        let now_running = stats.running.fetch_add(1, Ordering::SeqCst) + 1;
        bump_max(&stats.max_running, now_running);
        let (lo, hi) = cfg.delay;
        let delay = if hi > lo { rng.gen_range(lo..=hi) } else { lo };
        let status = if rng.gen_bool(cfg.task_fail_rate.clamp(0.0, 1.0)) {
            "failed"
        } else {
            "finished"
        };
        let work = Due {
            gpu: i,
            task_id,
            callback_url,
            status,
            lost: rng.gen_bool(cfg.lose_rate.clamp(0.0, 1.0)),
        };
        match cfg.completion {
            Completion::Callback => {
                respond(req, 202, json!({"accepted": true}));
                let _ = due.send((Instant::now() + delay, work));
            }
            Completion::Response => {
                // The answer is the completion: hold the request on its own thread for the delay.
                let code = if status == "finished" { 200 } else { 500 };
                let inner = Arc::clone(&inner);
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    inner.stats.gpus[i].running.fetch_sub(1, Ordering::SeqCst);
                    inner.stats.stop_running(&work.task_id);
                    respond(
                        req,
                        code,
                        json!({"task_id": work.task_id, "status": work.status}),
                    );
                });
            }
        }
    }
}

fn run_timer(inner: &Inner, due: Receiver<(Instant, Due)>, callbacks: Sender<Due>) {
    let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut waiting: HashMap<u64, Due> = HashMap::new();
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        while let Some(Reverse((at, id))) = heap.peek().copied() {
            if at > now {
                break;
            }
            heap.pop();
            let d = waiting.remove(&id).expect("every heap entry has a body");
            inner.stats.gpus[d.gpu]
                .running
                .fetch_sub(1, Ordering::SeqCst);
            inner.stats.stop_running(&d.task_id);
            if !d.lost && !inner.vanished[d.gpu].load(Ordering::SeqCst) {
                let _ = callbacks.send(d);
            }
        }
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let wait = heap
            .peek()
            .map(|Reverse((at, _))| at.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(50))
            .min(Duration::from_millis(50));
        match due.recv_timeout(wait) {
            Ok((at, d)) => {
                seq += 1;
                heap.push(Reverse((at, seq)));
                waiting.insert(seq, d);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) if heap.is_empty() => return,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
        }
    }
}

/// How often a callback is sent before the fleet gives up on it (the lease then settles the task).
const CALLBACK_TRIES: u32 = 4;

fn send_callbacks(inner: &Inner, rx: Receiver<Due>) {
    let agent = agent();
    while let Ok(d) = rx.recv() {
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut body = json!({"task_id": d.task_id, "status": d.status});
        if d.status == "failed" {
            body["error"] = json!("injected task failure");
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
                let code = post_callback(&agent, &d.callback_url, &body);
                *inner
                    .stats
                    .callback_replies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(code)
                    .or_insert(0) += 1;
                if (1..500).contains(&code) || inner.stopping.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100 << retry));
            }
        }
    }
}
