//! Hostile HTTP clients against a running daemon, over raw sockets, on both listeners: absurd,
//! negative and lying `Content-Length`s, endless header lines, too many headers, oversized and
//! broken chunked bodies, clients that trickle a byte at a time or stop sending, and hundreds of
//! kept-alive connections. Each gets a clear status or a closed connection; signed callbacks keep
//! being answered quickly the whole time; no thread dies (`stop` fails the test if one did).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{callback_target, daemon_awaiting_callbacks, stop, wait_for, TestEnv};
use fakefleet::{Fleet, FleetConfig};

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    s
}

/// Sends `raw` on a new connection and reads until the server closes it or `wait` passes.
fn exchange(addr: SocketAddr, raw: &[u8], wait: Duration) -> (String, bool) {
    let mut s = connect(addr);
    s.set_read_timeout(Some(wait)).expect("timeout");
    // The server may refuse (and close) before all of `raw` is written.
    let _ = s.write_all(raw);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A reset after the answer is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// The status code of the first response in `text`.
fn status(text: &str) -> u16 {
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"))
}

/// The cases every listener must answer the same way: (what, request head and body, status).
fn hostile_requests(path: &str) -> Vec<(&'static str, Vec<u8>, u16)> {
    let head = |extra: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n").into_bytes()
    };
    let mut cases = vec![
        (
            "u64::MAX content-length, no body",
            head("Content-Length: 18446744073709551615\r\n"),
            413,
        ),
        (
            "content-length beyond u64",
            head("Content-Length: 99999999999999999999999999\r\n"),
            413,
        ),
        (
            "content-length over the limit, no body",
            head("Content-Length: 200000\r\n"),
            413,
        ),
        (
            "negative content-length",
            head("Content-Length: -1\r\n"),
            400,
        ),
        (
            "content-length not a number",
            head("Content-Length: 12abc\r\n"),
            400,
        ),
        (
            "two content-lengths that disagree",
            head("Content-Length: 2\r\nContent-Length: 3\r\n"),
            400,
        ),
        (
            "unknown transfer coding",
            head("Transfer-Encoding: gzip\r\n"),
            400,
        ),
        ("too many headers", head(&"X-A: 1\r\n".repeat(200)), 431),
        (
            "one endless header line",
            format!(
                "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: {}",
                "a".repeat(1 << 20)
            )
            .into_bytes(),
            431,
        ),
        (
            "an endless request line",
            format!("POST {path}?{} HTTP/1.1\r\n\r\n", "a".repeat(1 << 20)).into_bytes(),
            414,
        ),
    ];
    // Upstream answered this through a writer that waited for itself: the thread hung for good.
    cases.push((
        "an HTTP/2.0 request line",
        format!("POST {path} HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n").into_bytes(),
        505,
    ));
    // A chunked body over the limit: refused without reading the rest.
    let mut chunked = head("Transfer-Encoding: chunked\r\n");
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n{}\r\n", 8192, "b".repeat(8192)).as_bytes());
    }
    cases.push(("chunked body over the limit", chunked, 413));
    let mut broken = head("Transfer-Encoding: chunked\r\n");
    broken.extend_from_slice(b"zz\r\nnot a chunk\r\n");
    cases.push(("broken chunked body", broken, 400));
    cases
}

/// Posts the genuine `finished` callback for `task_id` attempt 1; returns status and latency.
fn signed_callback(addr: SocketAddr, task_id: &str) -> (u16, Duration) {
    let path = callback_target(task_id, 1);
    let body = format!(r#"{{"task_id":"{task_id}","status":"finished"}}"#);
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let started = Instant::now();
    let (text, _) = exchange(addr, req.as_bytes(), Duration::from_secs(10));
    (status(&text), started.elapsed())
}

#[test]
fn hostile_requests_get_a_clear_status_on_both_listeners() {
    let env = TestEnv::new("hostile");
    let (daemon, _fleet) = daemon_awaiting_callbacks(&env, "hr", 2, 4);
    for (addr, path) in [
        (daemon.callback_addr(), "/callback?attempt=1&token=00"),
        (daemon.admin_addr(), "/gpus/g0/drain"),
    ] {
        for (what, raw, want) in hostile_requests(path) {
            let started = Instant::now();
            let (text, closed) = exchange(addr, &raw, Duration::from_secs(15));
            assert_eq!(status(&text), want, "{what} on {path}: {text:?}");
            assert!(closed, "{what} on {path}: the connection must close");
            // Refused at once: nothing waits for a body that never comes.
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{what} on {path} took {:?}",
                started.elapsed()
            );
        }
    }
    // Nothing of it reached a task, and qsysd still does its job.
    assert_eq!(env.count("state = 'processing'"), 2);
    assert_eq!(signed_callback(daemon.callback_addr(), "hr-0").0, 200);
    assert!(wait_for(Duration::from_secs(5), || env
        .count("state = 'finished'")
        == 1));
    // The drains above were refused, so no GPU is drained.
    let drained: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_state WHERE drained = 1");
    assert_eq!(drained, vec![0]);
    stop(daemon);
}

#[test]
fn slow_and_silent_clients_never_hold_a_callback() {
    let env = TestEnv::new("slowcl");
    let (daemon, _fleet) = daemon_awaiting_callbacks(&env, "sc", 8, 4);
    let addr = daemon.callback_addr();
    let done = Arc::new(AtomicBool::new(false));
    let mut tricklers = Vec::new();
    // 32 trickle their headers and 32 their bodies, one byte every 50 ms.
    for i in 0..64 {
        let done = done.clone();
        tricklers.push(std::thread::spawn(move || {
            let mut s = connect(addr);
            let body = "{\"task_id\":\"sc-0\",\"status\":\"finished\"}".repeat(20);
            let raw = if i % 2 == 0 {
                format!(
                    "POST /callback HTTP/1.1\r\nHost: x\r\nX-Slow: {}\r\n",
                    "s".repeat(400)
                )
            } else {
                format!(
                    "POST /callback HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len() + 1000
                )
            };
            for b in raw.bytes() {
                if done.load(Ordering::Relaxed) || s.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }));
    }
    // And one declares a body, sends part of it and goes silent.
    let mut silent = connect(addr);
    silent
        .write_all(
            b"POST /callback HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"task_id\"",
        )
        .expect("write");
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..8 {
        let (code, took) = signed_callback(addr, &format!("sc-{i}"));
        assert_eq!(code, 200, "callback sc-{i}");
        assert!(
            took < Duration::from_secs(1),
            "callback sc-{i} took {took:?} beside 64 slow clients"
        );
    }
    assert!(wait_for(Duration::from_secs(5), || env
        .count("state = 'finished'")
        == 8));
    // The silent client is answered 408 and closed once its request time is up.
    let mut got = Vec::new();
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let started = Instant::now();
    let _ = silent.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "silent client got {text:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(45));
    done.store(true, Ordering::Relaxed);
    for t in tricklers {
        t.join().expect("trickler");
    }
    stop(daemon);
}

/// Issue 20: kept-alive callback clients, reused, with new ones arriving all the time. Every
/// request must be read and answered (a connection queued behind a busy thread was never read).
#[test]
fn every_kept_alive_callback_is_read_and_answered() {
    let env = TestEnv::new("keepalive");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&env.config_toml(fleet.urls(), ""));
    let addr = daemon.callback_addr();
    let answered = Arc::new(AtomicUsize::new(0));
    const CONNECTIONS: usize = 200;
    const PER_CONNECTION: usize = 10;
    let body = r#"{"task_id":"nobody","status":"finished"}"#;
    let request = format!(
        "POST /callback?attempt=1&token=00 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|i| {
            let answered = answered.clone();
            let request = request.clone();
            std::thread::spawn(move || {
                // Staggered, so connections keep arriving while others are busy.
                std::thread::sleep(Duration::from_millis((i % 50) as u64 * 10));
                let mut s = connect(addr);
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("timeout");
                let mut reader = std::io::BufReader::new(s.try_clone().expect("clone"));
                for n in 0..PER_CONNECTION {
                    s.write_all(request.as_bytes()).expect("write");
                    let len = read_response(&mut reader)
                        .unwrap_or_else(|e| panic!("connection {i} request {n}: {e}"));
                    assert!(len > 0);
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().expect("client");
    }
    let sent = CONNECTIONS * PER_CONNECTION;
    assert_eq!(answered.load(Ordering::Relaxed), sent);
    // qsysd's own count: every one read, judged and counted.
    let metrics = ureq_get(&format!("http://{}/metrics", daemon.admin_addr()));
    let unauthorized = metrics
        .lines()
        .find(|l| l.starts_with("qsys_callbacks_total{result=\"unauthorized\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert_eq!(unauthorized as usize, sent, "{metrics}");
    stop(daemon);
}

/// Reads one HTTP response with a `Content-Length` body; returns the body's length.
fn read_response(r: &mut impl std::io::BufRead) -> Result<usize, String> {
    let mut line = String::new();
    let mut len = 0;
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return Err("closed before the answer".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("no answer: {e}")),
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some(v) = l
            .to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().to_string())
        {
            len = v.parse().map_err(|_| format!("bad length {v}"))?;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    Ok(len)
}

fn ureq_get(url: &str) -> String {
    let mut r = qsys::http::agent().get(url).call().expect("get");
    r.body_mut().read_to_string().expect("body")
}
