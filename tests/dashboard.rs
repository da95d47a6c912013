//! The dashboard in a real browser: headless Chromium, driven through chromedriver's W3C WebDriver
//! HTTP API with plain blocking calls, against a daemon and a fake fleet started in this process.
//! It proves what an operator sees (every GPU and slot, busy cells changing as tasks run, a drained
//! and an ejected GPU, queues, a failure with its error) and that the buttons act.
//!
//! Chromium and chromedriver (Debian packages `chromium`, `chromium-driver`) are installed by
//! `scripts/test.sh`; without them this test fails, saying so. `QSYS_DASHBOARD_PNG=docs/dashboard.png`
//! also writes the README's screenshot (taken while the fleet is busy).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use common::{free_port, stop, transcriptions, wait_for, TestEnv};
use fakefleet::{Fleet, FleetConfig};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
const TOKEN: &str = "dash-token-42";

/// One chromedriver process and one browser session; dropping it ends both.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
}

impl Browser {
    fn start(profile: &Path) -> Browser {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing (Debian package {package}): run `bash scripts/test.sh`, \
                 which installs it"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let mut b = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(60)))
                .build()
                .into(),
        };
        assert!(
            wait_for(Duration::from_secs(20), || b
                .call("GET", "/status", None)
                .is_ok_and(|v| v["ready"] == true)),
            "chromedriver did not become ready on port {port}"
        );
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1440,1000",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let v = b
            .call("POST", "/session", Some(caps))
            .unwrap_or_else(|e| panic!("new browser session: {e}"));
        b.session = v["sessionId"].as_str().expect("sessionId").to_string();
        b
    }

    /// One WebDriver command; its `value`, or the driver's error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let resp = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or(json!({})).to_string()),
        };
        let mut resp = resp.map_err(|e| e.to_string())?;
        let ok = resp.status().is_success();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if ok {
            Ok(v["value"].clone())
        } else {
            Err(format!("{} {}", v["value"]["error"], v["value"]["message"]))
        }
    }

    fn session(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.session("POST", "/url", Some(json!({ "url": url })))
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    fn js(&self, script: &str) -> Value {
        self.session(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
        .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }

    /// Clicks the element `css` selects, as a user would (WebDriver element click). The page
    /// refreshes every 1.5 s, so a reference that went stale is looked up again.
    fn click(&self, css: &str) {
        let mut last = String::new();
        for _ in 0..20 {
            let found = self.session(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            );
            let clicked = found.and_then(|v| {
                let id = v[ELEMENT].as_str().unwrap_or_default().to_string();
                self.session("POST", &format!("/element/{id}/click"), None)
            });
            match clicked {
                Ok(_) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("click {css}: {last}");
    }

    /// Types `text` into the element `css` selects.
    fn type_into(&self, css: &str, text: &str) {
        let v = self
            .session(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .unwrap_or_else(|e| panic!("find {css}: {e}"));
        let id = v[ELEMENT].as_str().unwrap_or_default();
        self.session(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    fn screenshot(&self) -> Vec<u8> {
        let b64 = self
            .session("GET", "/screenshot", None)
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().expect("base64 string"))
            .expect("valid base64")
    }

    /// Waits up to `secs` for `script` to return true; on timeout fails with the page's text and a
    /// screenshot left in the target directory.
    fn wait(&self, secs: u64, what: &str, script: &str) {
        // A script may fail while a page is being replaced: that is a "not yet".
        let body = json!({ "script": script, "args": [] });
        if wait_for(Duration::from_secs(secs), || {
            self.session("POST", "/execute/sync", Some(body.clone()))
                .is_ok_and(|v| v == Value::Bool(true))
        }) {
            return;
        }
        let shot = failure_png();
        let _ = std::fs::write(&shot, self.screenshot());
        let text = self.js("return document.body.innerText;");
        panic!(
            "dashboard: {what} not seen within {secs}s (screenshot {}); page:\n{}",
            shot.display(),
            text.as_str().unwrap_or_default()
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Ends Chromium too; chromedriver's own end would leave it running.
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn failure_png() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-failure.png")
}

/// `(status, body)` of a request to the admin listener.
fn admin(method: &str, url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let agent = qsys::http::agent();
    let resp = if method == "GET" {
        let mut r = agent.get(url);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.call()
    } else {
        let mut r = agent.post(url);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send_empty()
    };
    let mut r = resp.expect("admin request");
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

/// Task ids in busy cells, as the page shows them.
const BUSY_IDS: &str =
    "return [...document.querySelectorAll('#gpus .cell.busy .task')].map(e => e.textContent);";

#[test]
fn operator_sees_the_fleet_and_the_buttons_act() {
    let env = TestEnv::new("dash");
    let fleet = Fleet::start(FleetConfig {
        gpus: 6,
        delay: (Duration::from_millis(1500), Duration::from_millis(3500)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    // A handler that fails with markup in its error, for a task whose id is markup too: both must
    // show as text.
    let extra = r#"[retry]
backoff = "50ms"
[gpu]
eject_cooldown = "1m"
[types.start_transcribe]
handler = "gpu"
[types.render]
handler = "exec"
command = ["/bin/sh", "-c", "echo 'render failed: <img src=x onerror=alert(1)> & no template' >&2; exit 3"]
"#;
    let text = env
        .config_toml(fleet.urls(), extra)
        .replace("[admin]\n", &format!("[admin]\ntoken = \"{TOKEN}\"\n"));
    let daemon = env.start(&text);
    let base = format!("http://{}", daemon.admin_addr());

    // The page and its token, without a browser.
    let (code, body) = admin("GET", &format!("{base}/"), &[]);
    assert_eq!(code, 401);
    assert!(body.contains("name=\"token\""), "a login form: {body}");
    assert_eq!(admin("GET", &format!("{base}/?token=wrong"), &[]).0, 401);
    let (code, body) = admin("GET", &format!("{base}/?token={TOKEN}"), &[]);
    assert_eq!(code, 200);
    assert!(body.contains("<title>qsysd</title>"));
    assert_eq!(
        admin("GET", &format!("{base}/status?token={TOKEN}"), &[]).0,
        401,
        "a query-string token opens the page only"
    );

    let browser = Browser::start(&env.dir.join("chromium-profile"));
    browser.goto(&format!("{base}/?token={TOKEN}"));
    browser.wait(
        20,
        "6 GPUs of 4 free slots",
        "const g = document.querySelectorAll('#gpus .gpu');
         return g.length === 6 && [...g].every(x => x.querySelectorAll('.cell.free').length === 4);",
    );
    assert_eq!(
        browser.js("return [location.search, sessionStorage.getItem('qsysd.token')];"),
        json!(["", TOKEN]),
        "the token leaves the address bar and stays in the tab"
    );
    let q1 = env.queue("q1");
    browser.wait(
        10,
        "the queues",
        &format!("return document.getElementById('queues').textContent.includes({q1:?});"),
    );

    // A failure, shown as text.
    let hostile = "rep<b>1</b>";
    env.push_raw(
        "q1",
        &[json!({"type": "render", "max_attempts": 1, "data": {"task_id": hostile}}).to_string()],
    );
    browser.wait(
        20,
        "the failure",
        &format!(
            "const r = document.querySelector('#failures tr[data-task]');
             return !!r && r.textContent.includes({hostile:?})
                 && r.textContent.includes('<img src=x onerror=alert(1)> & no template');"
        ),
    );
    assert_eq!(
        browser.js("return document.querySelectorAll('#failures b, #failures img').length;"),
        json!(0),
        "no markup from task data"
    );

    // Drain g1 with its button.
    browser.click("[data-gpu=\"g1\"] button.drain");
    assert!(
        wait_for(Duration::from_secs(5), || daemon.slots()[1].drained),
        "the drain button drains g1"
    );
    browser.wait(
        10,
        "g1 drained",
        "const g = document.querySelector('[data-gpu=\"g1\"]');
         return g.dataset.health === 'drained' && g.querySelector('.gpu-foot button').textContent === 'undrain';",
    );

    // g5 goes away and gets ejected; the rest runs a backlog.
    fleet.vanish(5);
    env.push_raw("q1", &transcriptions("t", 120));
    browser.wait(
        20,
        "a busy fleet",
        "return document.querySelectorAll('#gpus .cell.busy').length >= 10;",
    );
    let first = browser.js(BUSY_IDS);
    browser.wait(
        20,
        "g5 ejected",
        "return document.querySelector('[data-gpu=\"g5\"]').dataset.health === 'ejected';",
    );
    browser.wait(
        20,
        "the grid changing as tasks run",
        &format!(
            "const before = new Set({first});
             const now = [...document.querySelectorAll('#gpus .cell.busy .task')].map(e => e.textContent);
             return now.length > 0 && now.some(id => !before.has(id));"
        ),
    );
    assert_eq!(
        browser.js("return document.querySelectorAll('[data-gpu=\"g1\"] .cell.busy').length;"),
        json!(0),
        "nothing new runs on the drained g1"
    );
    browser.wait(
        10,
        "a throughput rate",
        "return document.querySelectorAll('#spark polyline').length === 2
             && parseFloat(document.getElementById('rates').textContent) > 0;",
    );
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG screenshot");
    std::fs::write(
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png"),
        &png,
    )
    .expect("write screenshot");
    if let Ok(path) = std::env::var("QSYS_DASHBOARD_PNG") {
        std::fs::write(Path::new(env!("CARGO_MANIFEST_DIR")).join(path), &png)
            .expect("write QSYS_DASHBOARD_PNG");
    }

    // The failure's history, then requeue it with its button.
    browser.click("#failures tr[data-task] td.id a");
    browser.wait(
        10,
        "the task's history",
        "const d = document.getElementById('detail');
         return !d.hidden && document.getElementById('detail-body').textContent.includes('\"attempts\"');",
    );
    browser.click("#detail-close");
    browser.click("#failures tr[data-task] button.requeue");
    assert!(
        wait_for(Duration::from_secs(10), || {
            env.query::<u32>("SELECT requeues FROM tasks WHERE task_id = 'rep<b>1</b>'") == [1]
        }),
        "the requeue button requeues"
    );

    // Undrain, and the backlog finishes.
    browser.click("[data-gpu=\"g1\"] button.undrain");
    assert!(
        wait_for(Duration::from_secs(5), || !daemon.slots()[1].drained),
        "the undrain button undrains g1"
    );
    assert!(
        wait_for(Duration::from_secs(60), || env
            .count("task_id LIKE 't-%' AND state = 'finished'")
            == 120),
        "the backlog finishes; unfinished: {:?}",
        env.query::<(String, String, u32, Option<String>, Option<String>)>(
            "SELECT task_id, state, attempts, gpu_id, error FROM tasks \
             WHERE task_id LIKE 't-%' AND state <> 'finished'"
        )
    );

    // A reload reaches the login page (a browser sends no header when it opens a page), which
    // signs in again with the token the tab holds. A refused token is forgotten and the form asks.
    let dashboard = "return location.search === ''
        && document.querySelectorAll('#gpus .gpu').length === 6;";
    browser.goto(&format!("{base}/"));
    browser.wait(10, "the dashboard after a reload", dashboard);
    browser.js("sessionStorage.setItem('qsysd.token', 'wrong'); return null;");
    browser.goto(&format!("{base}/"));
    browser.wait(
        10,
        "the form after a refused token",
        "return document.getElementById('msg').textContent.includes('refused')
             && sessionStorage.getItem('qsysd.token') === null;",
    );
    browser.type_into("input[name=token]", TOKEN);
    browser.click("form button");
    browser.wait(10, "the dashboard after the form", dashboard);
    drop(browser);
    stop(daemon);
}

/// One raw request with a chosen `Host` (an HTTP client fills in the URL's own).
fn get_with_host(addr: std::net::SocketAddr, host: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
fn a_tokenless_listener_refuses_other_sites_and_names() {
    let env = TestEnv::new("dashhost");
    let daemon = env.start(&env.config_toml(&["http://127.0.0.1:9/".into()], ""));
    let addr = daemon.admin_addr();
    let port = addr.port();
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        assert!(get_with_host(addr, &host).contains(" 200 "), "{host}");
    }
    // A name of the attacker's that resolves here (DNS rebinding) must not read task data.
    assert!(get_with_host(addr, &format!("rebind.example:{port}")).contains(" 403 "));
    // Another site's page in the operator's browser cannot act; the dashboard itself can.
    let drain = format!("http://{addr}/gpus/g0/drain");
    let (code, _) = admin("POST", &drain, &[("Origin", "http://evil.example")]);
    assert_eq!(code, 403, "a cross-site POST");
    assert!(!daemon.slots()[0].drained);
    let own = format!("http://{addr}");
    assert_eq!(admin("POST", &drain, &[("Origin", &own)]).0, 200);
    assert!(daemon.slots()[0].drained);
    stop(daemon);
}
