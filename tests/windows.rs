//! Windows where a task could be lost or stuck (issue 14), each forced open on every run by a
//! test-only pause point or a held row lock, never hit by chance.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{as_instance, stop, transcriptions, wait_for, TestEnv};
use fakefleet::{Fleet, FleetConfig};
use mysql::prelude::Queryable;
use qsys::testing;

/// A graceful stop while a peer is live, paused inside the hand-back: the stopping instance has
/// released its `pending` rows and not yet pushed them to Redis. Left there (as a crash there
/// would), the peer adopts the rows and runs them; let go, its late copies change nothing. In the
/// old order (push, then release) the peer dropped the copy as a duplicate of a row still held,
/// and the release then left a row nobody held and no list had: the task never ran.
#[test]
fn a_stop_paused_inside_its_hand_back_loses_nothing() {
    let env = TestEnv::new("winstop");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        delay: (Duration::from_millis(1500), Duration::from_millis(1500)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let toml = env.config_toml(fleet.urls(), "[gpu]\nslots = 1\n");
    let a = env.start(&as_instance(&toml, "win-a", "120s"));
    env.push_raw("q1", &transcriptions("ws", 8));
    // A holds one running and the rest in hand; only then does B start.
    assert!(wait_for(Duration::from_secs(20), || {
        env.count("state = 'processing'") == 1 && env.count("state = 'pending'") == 7
    }));
    let b = env.start(&as_instance(&toml, "win-b", "10s"));
    testing::arm("win-a", "hand-back:released");
    a.stop();
    let stopping = std::thread::spawn(move || a.wait());
    assert!(
        testing::wait_reached("win-a", "hand-back:released", Duration::from_secs(30)),
        "the stop never reached its hand-back"
    );
    // Inside the window: released, not in Redis, held by nobody.
    let held_by_nobody = env.count("state = 'pending' AND instance_id IS NULL");
    assert!(held_by_nobody >= 6, "{:?}", env.states());
    assert_eq!(env.llen("q1"), 0);
    // Left paused, as a crash here would leave them: the peer adopts them and runs them.
    assert!(
        wait_for(Duration::from_secs(60), || env.count("state = 'finished'")
            >= 7),
        "{:?}",
        env.states()
    );
    testing::release("win-a", "hand-back:released");
    stopping
        .join()
        .expect("stop thread")
        .expect("instance a stopped cleanly");
    // The late copies reach Redis and B; they are dropped, nothing runs twice.
    assert!(
        wait_for(Duration::from_secs(30), || {
            env.count("state = 'finished'") == 8 && env.llen("q1") == 0
        }),
        "{:?}",
        env.states()
    );
    std::thread::sleep(Duration::from_secs(2));
    let twice: HashMap<String, u32> = fleet
        .stats()
        .seen()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(twice.is_empty(), "dispatched twice: {twice:?}");
    assert_eq!(env.count("state = 'finished'"), 8);
    stop(b);
}

const EXEC: &str = "[types.send_email]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\n";

/// A handler worker whose start waits on a row lock past MySQL's lock wait timeout gives the task
/// back to the scheduler, which runs it as soon as the lock is gone (before, it stayed `pending`
/// until the next restart).
#[test]
fn a_handler_start_that_times_out_on_a_lock_runs_later() {
    let env = TestEnv::new("winlock");
    let toml = as_instance(&env.config_toml(&[], EXEC), "win-lock", "10s");
    let daemon = env.start(&toml);
    testing::arm("win-lock", "handler:received");
    env.push_raw(
        "q1",
        &[r#"{"type":"send_email","data":{"task_id":"lk-0"}}"#.to_string()],
    );
    assert!(testing::wait_reached(
        "win-lock",
        "handler:received",
        Duration::from_secs(20)
    ));
    let mut holder = env.mysql();
    holder.query_drop("START TRANSACTION").expect("begin");
    holder
        .query_drop("SELECT * FROM tasks WHERE task_id = 'lk-0' FOR UPDATE")
        .expect("lock");
    testing::release("win-lock", "handler:received");
    // The worker's start waits 10 s for the lock and fails; the lock is held a little longer.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(env.count("task_id = 'lk-0' AND state = 'pending'"), 1);
    holder.query_drop("ROLLBACK").expect("release");
    let released = Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || env.count("state = 'finished'")
            == 1),
        "{:?}",
        env.states()
    );
    // Given back by the worker, not found by the 30 s sweep.
    assert!(released.elapsed() < Duration::from_secs(15));
    stop(daemon);
}

/// A reload that moves a type from an exec handler to the GPUs while a worker has just taken one
/// of its tasks: the worker gives it back and it runs on a GPU (before, the worker returned and
/// the task stayed `pending`).
#[test]
fn a_reload_that_changes_a_handler_under_load_runs_every_task() {
    let env = TestEnv::new("winreload");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let exec = "[types.job]\nhandler = \"exec\"\ncommand = [\"/bin/true\"]\n";
    let gpu = "[types.job]\nhandler = \"gpu\"\n";
    let daemon = env.start(&as_instance(
        &env.config_toml(fleet.urls(), exec),
        "win-rl",
        "10s",
    ));
    testing::arm("win-rl", "handler:received");
    let jobs: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"type":"job","data":{{"task_id":"rl-{i}"}}}}"#))
        .collect();
    env.push_raw("q1", &jobs);
    assert!(testing::wait_reached(
        "win-rl",
        "handler:received",
        Duration::from_secs(20)
    ));
    daemon.apply_config(env.config(&as_instance(
        &env.config_toml(fleet.urls(), gpu),
        "win-rl",
        "10s",
    )));
    testing::release("win-rl", "handler:received");
    assert!(
        wait_for(Duration::from_secs(30), || env.count("state = 'finished'")
            == 20),
        "{:?}",
        env.states()
    );
    stop(daemon);
}

/// More response-mode slots (80) than the old default of dispatch threads (64): every slot gets
/// a thread, so every GPU runs its four at once, and none ever runs more.
#[test]
fn every_response_mode_slot_has_a_thread_and_no_gpu_runs_more() {
    let env = TestEnv::new("winresp");
    let fleet = Fleet::start(FleetConfig {
        gpus: 20,
        completion: fakefleet::Completion::Response,
        delay: (Duration::from_millis(1000), Duration::from_millis(1000)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&as_instance(
        &env.config_toml(fleet.urls(), "[gpu]\ncompletion = \"response\"\n"),
        "win-resp",
        "10s",
    ));
    env.push_raw("q1", &transcriptions("rs", 400));
    assert!(
        wait_for(Duration::from_secs(90), || env.count("state = 'finished'")
            == 400),
        "{:?}",
        env.states()
    );
    let peaks: Vec<usize> = (0..20).map(|g| fleet.stats().max_running(g)).collect();
    assert!(
        peaks.iter().all(|&p| p <= 4),
        "a gpu ran more than 4: {peaks:?}"
    );
    assert!(
        peaks.iter().all(|&p| p == 4),
        "slots waited for a thread: {peaks:?}"
    );
    stop(daemon);
}

/// A dispatch held back (paused) past its lease: the lease ends, the task is retried and runs
/// elsewhere; the held dispatch, let go, is not sent. Before, it was sent anyway and the task
/// ran twice at once (one slot more than the GPU has, counting the retry's).
#[test]
fn a_dispatch_that_waited_past_its_lease_is_not_sent() {
    let env = TestEnv::new("winlease");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&as_instance(
        &env.config_toml(fleet.urls(), "[retry]\nbackoff = \"100ms\"\n"),
        "win-lease",
        "10s",
    ));
    testing::arm("win-lease", "dispatch:before-send");
    env.push_raw(
        "q1",
        &[
            r#"{"type":"start_transcribe","timeout_s":1,"max_attempts":3,"data":{"task_id":"ls-0"}}"#
                .to_string(),
        ],
    );
    assert!(testing::wait_reached(
        "win-lease",
        "dispatch:before-send",
        Duration::from_secs(20)
    ));
    // Attempt 1's lease runs out; attempt 2 is claimed and sent by another worker.
    assert!(
        wait_for(Duration::from_secs(20), || env.count("state = 'finished'")
            == 1),
        "{:?}",
        env.states()
    );
    testing::release("win-lease", "dispatch:before-send");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.stats().seen().get("ls-0"), Some(&1), "sent twice");
    let attempts: Vec<u32> = env.query("SELECT attempts FROM tasks WHERE task_id = 'ls-0'");
    assert_eq!(attempts, vec![2]);
    stop(daemon);
}

/// What a lost commit acknowledgement, a lost retry event or a failed hand-back leaves behind: a
/// `pending` row in no thread's memory and no Redis list. Made here by hand, deterministically:
/// one held by this instance, one held by nobody. The scheduler's sweep takes both up (before,
/// such rows stayed `pending` until a restart, or for ever).
#[test]
fn pending_rows_in_no_memory_and_no_list_are_taken_up() {
    let env = TestEnv::new("winsweep");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let daemon = env.start(&as_instance(
        &env.config_toml(fleet.urls(), ""),
        "win-sweep",
        "10s",
    ));
    assert!(wait_for(Duration::from_secs(10), || env.schema_ready()));
    let payload =
        |id: &str| format!(r#"{{"type":"start_transcribe","data":{{"task_id":"{id}"}}}}"#);
    let mut c = env.mysql();
    for (id, holder) in [("lost-mine", Some("win-sweep")), ("lost-nobody", None)] {
        c.exec_drop(
            "INSERT INTO tasks (task_id, queue, state, type, payload, attempts, instance_id, \
             created_at, updated_at) VALUES (?, ?, 'pending', 'start_transcribe', ?, 0, ?, \
             NOW(3), NOW(3) - INTERVAL 1 MINUTE)",
            (id, env.queue("q1"), payload(id), holder),
        )
        .expect("row");
    }
    assert!(
        wait_for(Duration::from_secs(30), || env.count("state = 'finished'")
            == 2),
        "{:?}",
        env.states()
    );
    assert_eq!(fleet.stats().seen().len(), 2);
    stop(daemon);
}

/// Issue 16: a cancel that arrives after the poller moved the element out of its queue and
/// before it recorded it (paused there) finds no row, and leaves a `cancelled` one under the id:
/// the poller, let go, finds the id taken by a terminal task and drops the copy. It never runs.
#[test]
fn a_cancel_between_the_move_and_the_record_still_stops_the_task() {
    let env = TestEnv::new("wincancel");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        ..FleetConfig::default()
    })
    .expect("fleet");
    let toml = as_instance(&env.config_toml(fleet.urls(), ""), "win-cancel", "10s");
    let daemon = env.start(&toml);
    testing::arm("win-cancel", "poller:moved");
    let tasks = transcriptions("wc", 2);
    env.push_raw("q1", &tasks[..1]);
    assert!(testing::wait_reached(
        "win-cancel",
        "poller:moved",
        Duration::from_secs(20)
    ));
    // In the window: out of the queue, in no table.
    assert_eq!(env.llen("q1"), 0);
    assert_eq!(env.count("task_id LIKE 'wc-%'"), 0);
    let store = qsys::ops::store(&env.config(&toml)).expect("store");
    assert_eq!(
        qsys::ops::cancel(&store, "wc-0", None).expect("cancel"),
        qsys::Cancel::Cancelled { was: None }
    );
    testing::release("win-cancel", "poller:moved");
    env.push_raw("q1", &tasks[1..]);
    assert!(wait_for(Duration::from_secs(20), || {
        env.count("task_id = 'wc-1' AND state = 'finished'") == 1
    }));
    assert!(
        fleet.stats().body("wc-0").is_none(),
        "the cancelled task ran"
    );
    assert_eq!(env.count("task_id = 'wc-0' AND state = 'cancelled'"), 1);
    stop(daemon);
}

/// Issue 16: a cancel between the slot's claim and the dispatch's send (paused there): the GPU
/// has not got the task when it is asked to stop it (404), so the slot stays held; let go, the
/// dispatch finds the attempt cancelled and is not sent: the task ends `cancelled` without ever
/// reaching the GPU, and its slot goes to the next task.
#[test]
fn a_cancel_between_the_claim_and_the_send_is_never_sent() {
    let env = TestEnv::new("wincancelsend");
    let fleet = Fleet::start(FleetConfig {
        gpus: 1,
        delay: (Duration::from_secs(60), Duration::from_secs(60)),
        ..FleetConfig::default()
    })
    .expect("fleet");
    let extra = format!(
        "[gpu]\nslots = 1\ncancel_url = \"{}\"\n",
        fleet.cancel_url(0)
    );
    let toml = as_instance(&env.config_toml(fleet.urls(), &extra), "win-cs", "10s");
    let daemon = env.start(&toml);
    testing::arm("win-cs", "dispatch:before-send");
    env.push_raw("q1", &transcriptions("cs", 2));
    assert!(testing::wait_reached(
        "win-cs",
        "dispatch:before-send",
        Duration::from_secs(20)
    ));
    let store = qsys::ops::store(&env.config(&toml)).expect("store");
    assert_eq!(
        qsys::ops::cancel(&store, "cs-0", None).expect("cancel"),
        qsys::Cancel::Requested
    );
    // Asked while the GPU has nothing: 404, and the slot stays held.
    assert!(wait_for(Duration::from_secs(5), || {
        !fleet.stats().cancels().is_empty()
    }));
    assert_eq!(fleet.stats().cancels()[0].2, 404);
    assert_eq!(daemon.busy_slots(), 1);
    testing::release("win-cs", "dispatch:before-send");
    assert!(wait_for(Duration::from_secs(5), || {
        env.count("task_id = 'cs-0' AND state = 'cancelled'") == 1
    }));
    assert!(wait_for(Duration::from_secs(10), || {
        fleet.stats().body("cs-1").is_some()
    }));
    assert!(
        fleet.stats().body("cs-0").is_none(),
        "a cancelled dispatch was sent"
    );
    assert_eq!(fleet.stats().max_running(0), 1);
    stop(daemon);
}
