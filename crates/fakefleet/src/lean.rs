//! A lean fake fleet for the benchmark: instant GPUs that cost as little CPU per task as a fleet
//! can, so that the benchmark measures qsysd, MariaDB and Redis rather than its own harness
//! (issue 20: the full [`crate::Fleet`] cost 0.09–0.10 ms of CPU a task, most of it thread
//! hand-offs: tiny_http's connection thread to the GPU's thread to the timer to a caller).
//!
//! One thread per connection does everything for the requests on it, with no hand-off and no lock
//! shared between GPUs: it reads a dispatch, counts it in its GPU's atomics, answers it (at once,
//! 202 in callback mode; 200 when done in response mode) and, in callback mode, POSTs the
//! completion itself over a kept-alive connection of its own. It speaks plain HTTP/1.1 with
//! `Content-Length` bodies, which is all qsysd's dispatcher and callback listener use, and is not
//! built on tiny_http: the benchmark's and the tests' fleets then share no HTTP server code, which
//! is how issue 20's unanswered dispatch was told apart from the fleet.
//!
//! What it keeps: per GPU, tasks received, running now and the most at once (the independent
//! check of qsysd's slots), and optionally each task's arrival time (the benchmark's latency);
//! fleet-wide, callbacks answered 2xx and not. Everything else of the full fleet (delays, faults,
//! heartbeats, cancels, results) is left out on purpose.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Completion;

/// How often a blocked read looks at the stop flag.
const POLL: Duration = Duration::from_millis(200);
/// A request that has not arrived whole this long after its first byte is dropped.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// The largest head or body the fleet reads; qsysd's dispatch bodies are a few hundred bytes.
const MAX_REQUEST: usize = 1 << 20;
/// A callback is sent this often before it is given up (the lease then settles the task), as the
/// full fleet does.
const CALLBACK_TRIES: u32 = 4;

/// What one GPU saw.
#[derive(Debug, Default)]
pub struct LeanGpu {
    received: AtomicUsize,
    running: AtomicUsize,
    max_running: AtomicUsize,
    /// Task id to its latest arrival, when arrivals are recorded. Per GPU: no lock is shared
    /// between GPUs.
    arrivals: Mutex<HashMap<String, Instant>>,
}

struct Inner {
    completion: Completion,
    record_arrivals: bool,
    stopping: AtomicBool,
    gpus: Vec<LeanGpu>,
    callbacks_ok: AtomicU64,
    callbacks_failed: AtomicU64,
    /// Connection threads, joined at the stop.
    conns: Mutex<Vec<JoinHandle<()>>>,
}

/// A running lean fleet; stops (and joins its threads) when dropped.
pub struct LeanFleet {
    inner: Arc<Inner>,
    urls: Vec<String>,
    acceptors: Vec<JoinHandle<()>>,
}

impl LeanFleet {
    /// Starts `gpus` instant GPUs on loopback, GPU i on `base_port + i` (0: free ports). With
    /// `record_arrivals`, each task's arrival time is kept (a map insert per dispatch).
    pub fn start(
        gpus: usize,
        base_port: u16,
        completion: Completion,
        record_arrivals: bool,
    ) -> std::io::Result<LeanFleet> {
        let inner = Arc::new(Inner {
            completion,
            record_arrivals,
            stopping: AtomicBool::new(false),
            gpus: (0..gpus).map(|_| LeanGpu::default()).collect(),
            callbacks_ok: AtomicU64::new(0),
            callbacks_failed: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let mut urls = Vec::with_capacity(gpus);
        let mut acceptors = Vec::with_capacity(gpus);
        for gpu in 0..gpus {
            let port = if base_port == 0 {
                0
            } else {
                base_port + gpu as u16
            };
            let listener = TcpListener::bind(("127.0.0.1", port))?;
            urls.push(format!(
                "http://{}/g{gpu}/transcribe",
                listener.local_addr()?
            ));
            let inner = Arc::clone(&inner);
            acceptors.push(
                std::thread::Builder::new()
                    .name(format!("lean-gpu-{gpu}"))
                    .spawn(move || accept(&inner, gpu, &listener))?,
            );
        }
        Ok(LeanFleet {
            inner,
            urls,
            acceptors,
        })
    }

    /// The endpoint URL of each GPU.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Dispatches GPU `gpu` received.
    pub fn received(&self, gpu: usize) -> usize {
        self.inner.gpus[gpu].received.load(Ordering::SeqCst)
    }

    /// The most tasks GPU `gpu` ran at once.
    pub fn max_running(&self, gpu: usize) -> usize {
        self.inner.gpus[gpu].max_running.load(Ordering::SeqCst)
    }

    /// Callbacks answered 2xx, and those answered otherwise or not at all (after every try).
    pub fn callbacks(&self) -> (u64, u64) {
        (
            self.inner.callbacks_ok.load(Ordering::SeqCst),
            self.inner.callbacks_failed.load(Ordering::SeqCst),
        )
    }

    /// Each task's latest arrival, over every GPU (empty unless arrivals are recorded).
    pub fn arrivals(&self) -> HashMap<String, Instant> {
        let mut all = HashMap::new();
        for g in &self.inner.gpus {
            all.extend(lock(&g.arrivals).iter().map(|(k, v)| (k.clone(), *v)));
        }
        all
    }

    /// Stops every thread and waits for them.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        for url in &self.urls {
            // Wakes the acceptor blocked in accept().
            if let Some(addr) = host_of(url) {
                let _ = TcpStream::connect(addr);
            }
        }
        for t in self.acceptors.drain(..) {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *lock(&self.inner.conns));
        for t in conns {
            let _ = t.join();
        }
    }
}

impl Drop for LeanFleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The `host:port` of a plain `http://` URL.
fn host_of(url: &str) -> Option<&str> {
    url.strip_prefix("http://")?.split('/').next()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept(inner: &Arc<Inner>, gpu: usize, listener: &TcpListener) {
    for conn in listener.incoming() {
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        // An accept error concerns one connection.
        let Ok(conn) = conn else { continue };
        let inner2 = Arc::clone(inner);
        let spawned = std::thread::Builder::new()
            .name("lean-conn".into())
            .spawn(move || serve(&inner2, gpu, conn));
        if let Ok(t) = spawned {
            let mut conns = lock(&inner.conns);
            conns.retain(|t| !t.is_finished());
            conns.push(t);
        }
    }
}

/// The fields of a dispatch the fleet needs.
#[derive(serde::Deserialize)]
struct Dispatch {
    task_id: String,
    callback_url: String,
}

/// Serves one connection's requests in turn until the client closes it or the fleet stops.
fn serve(inner: &Inner, gpu: usize, mut conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(POLL));
    let _ = conn.set_write_timeout(Some(REQUEST_DEADLINE));
    let mut caller = Caller::default();
    let mut buf = Vec::with_capacity(4096);
    while let Some(body) = next_body(inner, &mut conn, &mut buf) {
        let Ok(d) = serde_json::from_slice::<Dispatch>(&body) else {
            let _ = answer(
                &mut conn,
                400,
                r#"{"error":"task_id and callback_url required"}"#,
            );
            continue;
        };
        let g = &inner.gpus[gpu];
        g.received.fetch_add(1, Ordering::SeqCst);
        if inner.record_arrivals {
            lock(&g.arrivals).insert(d.task_id.clone(), Instant::now());
        }
        // The task runs from its arrival until it is reported done: just before the answer in
        // response mode, after the 202 and before the callback otherwise. qsysd frees the slot
        // only on that report, so a fourth task here at once is a slot given twice. Instant work
        // runs for microseconds: the count mostly stays near 1 (the full fleet's delays test
        // more).
        let now = g.running.fetch_add(1, Ordering::SeqCst) + 1;
        g.max_running.fetch_max(now, Ordering::SeqCst);
        let done = format!(
            r#"{{"task_id":{},"status":"finished"}}"#,
            serde_json::Value::from(d.task_id)
        );
        let answered = match inner.completion {
            Completion::Response => {
                g.running.fetch_sub(1, Ordering::SeqCst);
                answer(&mut conn, 200, &done)
            }
            Completion::Callback => {
                let accepted = answer(&mut conn, 202, r#"{"accepted":true}"#);
                g.running.fetch_sub(1, Ordering::SeqCst);
                let counter = if caller.post(&d.callback_url, &done) {
                    &inner.callbacks_ok
                } else {
                    &inner.callbacks_failed
                };
                counter.fetch_add(1, Ordering::SeqCst);
                accepted
            }
        };
        if answered.is_err() {
            return;
        }
    }
}

/// Reads the next request on `conn` and returns its body; `None` when the connection closed, the
/// fleet stops, or the request is malformed or too slow (the connection is then closed).
fn next_body(inner: &Inner, conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut started: Option<Instant> = (!buf.is_empty()).then(Instant::now);
    loop {
        if let Some((head, len)) = parse_head(buf) {
            let len = len.ok()?;
            if head + len > MAX_REQUEST {
                return None;
            }
            if buf.len() >= head + len {
                let body = buf[head..head + len].to_vec();
                buf.drain(..head + len);
                return Some(body);
            }
        } else if buf.len() > MAX_REQUEST {
            return None;
        }
        if inner.stopping.load(Ordering::SeqCst)
            || started.is_some_and(|t| t.elapsed() > REQUEST_DEADLINE)
        {
            let _ = conn.shutdown(Shutdown::Both);
            return None;
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => {
                started.get_or_insert_with(Instant::now);
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// When `buf` holds a whole head: its length and the body's (`Err` for a bad or missing
/// `Content-Length`, which the fleet does not serve).
fn parse_head(buf: &[u8]) -> Option<(usize, Result<usize, ()>)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| ());
    let len = head.and_then(|h| {
        h.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().map_err(|_| ()))
            })
            .unwrap_or(Ok(0))
    });
    Some((end, len))
}

fn answer(conn: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        202 => "Accepted",
        _ => "Bad Request",
    };
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(msg.as_bytes())
}

/// A connection thread's own client for callbacks: one kept-alive connection per callback host.
#[derive(Default)]
struct Caller {
    conns: HashMap<String, TcpStream>,
}

impl Caller {
    /// POSTs `body` to `url` (plain `http://`); true when answered 2xx. Like a GPU, a callback
    /// that got no answer or a 5xx is sent again, on a fresh connection.
    fn post(&mut self, url: &str, body: &str) -> bool {
        let Some((host, path)) = url
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))))
        else {
            return false;
        };
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        for retry in 0..CALLBACK_TRIES {
            match self.send(host, &request) {
                Some(status) if status < 500 => return (200..300).contains(&status),
                _ => {
                    self.conns.remove(host);
                    // The first retry is at once: a kept-alive connection the server closed
                    // meanwhile fails without the request having been seen.
                    if retry > 0 {
                        std::thread::sleep(Duration::from_millis(100 << retry));
                    }
                }
            }
        }
        false
    }

    /// One request and its answer's status, on the host's kept-alive connection.
    fn send(&mut self, host: &str, request: &str) -> Option<u16> {
        if !self.conns.contains_key(host) {
            let addr = host.parse().ok()?;
            let c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            c.set_nodelay(true).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            c.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
            self.conns.insert(host.to_string(), c);
        }
        let conn = self.conns.get_mut(host)?;
        conn.write_all(request.as_bytes()).ok()?;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 2048];
        loop {
            if let Some((head, len)) = parse_head(&buf) {
                let len = len.ok()?;
                if buf.len() >= head + len {
                    let head = std::str::from_utf8(&buf[..head]).ok()?;
                    let status = head.split(' ').nth(1)?.parse().ok()?;
                    if head.to_ascii_lowercase().contains("connection: close") {
                        self.conns.remove(host);
                    }
                    return Some(status);
                }
            }
            if buf.len() > MAX_REQUEST {
                return None;
            }
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// A callback sink on a free port: answers every POST 200 and counts them.
    fn sink() -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    let mut conn = conn;
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 2048];
                    loop {
                        if let Some((head, Ok(len))) = parse_head(&buf) {
                            if buf.len() >= head + len {
                                buf.drain(..head + len);
                                c.fetch_add(1, Ordering::SeqCst);
                                let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
                                if conn.write_all(ok.as_bytes()).is_err() {
                                    return;
                                }
                                continue;
                            }
                        }
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (format!("http://{addr}/callback?attempt=1&token=t"), count)
    }

    fn connect(fleet: &LeanFleet, gpu: usize) -> TcpStream {
        TcpStream::connect(host_of(&fleet.urls()[gpu]).expect("addr")).expect("connect")
    }

    fn dispatch(conn: &mut TcpStream, task: &str, callback: &str) -> String {
        let body = format!(r#"{{"task_id":"{task}","callback_url":"{callback}","x":1}}"#);
        let req = format!(
            "POST /g0/transcribe HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes()).expect("write");
        let mut r = std::io::BufReader::new(conn.try_clone().expect("clone"));
        let mut status = String::new();
        r.read_line(&mut status).expect("status");
        let mut len = 0;
        loop {
            let mut l = String::new();
            r.read_line(&mut l).expect("header");
            if l == "\r\n" {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("length");
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).expect("body");
        format!("{} {}", status.trim(), String::from_utf8_lossy(&body))
    }

    #[test]
    fn callback_mode_accepts_then_calls_back_on_a_kept_alive_connection() {
        let (callback, count) = sink();
        let fleet = LeanFleet::start(1, 0, Completion::Callback, true).expect("fleet");
        let mut conn = connect(&fleet, 0);
        for i in 0..50 {
            let got = dispatch(&mut conn, &format!("t{i}"), &callback);
            assert!(got.starts_with("HTTP/1.1 202"), "{got}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while fleet.callbacks().0 < 50 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(fleet.callbacks(), (50, 0));
        assert_eq!(count.load(Ordering::SeqCst), 50);
        assert_eq!(fleet.received(0), 50);
        assert_eq!(fleet.max_running(0), 1);
        assert!(fleet.arrivals().contains_key("t49"));
        fleet.stop();
    }

    #[test]
    fn response_mode_answers_the_completion_and_refuses_a_bad_body() {
        let fleet = LeanFleet::start(2, 0, Completion::Response, false).expect("fleet");
        let mut conn = connect(&fleet, 1);
        let got = dispatch(&mut conn, "a", "http://127.0.0.1:1/cb");
        assert_eq!(
            got,
            r#"HTTP/1.1 200 OK {"task_id":"a","status":"finished"}"#
        );
        conn.write_all(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nnot")
            .expect("write");
        let mut r = std::io::BufReader::new(conn.try_clone().expect("clone"));
        let mut status = String::new();
        r.read_line(&mut status).expect("status");
        assert!(status.starts_with("HTTP/1.1 400"), "{status}");
        assert_eq!((fleet.received(1), fleet.received(0)), (1, 0));
        assert!(fleet.arrivals().is_empty());
        fleet.stop();
    }
}
