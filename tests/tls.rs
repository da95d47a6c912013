//! TLS on both listeners: a certificate made here, clients that verify it, a renewal at reload,
//! and the config errors for half-set or unreadable TLS files.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// A self-signed certificate for `localhost` and `127.0.0.1`, written as PEM into `dir` under
/// `name`; the certificate's PEM is returned for the clients that trust it.
fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let pem = made.cert.pem();
    std::fs::write(&cert, &pem).expect("write cert");
    std::fs::write(&key, made.key_pair.serialize_pem()).expect("write key");
    (cert, key, pem)
}

/// A client that trusts only `pem`'s certificate.
fn trusting(pem: &str) -> ureq::Agent {
    qsys::http::agent_trusting(pem.as_bytes())
}

fn status(agent: &ureq::Agent, url: &str) -> Result<u16, String> {
    agent
        .get(url)
        .call()
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

fn with_tls(toml: &str, cert: &Path, key: &Path) -> String {
    let files = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    toml.replace("[callback]\n", &format!("[callback]\n{files}"))
        .replace("[admin]\n", &format!("[admin]\n{files}"))
}

#[test]
fn both_listeners_serve_tls_that_a_verifying_client_accepts_and_reload_renews() {
    let env = TestEnv::new("tls");
    let dir = tempdir("tls");
    let (cert, key, first) = certificate(&dir, "server");
    let fleet = silent_fleet(1);
    let toml = with_tls(&env.config_toml(fleet.urls(), ""), &cert, &key);
    let daemon = env.start(&toml);
    let callback = format!("https://127.0.0.1:{}", daemon.callback_addr().port());
    let admin = format!("https://127.0.0.1:{}", daemon.admin_addr().port());
    let client = trusting(&first);
    for base in [&callback, &admin] {
        assert_eq!(
            status(&client, &format!("{base}/healthz")),
            Ok(200),
            "{base}"
        );
        // A client that does not trust the certificate refuses the server.
        let untrusting = qsys::http::agent();
        let refused = status(&untrusting, &format!("{base}/healthz"));
        assert!(refused.is_err(), "{base}: {refused:?}");
        // Plain HTTP gets no HTTP answer from a TLS listener.
        let plain = format!("{}/healthz", base.replace("https://", "http://"));
        assert!(!matches!(status(&untrusting, &plain), Ok(200)), "{plain}");
    }
    // Clients that connect and never start a handshake hold no listener thread.
    let silent: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(daemon.callback_addr()).expect("connect"))
        .collect();
    assert_eq!(status(&client, &format!("{callback}/healthz")), Ok(200));
    drop(silent);
    // The admin API and `qsysd status`'s client over TLS.
    assert_eq!(status(&client, &format!("{admin}/status")), Ok(200));
    let (head, tail) = toml.split_once("[admin]\n").expect("an admin section");
    let at_admin = format!(
        "{head}[admin]\n{}",
        tail.replacen("127.0.0.1:0", &daemon.admin_addr().to_string(), 1)
    );
    let doc = qsys::ops::fetch_status(&env.config(&at_admin)).expect("qsysd status over tls");
    assert_eq!(doc["gpus"][0]["id"], "g0");

    // A genuine callback over HTTPS ends its task; the URL qsysd handed out says https.
    env.push_raw("q1", &transcriptions("tls", 1));
    assert!(wait_for(Duration::from_secs(20), || env
        .count("state = 'processing'")
        == 1));
    let target = callback_target("tls-0", 1);
    let reply = client
        .post(&format!("{callback}{target}"))
        .header("Content-Type", "application/json")
        .send(r#"{"task_id":"tls-0","status":"finished"}"#)
        .expect("callback");
    assert_eq!(reply.status().as_u16(), 200);
    assert!(wait_for(Duration::from_secs(10), || env
        .count("task_id = 'tls-0' AND state = 'finished'")
        == 1));

    // Renewal: new files at the same paths, then a reload. New handshakes present the new
    // certificate; a client that trusts only the old one is refused.
    let (_, _, second) = certificate(&dir, "server");
    daemon.apply_config(env.config(&toml));
    for base in [&callback, &admin] {
        let url = format!("{base}/healthz");
        assert_eq!(status(&trusting(&second), &url), Ok(200), "{base} renewed");
        assert!(
            status(&trusting(&first), &url).is_err(),
            "{base} old cert gone"
        );
    }
    // A renewal that cannot load leaves the certificate in use. (A reload reads the config
    // first, which refuses such files; a config read before they were spoiled gets as far.)
    let read_before = env.config(&toml);
    std::fs::write(&key, "not a key").expect("spoil key");
    daemon.apply_config(read_before);
    assert_eq!(
        status(&trusting(&second), &format!("{callback}/healthz")),
        Ok(200)
    );
    stop(daemon);
}

#[test]
fn a_client_that_trickles_its_handshake_is_cut_off() {
    use std::io::{Read, Write};
    let env = TestEnv::new("tlstrickle");
    let dir = tempdir("tlstrickle");
    let (cert, key, pem) = certificate(&dir, "server");
    let toml = with_tls(
        &env.config_toml(&["http://127.0.0.1:1/run".to_string()], ""),
        &cert,
        &key,
    );
    let daemon = env.start(&toml);
    let mut sock = std::net::TcpStream::connect(daemon.callback_addr()).expect("connect");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    // A TLS record header announcing a 16 KiB handshake message, then a byte every 500 ms:
    // each socket read gets something well within its timeout, so only a deadline on the whole
    // handshake ends it.
    sock.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00])
        .expect("header");
    let started = std::time::Instant::now();
    let cut = loop {
        if started.elapsed() > Duration::from_secs(30) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
        if sock.write_all(&[0]).is_err() {
            break true;
        }
        match sock.read(&mut [0; 64]) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
    };
    let took = started.elapsed();
    assert!(cut, "the trickling handshake was never cut off");
    // The listener's request deadline is 10 s (net::server::REQUEST_TIMEOUT).
    assert!(took < Duration::from_secs(16), "cut off after {took:?}");
    assert_eq!(
        status(
            &trusting(&pem),
            &format!(
                "https://127.0.0.1:{}/healthz",
                daemon.callback_addr().port()
            )
        ),
        Ok(200)
    );
    stop(daemon);
}

#[test]
fn half_set_or_unreadable_tls_files_are_config_errors_naming_the_key() {
    let env = TestEnv::new("tlscfg");
    let dir = tempdir("tlscfg");
    let (cert, key, _) = certificate(&dir, "a");
    let (_, other_key, _) = certificate(&dir, "b");
    let base = env.config_toml(&["http://127.0.0.1:1/run".to_string()], "");
    let err = |toml: String| {
        qsys::Config::from_toml(&toml, Path::new("t.toml"), &qsys::Env::new())
            .expect_err("refused")
            .to_string()
    };
    let only_cert = base.replace(
        "[admin]\n",
        &format!("[admin]\ntls_cert = \"{}\"\n", cert.display()),
    );
    assert!(err(only_cert).starts_with("admin.tls_cert = "), "half set");
    let missing = base.replace(
        "[callback]\n",
        "[callback]\ntls_cert = \"/nonexistent.crt\"\ntls_key = \"/nonexistent.key\"\n",
    );
    let e = err(missing);
    assert!(
        e.starts_with("callback.tls_cert = \"/nonexistent.crt\""),
        "{e}"
    );
    // A path to a device that never ends is refused, not read forever.
    let endless = with_tls(&base, Path::new("/dev/zero"), &key);
    let e = err(endless);
    assert!(e.starts_with("callback.tls_cert = \"/dev/zero\""), "{e}");
    assert!(e.contains("larger than"), "{e}");
    let mismatched = with_tls(&base, &cert, &other_key);
    let e = err(mismatched);
    assert!(
        e.starts_with("callback.tls_key = ") && e.contains("does not match"),
        "{e}"
    );
    // The pair that matches is accepted.
    env.config(&with_tls(&base, &cert, &key));
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qsys-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
