//! Cancel (issue 16) in every state a task can be in: still in Redis, `pending`, running on a
//! GPU with and without a `cancel_url` (confirmed, refused, never asked), running in an `exec`
//! or `http` handler; and a GPU never runs more than its slots while cancels free them.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{call, callback_target, silent_fleet, stop, transcriptions, wait_for, TestEnv};
use fakefleet::{CancelMode, Completion, Fleet, FleetConfig};
use qsys::{ops, Cancel, State};

const QSYSD: &str = env!("CARGO_BIN_EXE_qsysd");

fn finished(id: &str) -> String {
    format!(r#"{{"task_id":"{id}","status":"finished"}}"#)
}

fn state(env: &TestEnv, id: &str) -> Option<String> {
    env.task(id).map(|t| t.0)
}

fn waits_for_state(env: &TestEnv, id: &str, want: &str, within: Duration) -> bool {
    wait_for(within, || state(env, id).as_deref() == Some(want))
}

fn outcome_of(env: &TestEnv, id: &str, attempt: u32) -> Option<String> {
    env.query::<String>(&format!(
        "SELECT outcome FROM task_attempts WHERE task_id = '{id}' AND attempt = {attempt}"
    ))
    .pop()
}

/// A fleet of one GPU on which every task runs for a minute unless stopped.
fn long_fleet(cancel: CancelMode) -> Fleet {
    Fleet::start(FleetConfig {
        gpus: 1,
        delay: (Duration::from_secs(60), Duration::from_secs(60)),
        cancel,
        ..FleetConfig::default()
    })
    .expect("fleet")
}

#[test]
fn a_task_cancelled_while_still_in_redis_never_runs_and_can_be_requeued() {
    let env = TestEnv::new("cancelredis");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let toml = env.config_toml(fleet.urls(), "");
    // Pushed while no qsysd runs: the elements wait in Redis.
    env.push_raw("q1", &transcriptions("early", 3));
    let store = ops::store(&env.config(&toml)).expect("store");
    assert_eq!(
        ops::cancel(&store, "early-1", Some("wrong file")).expect("cancel"),
        Cancel::Cancelled { was: None }
    );
    assert!(matches!(
        ops::cancel(&store, "early-1", None).expect("cancel"),
        Cancel::Terminal { state } if state == "cancelled"
    ));
    let daemon = env.start(&toml);
    assert!(wait_for(Duration::from_secs(20), || {
        env.count("state = 'finished'") == 2 && env.llen("q1") == 0
    }));
    assert!(
        fleet.stats().body("early-1").is_none(),
        "a cancelled task ran"
    );
    let (s, error) = env.task("early-1").expect("row");
    assert_eq!(s, "cancelled");
    assert_eq!(error.as_deref(), Some("cancelled: wrong file"));
    // The element, when taken, gave the row its message: a requeue runs it.
    assert_eq!(
        env.count("task_id = 'early-1' AND payload IS NOT NULL AND queue IS NOT NULL"),
        1
    );
    assert!(ops::requeue(&store, &env.redis_client(), "early-1").expect("requeue"));
    assert!(waits_for_state(
        &env,
        "early-1",
        "finished",
        Duration::from_secs(20)
    ));
    assert!(fleet.stats().body("early-1").is_some());
    stop(daemon);
}

#[test]
fn a_pending_task_cancelled_never_runs() {
    let env = TestEnv::new("cancelpending");
    // Accepts every task and never calls back: the test's callbacks end them.
    let fleet = silent_fleet(1);
    let daemon = env.start(&env.config_toml(fleet.urls(), "[gpu]\nslots = 1\n"));
    let tasks = transcriptions("pend", 3);
    env.push_raw("q1", &tasks[..2]);
    assert!(waits_for_state(
        &env,
        "pend-0",
        "processing",
        Duration::from_secs(20)
    ));
    assert!(waits_for_state(
        &env,
        "pend-1",
        "pending",
        Duration::from_secs(20)
    ));
    let (code, body) = call(daemon.admin_addr(), "POST", "/tasks/pend-1/cancel", "");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""was":"pending""#), "{body}");
    // The slot frees; the next task takes it, the cancelled one never does.
    let cb = call(
        daemon.callback_addr(),
        "POST",
        &callback_target("pend-0", 1),
        &finished("pend-0"),
    );
    assert_eq!(cb.0, 200, "{}", cb.1);
    env.push_raw("q1", &tasks[2..]);
    assert!(waits_for_state(
        &env,
        "pend-2",
        "processing",
        Duration::from_secs(20)
    ));
    assert!(
        fleet.stats().body("pend-1").is_none(),
        "a cancelled task ran"
    );
    assert_eq!(state(&env, "pend-1").as_deref(), Some("cancelled"));
    assert_eq!(env.count("task_id = 'pend-1' AND attempts = 0"), 1);
    stop(daemon);
}

/// With a `cancel_url` the GPU is asked to stop; its 200 ends the attempt and frees the slot,
/// which the next task takes. A late callback changes nothing.
#[test]
fn a_running_gpu_task_stops_when_its_gpu_confirms_the_cancel() {
    let env = TestEnv::new("cancelgpu");
    let fleet = long_fleet(CancelMode::Stop);
    let extra = format!(
        "[gpu]\nslots = 1\ncancel_url = \"{}\"\n",
        fleet.cancel_url(0)
    );
    let daemon = env.start(&env.config_toml(fleet.urls(), &extra));
    env.push_raw("q1", &transcriptions("run", 2));
    assert!(wait_for(Duration::from_secs(20), || fleet
        .stats()
        .running(0)
        == 1));
    let asked = Instant::now();
    let (code, body) = call(
        daemon.admin_addr(),
        "POST",
        "/tasks/run-0/cancel",
        r#"{"reason":"customer withdrew"}"#,
    );
    assert_eq!(code, 202, "{body}");
    assert!(waits_for_state(
        &env,
        "run-0",
        "cancelled",
        Duration::from_secs(5)
    ));
    println!("cancel to cancelled: {:?}", asked.elapsed());
    assert_eq!(fleet.stats().cancels(), [("run-0".to_string(), 1, 200)]);
    assert_eq!(outcome_of(&env, "run-0", 1).as_deref(), Some("cancelled"));
    let (_, error) = env.task("run-0").expect("row");
    assert_eq!(error.as_deref(), Some("cancelled: customer withdrew"));
    // The freed slot goes to the next task; never two at once on a one-slot GPU.
    assert!(wait_for(Duration::from_secs(10), || {
        fleet.stats().body("run-1").is_some()
    }));
    assert_eq!(fleet.stats().max_running(0), 1);
    // A callback after the cancel: 409, and the task stays cancelled.
    let late = call(
        daemon.callback_addr(),
        "POST",
        &callback_target("run-0", 1),
        &finished("run-0"),
    );
    assert_eq!(late.0, 409, "{}", late.1);
    let confirm = call(
        daemon.callback_addr(),
        "POST",
        &callback_target("run-0", 1),
        r#"{"task_id":"run-0","status":"cancelled"}"#,
    );
    assert_eq!(confirm.0, 200, "{}", confirm.1);
    assert!(confirm.1.contains("duplicate"), "{}", confirm.1);
    assert_eq!(state(&env, "run-0").as_deref(), Some("cancelled"));
    // Cancelling it again, or a finished task, changes nothing.
    assert_eq!(
        call(daemon.admin_addr(), "POST", "/tasks/run-0/cancel", "").0,
        409
    );
    assert_eq!(
        call(daemon.admin_addr(), "GET", "/tasks/run-0/cancel", "").0,
        405
    );
    assert_eq!(
        call(daemon.admin_addr(), "POST", "/tasks/run-1/cancel", "{").0,
        400
    );
    // An id no element could carry is refused, not written.
    let long = format!("/tasks/{}/cancel", "x".repeat(300));
    assert_eq!(call(daemon.admin_addr(), "POST", &long, "").0, 400);
    assert_eq!(
        call(daemon.admin_addr(), "POST", "/tasks/a%0Ab/cancel", "").0,
        400
    );
    stop(daemon);
}

/// A GPU that refuses the cancel keeps the slot: it frees only when the GPU's callback comes
/// (the GPU may still be running the task), and the task is cancelled, not finished.
#[test]
fn a_gpu_that_refuses_the_cancel_keeps_its_slot_until_its_callback() {
    let env = TestEnv::new("cancelrefused");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        lose_rate: 1.0,
        cancel: CancelMode::Refuse,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let extra = format!(
        "[gpu]\nslots = 1\ncancel_url = \"{}\"\n",
        fleet.cancel_url(0)
    );
    let daemon = env.start(&env.config_toml(fleet.urls(), &extra));
    env.push_raw("q1", &transcriptions("ref", 2));
    // Sent, not only claimed: a cancel between the claim and the send ends the attempt at once,
    // the dispatch never sent (windows::a_cancel_between_the_claim_and_the_send_is_never_sent).
    assert!(wait_for(Duration::from_secs(20), || fleet
        .stats()
        .body("ref-0")
        .is_some()));
    let (code, _) = call(daemon.admin_addr(), "POST", "/tasks/ref-0/cancel", "");
    assert_eq!(code, 202);
    assert!(wait_for(Duration::from_secs(5), || {
        !fleet.stats().cancels().is_empty()
    }));
    // Refused (HTTP 500): held, and the next task waits.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(state(&env, "ref-0").as_deref(), Some("processing"));
    assert_eq!(daemon.busy_slots(), 1);
    assert!(fleet.stats().body("ref-1").is_none());
    assert_eq!(fleet.stats().cancels()[0].2, 500);
    let late = call(
        daemon.callback_addr(),
        "POST",
        &callback_target("ref-0", 1),
        &finished("ref-0"),
    );
    assert_eq!(late.0, 409, "{}", late.1);
    assert!(late.1.contains("cancelled"), "{}", late.1);
    assert_eq!(state(&env, "ref-0").as_deref(), Some("cancelled"));
    assert!(wait_for(Duration::from_secs(10), || {
        fleet.stats().body("ref-1").is_some()
    }));
    assert_eq!(fleet.stats().max_running(0), 1);
    stop(daemon);
}

/// Without a `cancel_url` nothing can be asked: the slot is held until the lease ends, and the
/// task is then cancelled, not retried.
#[test]
fn without_a_cancel_url_the_lease_ends_a_cancelled_attempt_and_it_is_not_retried() {
    let env = TestEnv::new("cancellease");
    let fleet = long_fleet(CancelMode::Stop);
    let daemon =
        env.start(&env.config_toml(fleet.urls(), "[gpu]\nslots = 1\ntask_timeout = \"3s\"\n"));
    env.push_raw("q1", &transcriptions("lease", 1));
    // Sent, not only claimed (see above).
    assert!(wait_for(Duration::from_secs(20), || fleet
        .stats()
        .body("lease-0")
        .is_some()));
    assert_eq!(
        call(daemon.admin_addr(), "POST", "/tasks/lease-0/cancel", "").0,
        202
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(state(&env, "lease-0").as_deref(), Some("processing"));
    assert_eq!(daemon.busy_slots(), 1);
    assert!(waits_for_state(
        &env,
        "lease-0",
        "cancelled",
        Duration::from_secs(10)
    ));
    // The memory's slot frees just after the commit that MySQL shows.
    assert!(wait_for(Duration::from_secs(2), || daemon.busy_slots() == 0));
    assert_eq!(env.count("task_id = 'lease-0' AND attempts = 1"), 1);
    assert!(fleet.stats().cancels().is_empty(), "nothing to ask");
    assert_eq!(fleet.stats().seen().get("lease-0"), Some(&1));
    stop(daemon);
}

/// An `exec` handler's process group is killed; an `http` handler's request is abandoned. Both
/// from `qsysd cancel`, the operator's command, which works on MySQL directly.
#[test]
fn running_handlers_are_stopped_from_the_cli() {
    let env = TestEnv::new("cancelhandlers");
    let pidfile = env.dir.join("sleeper.pid");
    // Accepts connections and never answers (it stops by itself).
    let hook = TcpListener::bind("127.0.0.1:0").expect("bind");
    let hook_url = format!("http://{}/hook", hook.local_addr().expect("addr"));
    std::thread::spawn(move || {
        let mut held = Vec::new();
        let until = Instant::now() + Duration::from_secs(60);
        hook.set_nonblocking(true).expect("nonblocking");
        while Instant::now() < until {
            if let Ok((s, _)) = hook.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let extra = format!(
        "[types.sleeper]\nhandler = \"exec\"\ntimeout = \"5m\"\n\
         command = [\"/bin/sh\", \"-c\", \"echo $$ > {pid}; sleep 60 & wait\"]\n\
         [types.hook]\nhandler = \"http\"\nurl = \"{hook_url}\"\ntimeout = \"5m\"\n",
        pid = pidfile.display()
    );
    let toml = env.config_toml(&[], &extra);
    let cfg = env.config_file("qsysd.toml", &toml);
    let daemon = env.start(&toml);
    env.push_raw(
        "q1",
        &[
            r#"{"type":"sleeper","data":{"task_id":"sleep-0"}}"#.to_string(),
            r#"{"type":"hook","data":{"task_id":"hook-0"}}"#.to_string(),
        ],
    );
    assert!(waits_for_state(
        &env,
        "sleep-0",
        "processing",
        Duration::from_secs(20)
    ));
    assert!(waits_for_state(
        &env,
        "hook-0",
        "processing",
        Duration::from_secs(20)
    ));
    assert!(wait_for(Duration::from_secs(10), || pidfile.exists()));
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .expect("pid")
        .trim()
        .parse()
        .expect("pid");
    let out = std::process::Command::new(QSYSD)
        .args([
            "--config",
            cfg.to_str().expect("utf8"),
            "cancel",
            "sleep-0",
            "hook-0",
        ])
        .args(["--reason", "ops said so"])
        .output()
        .expect("qsysd cancel");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sleep-0: cancel requested"), "{stdout}");
    assert!(waits_for_state(
        &env,
        "sleep-0",
        "cancelled",
        Duration::from_secs(5)
    ));
    assert!(waits_for_state(
        &env,
        "hook-0",
        "cancelled",
        Duration::from_secs(5)
    ));
    // SAFETY: kill(pid, 0) only checks whether the process exists.
    let gone = wait_for(
        Duration::from_secs(3),
        || unsafe { libc::kill(pid, 0) } != 0,
    );
    assert!(gone, "the exec handler's process survived the cancel");
    for id in ["sleep-0", "hook-0"] {
        assert_eq!(
            outcome_of(&env, id, 1).as_deref(),
            Some("cancelled"),
            "{id}"
        );
        let (_, error) = env.task(id).expect("row");
        assert_eq!(error.as_deref(), Some("cancelled: ops said so"), "{id}");
    }
    // A second cancel is refused (exit 1) and says why.
    let again = std::process::Command::new(QSYSD)
        .args(["--config", cfg.to_str().expect("utf8"), "cancel", "sleep-0"])
        .output()
        .expect("qsysd cancel");
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already cancelled"));
    assert!(State::parse("cancelled").is_some_and(State::is_terminal));
    stop(daemon);
}

/// A response-mode GPU's dispatch thread is held by the call: a cancel it confirms still frees
/// the slot, and the answer it then gives changes nothing.
#[test]
fn a_response_mode_gpu_confirms_a_cancel_and_its_answer_changes_nothing() {
    let env = TestEnv::new("cancelresponse");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        delay: (Duration::from_secs(60), Duration::from_secs(60)),
        completion: Completion::Response,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let extra = format!(
        "[gpu]\nslots = 1\ncompletion = \"response\"\ncancel_url = \"{}\"\n",
        fleet.cancel_url(0)
    );
    let daemon = env.start(&env.config_toml(fleet.urls(), &extra));
    env.push_raw("q1", &transcriptions("resp", 2));
    assert!(waits_for_state(
        &env,
        "resp-0",
        "processing",
        Duration::from_secs(20)
    ));
    assert_eq!(
        call(daemon.admin_addr(), "POST", "/tasks/resp-0/cancel", "").0,
        202
    );
    assert!(waits_for_state(
        &env,
        "resp-0",
        "cancelled",
        Duration::from_secs(5)
    ));
    assert!(waits_for_state(
        &env,
        "resp-1",
        "processing",
        Duration::from_secs(10)
    ));
    assert_eq!(state(&env, "resp-0").as_deref(), Some("cancelled"));
    assert_eq!(fleet.stats().max_running(0), 1);
    stop(daemon);
}
