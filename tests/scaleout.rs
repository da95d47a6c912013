//! Several qsysd instances on one Redis and one MySQL: fleet-wide slots, callbacks that land on
//! any instance, freed slots seen everywhere within 100 ms, and failover when one is killed.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, silent_fleet, stop, transcriptions, wait_for, TestEnv, SECRET};
use fakefleet::{Fleet, FleetConfig};
use qsys::Secret;
use qsys::Signer;

/// Config of instance `i` of `n`: its own callback port, and a public callback URL that points at
/// the NEXT instance, so every callback lands on the wrong instance on purpose.
fn instance_config(env: &TestEnv, urls: &[String], ports: &[u16], i: usize, extra: &str) -> String {
    let next = ports[(i + 1) % ports.len()];
    env.config_toml(urls, extra)
        .replace(
            "[callback]\nlisten = \"127.0.0.1:0\"",
            &format!(
                "[callback]\nlisten = \"127.0.0.1:{}\"\npublic_url = \"http://127.0.0.1:{next}/callback\"",
                ports[i]
            ),
        )
        .replace("instance_id = \"test\"", &format!("instance_id = \"inst-{i}\""))
}

/// Short leases and a large attempt budget: the callbacks a killed or stopped instance's port
/// loses come back through leases within the test's patience, without failing their tasks.
const LOST_CALLBACKS: &str =
    "[gpu]\ntask_timeout = \"3s\"\n[retry]\nmax_attempts = 10\nbackoff = \"50ms\"\n";

/// Configs of three instances whose callbacks come to themselves: a dead or stopped instance's
/// port then loses the callbacks of its own attempts only, which their leases bring back.
/// `daemon` goes into each `[daemon]` table.
fn self_called_configs(env: &TestEnv, urls: &[String], extra: &str, daemon: &str) -> Vec<String> {
    (0..3)
        .map(|i| {
            instance_config(env, urls, &[free_port()], 0, extra)
                .replace(
                    "instance_id = \"inst-0\"",
                    &format!("instance_id = \"inst-{i}\""),
                )
                .replace("[daemon]", &format!("[daemon]\n{daemon}"))
        })
        .collect()
}

/// Writes each config, starts the `qsysd` binary on it and waits until each has started: the
/// children with their logs. A child is killed when dropped, so a failing test leaves none running.
fn spawn_instances(
    env: &TestEnv,
    configs: &[String],
) -> Vec<(common::Spawned, std::path::PathBuf)> {
    let children: Vec<_> = configs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let cfg = env.dir.join(format!("qsysd-{i}.toml"));
            std::fs::write(&cfg, text).expect("config");
            let log = env.dir.join(format!("qsysd-{i}.log"));
            (common::Spawned(common::spawn_qsysd(&cfg, &log, &[])), log)
        })
        .collect();
    for (_, log) in &children {
        assert!(common::wait_log(
            log,
            "qsysd starting",
            Duration::from_secs(20)
        ));
    }
    children
}

/// No GPU ran more than its 4 slots, and no task ran twice at once (below).
fn assert_fleet_respected(env: &TestEnv, fleet: &Fleet) {
    for g in 0..4 {
        let max = fleet.stats().max_running(g);
        assert!(max <= 4, "gpu {g} ran {max}");
    }
    assert_no_task_ran_twice_at_once(env, fleet);
}

/// qsysd never has two live attempts of one task: in its own records no two attempts of a task
/// overlap in time. The GPUs may still see a task twice at once, but only after qsysd gave up on an
/// attempt (a dispatch that timed out under load may still run on the GPU: at-least-once), so every
/// overlap the fake fleet saw must follow a failed or expired attempt.
fn assert_no_task_ran_twice_at_once(env: &TestEnv, fleet: &Fleet) {
    let overlapping: Vec<(String, u32, u32)> = env.query(
        "SELECT a.task_id, a.attempt, b.attempt FROM task_attempts a JOIN task_attempts b \
         ON a.task_id = b.task_id AND a.attempt < b.attempt AND b.started_at < a.ended_at",
    );
    assert!(
        overlapping.is_empty(),
        "qsysd ran attempts at once: {overlapping:?}"
    );
    for id in fleet.stats().overlapped() {
        let abandoned: Vec<u64> = env.query(&format!(
            "SELECT COUNT(*) FROM task_attempts WHERE task_id = '{id}' \
             AND outcome IN ('failed', 'expired')"
        ));
        assert!(
            abandoned[0] > 0,
            "{id} ran twice at once with no abandoned attempt"
        );
    }
}

#[test]
fn three_instances_share_the_fleet_and_callbacks_land_anywhere() {
    let env = TestEnv::new("scale3");
    let fleet = Fleet::start(FleetConfig::default()).expect("fleet");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let daemons: Vec<_> = (0..3)
        .map(|i| env.start(&instance_config(&env, fleet.urls(), &ports, i, "")))
        .collect();
    env.push_raw("q1", &transcriptions("s3", 1000));
    assert!(
        wait_for(Duration::from_secs(120), || env.count("state = 'finished'")
            == 1000),
        "{:?}",
        env.states()
    );
    assert_fleet_respected(&env, &fleet);
    let by_instance: Vec<(String, u64)> = env.query(
        "SELECT instance_id, COUNT(*) FROM task_attempts GROUP BY instance_id ORDER BY instance_id",
    );
    // Every instance dispatched, and every instance applied callbacks meant for another.
    assert_eq!(by_instance.len(), 3, "{by_instance:?}");
    for d in &daemons {
        assert!(d.callbacks_applied() > 0);
    }
    let held: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_slots WHERE task_id IS NOT NULL");
    assert_eq!(held[0], 0);
    for d in daemons {
        assert_eq!(d.busy_slots(), 0, "every mirror saw every slot freed");
        stop(d);
    }
}

#[test]
fn a_freed_slot_reaches_the_other_instance_within_100ms() {
    let env = TestEnv::new("slotsync");
    // One slot, and the GPU never calls back: this test delivers the callback itself.
    let fleet = silent_fleet(1);
    let extra = "[gpu]\nslots = 1\n";
    let a = env.start(
        &env.config_toml(fleet.urls(), extra)
            .replace("\"test\"", "\"inst-a\""),
    );
    let b = env.start(
        &env.config_toml(fleet.urls(), extra)
            .replace("\"test\"", "\"inst-b\""),
    );
    // An instance counts itself alone (and publishes nothing) until its once-a-second check
    // finds the other: what is measured here is the latency between instances that know of each
    // other, so both must first have looked. (Started a moment apart, `a` could still think
    // itself alone when the callback reached it: its free then came by the 2 s resync.)
    std::thread::sleep(Duration::from_millis(1500));
    assert!(wait_for(Duration::from_secs(5), || a.sees_peers() && b.sees_peers()));
    env.push_raw("q1", &transcriptions("one", 1));
    assert!(wait_for(Duration::from_secs(20), || {
        fleet.stats().body("one-0").is_some()
    }));
    // Both mirrors show the slot busy (one claimed it, the other heard of it).
    assert!(wait_for(Duration::from_secs(2), || {
        a.busy_slots() == 1 && b.busy_slots() == 1
    }));
    let claimer_is_a: Vec<String> =
        env.query("SELECT instance_id FROM gpu_slots WHERE task_id = 'one-0'");
    let (claimer, other) = if claimer_is_a[0] == "inst-a" {
        (&a, &b)
    } else {
        (&b, &a)
    };
    // The callback goes to the instance that did not dispatch.
    let signer = Signer::new(Secret::new(SECRET), "http://unused/callback");
    let url = signer.callback_url("one-0", 1);
    let target = format!(
        "http://{}{}",
        other.callback_addr(),
        &url[url.find("/callback").expect("path")..]
    );
    let reply = qsys::http::post_json(
        &qsys::http::agent(),
        &target,
        None,
        r#"{"task_id":"one-0","status":"finished"}"#,
        Duration::from_secs(2),
        Duration::from_secs(5),
    )
    .expect("callback");
    let applied = Instant::now();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(wait_for(Duration::from_secs(2), || claimer.busy_slots() == 0));
    let took = applied.elapsed();
    assert!(
        took < Duration::from_millis(100),
        "the claimer learned of the free slot after {took:?}"
    );
    eprintln!("freed slot seen by the other instance after {took:?}");
    stop(a);
    stop(b);
}

#[test]
fn a_killed_instance_is_recovered_by_the_others() {
    let env = TestEnv::new("failover");
    let fleet = Fleet::start(FleetConfig {
        delay: (Duration::from_millis(20), Duration::from_millis(60)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let configs = self_called_configs(
        &env,
        fleet.urls(),
        LOST_CALLBACKS,
        "instance_timeout = \"2s\"",
    );
    let mut children = spawn_instances(&env, &configs);
    env.push_raw("q1", &transcriptions("fo", 1000));
    assert!(wait_for(Duration::from_secs(30), || env
        .count("state = 'finished'")
        >= 200));
    // kill -9 one instance mid-run.
    let (mut victim, _) = children.remove(1);
    victim.0.kill().expect("kill -9");
    victim.0.wait().expect("reap");
    let killed_at = env.count("state = 'finished'");
    assert!(
        wait_for(Duration::from_secs(120), || env.count("state = 'finished'")
            == 1000),
        "{:?} (killed at {killed_at} finished)",
        env.states()
    );
    assert_fleet_respected(&env, &fleet);
    let held: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_slots WHERE task_id IS NOT NULL");
    assert_eq!(held[0], 0, "the dead instance's slots were freed");
    assert_eq!(env.llen("q1"), 0);
    for (mut c, _) in children {
        c.sigterm();
    }
}

/// Graceful stops while peers are live (issue 14): three instances share 1,000 tasks; two of them
/// are stopped with SIGTERM mid-run, one after the other, while the fleet is full, so each hands
/// back what it holds to peers that are popping the same queue. Every task finishes, the fleet is
/// respected, no slot leaks and each stop exits 0.
#[test]
fn graceful_stops_beside_live_peers_lose_nothing() {
    let env = TestEnv::new("gracefulsc");
    let fleet = Fleet::start(FleetConfig {
        delay: (Duration::from_millis(30), Duration::from_millis(90)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let configs = self_called_configs(&env, fleet.urls(), LOST_CALLBACKS, "");
    let mut children = spawn_instances(&env, &configs);
    env.push_raw("q1", &transcriptions("gs", 1000));
    for stop_at in [200, 500] {
        assert!(
            wait_for(Duration::from_secs(60), || env.count("state = 'finished'")
                >= stop_at),
            "{:?} {:?}; logs: {:?}",
            env.states(),
            env.query::<(String, String)>(
                "SELECT task_id, COALESCE(error, '') FROM tasks WHERE state = 'failed' LIMIT 3"
            ),
            children
                .iter()
                .map(|(_, log)| std::fs::read_to_string(log).unwrap_or_default())
                .collect::<Vec<_>>()
        );
        let (mut c, log) = children.remove(0);
        let status = c.sigterm();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "stop exited {status:?}: {text}");
    }
    assert!(
        wait_for(Duration::from_secs(120), || env.count("state = 'finished'")
            == 1000),
        "{:?}",
        env.states()
    );
    assert_fleet_respected(&env, &fleet);
    let held: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_slots WHERE task_id IS NOT NULL");
    assert_eq!(held[0], 0);
    assert_eq!(env.llen("q1"), 0);
    for (mut c, _) in children {
        c.sigterm();
    }
}

/// Alone, an instance publishes no slot events (nobody would read them); once a second instance
/// is live it does, starting with every slot it holds.
#[test]
fn slot_events_flow_only_when_another_instance_listens() {
    let env = TestEnv::new("peers");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        delay: (Duration::from_secs(2), Duration::from_secs(2)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let mut sub = env.redis_conn();
    sub.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut sub = sub.as_pubsub();
    sub.subscribe(format!("{}slots", env.prefix))
        .expect("subscribe");
    let heard = |sub: &mut redis::PubSub<'_>, within: Duration| {
        let until = Instant::now() + within;
        let mut n = 0;
        while Instant::now() < until {
            if sub.get_message().is_ok() {
                n += 1;
            }
        }
        n
    };
    let config = |i: &str| {
        env.config_toml(fleet.urls(), "")
            .replace("\"test\"", &format!("\"{i}\""))
    };
    let a = env.start(&config("inst-a"));
    // Let the first check of peers pass, then run tasks alone.
    std::thread::sleep(Duration::from_millis(300));
    env.push_raw("q1", &transcriptions("alone", 4));
    assert_eq!(
        heard(&mut sub, Duration::from_secs(2)),
        0,
        "events while alone"
    );
    // They take the fleet's 2 s and then a callback: allow a loaded machine its time.
    assert!(wait_for(Duration::from_secs(10), || env
        .count("task_id LIKE 'alone-%' AND state = 'finished'")
        == 4));
    // Tasks running on A when B appears: A publishes what it holds once it notices B.
    env.push_raw("q1", &transcriptions("held", 8));
    assert!(wait_for(Duration::from_secs(5), || a.busy_slots() > 0));
    let b = env.start(&config("inst-b"));
    assert!(
        heard(&mut sub, Duration::from_secs(3)) > 0,
        "no events with a peer"
    );
    assert!(wait_for(Duration::from_secs(20), || env
        .count("task_id LIKE 'held-%' AND state = 'finished'")
        == 8));
    stop(a);
    stop(b);
}

/// Anyone who can PUBLISH on the slot channel sends garbage: huge slots, unknown GPUs, huge
/// strings, wrong types, this instance's own id, deep nesting, floods. The daemon ignores all of
/// it, names each sender once in its log, still applies the good events of a mixed message, and
/// keeps finishing tasks.
#[test]
fn forged_slot_events_neither_kill_nor_confuse_an_instance() {
    let env = TestEnv::new("forged");
    let fleet = Fleet::start(FleetConfig {
        gpus: 2,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let admin = format!("127.0.0.1:{}", free_port());
    let text = env
        .config_toml(fleet.urls(), "")
        .replacen(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"{admin}\""),
            1,
        )
        .replace("[daemon]", "[daemon]\nlog_target = \"stderr\"");
    let cfg = env.dir.join("qsysd.toml");
    std::fs::write(&cfg, text).expect("config");
    let log = env.dir.join("qsysd.log");
    let mut child = common::Spawned(common::spawn_qsysd(&cfg, &log, &[]));
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        common::wait_log(&log, "qsysd starting", Duration::from_secs(20)),
        "{}",
        read_log()
    );
    let channel = format!("{}slots", env.prefix);
    let mut redis = env.redis_conn();
    let mut publish = |payload: &[u8]| -> usize {
        redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query(&mut redis)
            .expect("publish")
    };
    assert!(
        wait_for(Duration::from_secs(10), || publish(b"[]") == 1),
        "the daemon never subscribed"
    );

    let event = |instance: &str, gpu: &str, slot: &str, task_id: &str| {
        format!(
            r#"{{"instance": "{instance}", "claimed": true, "gpu": "{gpu}", "slot": {slot}, "task_id": "{task_id}", "attempt": 1}}"#
        )
    };
    let deep = "[".repeat(500_000) + &"]".repeat(500_000);
    let forged: Vec<Vec<u8>> = vec![
        // The one that used to kill every instance: a single event, as old instances sent them.
        event("evil-slot", "g0", "18446744073709551615", "t").into_bytes(),
        format!("[{}]", event("evil-slot", "g0", "4", "t")).into_bytes(),
        event("evil-gpu", "g9", "0", "t").into_bytes(),
        event("evil-long", &"g".repeat(100_000), "0", "t").into_bytes(),
        event("evil-long", "g0", "0", &"t".repeat(1_000_000)).into_bytes(),
        event(&"i".repeat(100_000), "g0", "0", "t").into_bytes(),
        br#"{"instance": "evil-types", "claimed": "yes", "gpu": 0, "slot": -1, "task_id": {}, "attempt": 1.5}"#.to_vec(),
        br#"[42, null, "x", [], {}, {"instance": 7}]"#.to_vec(),
        deep.clone().into_bytes(),
        format!(r#"{{"instance": "evil-deep", "x": {deep}}}"#).into_bytes(),
        format!("[{}]", vec![event("evil-many", "g0", "0", "t"); 5000].join(",")).into_bytes(),
        vec![b' '; 3 << 20],
        b"not json \xff\xfe".to_vec(),
    ];
    for _ in 0..3 {
        for payload in &forged {
            assert_eq!(publish(payload), 1, "the daemon is still subscribed");
        }
    }
    // A message mixing garbage, this instance's own id (an echo to skip), and one good event of a
    // peer: the good one applies.
    let mixed = format!(
        "[{}, {}, {}, {}]",
        event("evil-mixed", "g0", "99", "t"),
        r#"{"instance": "evil-mixed", "slot": "zero"}"#,
        event("test", "g0", "2", "echo-task"),
        event("peer", "g0", "3", "peer-task"),
    );
    assert_eq!(publish(mixed.as_bytes()), 1);
    let admin_status = || -> serde_json::Value {
        let body = qsys::http::agent()
            .get(format!("http://{admin}/status"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default();
        serde_json::from_str(&body).unwrap_or_default()
    };
    // The peer's hold lasts until the resync finds it is not in MySQL, 2 s after it was applied
    // at the earliest; it may be applied late, behind the forged messages still being read (3 MiB,
    // 5,000 events) when the suite loads the machine, so the wait is long and the poll fast.
    let cell = |s: &serde_json::Value, slot: usize| s["gpus"][0]["cells"][slot]["task_id"].clone();
    assert!(
        wait_for(Duration::from_secs(15), || cell(&admin_status(), 3)
            == "peer-task"),
        "the good event of the mixed message was not applied: {}",
        admin_status()
    );
    assert_eq!(
        cell(&admin_status(), 2),
        serde_json::Value::Null,
        "own echo applied"
    );
    assert_eq!(
        admin_status()["gpus"][0]["cells"].as_array().map(Vec::len),
        Some(4),
        "no slot was added"
    );

    env.push_raw("q1", &transcriptions("after", 40));
    assert!(
        wait_for(Duration::from_secs(60), || env.count("state = 'finished'")
            == 40),
        "{:?}\n{}",
        env.states(),
        read_log()
    );
    assert!(
        child.0.try_wait().expect("try_wait").is_none(),
        "qsysd died: {}",
        read_log()
    );
    let metrics = qsys::http::agent()
        .get(format!("http://{admin}/metrics"))
        .call()
        .expect("metrics")
        .body_mut()
        .read_to_string()
        .expect("metrics body");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("qsys_errors_total{kind=\"slot_event\"} "))
        .and_then(|n| n.parse().ok())
        .expect("slot_event errors counted");
    assert!(refused >= 3 * forged.len() as u64, "{refused}");
    // SIGTERM: a clean exit, so no thread died on the way.
    let status = child.sigterm();
    let text = read_log();
    assert!(status.success(), "{status:?}\n{text}");
    assert!(!text.contains("panicked"), "{text}");
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("invalid slot event ignored"))
        .collect();
    for sender in [
        "evil-slot",
        "evil-gpu",
        "evil-long",
        "evil-types",
        "evil-deep",
        "evil-mixed",
    ] {
        let n = warnings
            .iter()
            .filter(|l| l.contains(&format!("sender={sender} ")))
            .count();
        assert_eq!(n, 1, "{sender} named {n} times:\n{}", warnings.join("\n"));
    }
    // The named senders above, the 100,000-byte one (cut short), and "unknown" for the rest.
    assert_eq!(warnings.len(), 8, "{}", warnings.join("\n"));
    assert!(warnings.iter().all(|l| l.len() < 1000), "a huge log line");
}
