//! The schema: created from nothing, and migrated in place from the seed README's DDL.

mod common;

use common::TestEnv;
use mysql::prelude::Queryable;
use qsys::{Store, SCHEMA_VERSION};

const SEED_DDL: &[&str] = &[
    "CREATE TABLE tasks (
        task_id VARCHAR(255) PRIMARY KEY,
        queue VARCHAR(100),
        state VARCHAR(20),
        type VARCHAR(50),
        gpu_id VARCHAR(10),
        slot_index INT
    )",
    "CREATE INDEX idx_tasks_state ON tasks(state)",
    "CREATE INDEX idx_tasks_gpu_id ON tasks(gpu_id)",
    "CREATE INDEX idx_tasks_type ON tasks(type)",
];

fn new_task(id: &str) -> qsys::NewTask<'_> {
    qsys::NewTask {
        task_id: id,
        kind: "start_transcribe",
        payload: "{}",
        max_attempts: None,
        timeout_s: None,
        wait: None,
        cost: None,
    }
}

/// A claim of `gpu_id`/`slot` for the attempt after `attempts`, with a 60 s lease.
fn claim_req<'a>(
    task_id: &'a str,
    attempts: u32,
    gpu_id: &'a str,
    slot: usize,
) -> qsys::ClaimRequest<'a> {
    qsys::ClaimRequest {
        task_id,
        attempts,
        gpu_id,
        slot,
        lease: std::time::Duration::from_secs(60),
        heartbeat: None,
    }
}

/// One claim, as the scheduler's batch of one.
fn claim_one(
    store: &Store,
    task_id: &str,
    attempts: u32,
    gpu_id: &str,
    slot: usize,
) -> qsys::Claim {
    let req = claim_req(task_id, attempts, gpu_id, slot);
    store.claim_gpu_attempts(&[req]).expect("claim").remove(0)
}

fn accept(store: &Store, id: &str) -> qsys::Accepted {
    store
        .accept("q", &[new_task(id)])
        .expect("accept")
        .remove(0)
}

fn columns(env: &TestEnv) -> Vec<String> {
    env.query(&format!(
        "SELECT column_name FROM information_schema.columns \
         WHERE table_schema = '{}' AND table_name = 'tasks' ORDER BY ordinal_position",
        env.db
    ))
}

#[test]
fn seed_table_is_migrated_in_place_and_keeps_its_rows() {
    let env = TestEnv::new("seedddl");
    let mut root = mysql::Conn::new(
        mysql::Opts::from_url(env.mysql_url().rsplit_once('/').expect("db").0).expect("url"),
    )
    .expect("mysql");
    root.query_drop(format!("CREATE DATABASE `{}`", env.db))
        .expect("create db");
    let mut c = env.mysql();
    for stmt in SEED_DDL {
        c.query_drop(*stmt).expect("seed ddl");
    }
    c.query_drop(
        "INSERT INTO tasks VALUES \
         ('old-1', 'task_queue_1', 'finished', 'start_transcribe', 'g0', 2), \
         ('old-2', 'task_queue_1', 'processing', 'start_transcribe', 'g3', 0), \
         ('old-3', NULL, NULL, NULL, NULL, NULL)",
    )
    .expect("seed rows");

    let store = Store::connect(&env.mysql_url(), false, "test", 2).expect("connect");
    assert_eq!(store.migrate().expect("migrate"), SCHEMA_VERSION);
    // Idempotent: a second start (or a second instance) changes nothing.
    assert_eq!(store.migrate().expect("migrate again"), SCHEMA_VERSION);

    let cols = columns(&env);
    for want in [
        "task_id",
        "queue",
        "state",
        "type",
        "gpu_id",
        "slot_index",
        "payload",
        "attempts",
        "error",
        "created_at",
        "finished_at",
        "deadline",
        "instance_id",
    ] {
        assert!(
            cols.iter().any(|c| c == want),
            "missing column {want}: {cols:?}"
        );
    }
    type Row = (String, Option<String>, Option<String>, Option<u32>, u32);
    let rows: Vec<Row> = env
        .query("SELECT task_id, state, gpu_id, slot_index, attempts FROM tasks ORDER BY task_id");
    assert_eq!(
        rows[0],
        (
            "old-1".into(),
            Some("finished".into()),
            Some("g0".into()),
            Some(2),
            0
        )
    );
    assert_eq!(rows[1].1.as_deref(), Some("processing"));
    assert_eq!(rows.len(), 3);
    // Widened: endpoint ids longer than the seed's 10 characters fit.
    c.query_drop("UPDATE tasks SET gpu_id = 'gpu-node-17.eu-west' WHERE task_id = 'old-1'")
        .expect("wide gpu id");
    // The seed's monitoring query keeps working.
    let busy: Vec<(String, u64)> = env.query(
        "SELECT gpu_id, COUNT(*) as active_tasks FROM tasks WHERE state = 'processing' GROUP BY gpu_id",
    );
    assert_eq!(busy, [("g3".to_string(), 1)]);
    // A task id the seed left in a terminal state is never reset by a new copy.
    let accepted = accept(&store, "old-1");
    assert_eq!(
        accepted,
        qsys::Accepted::Exists {
            state: "finished".into()
        }
    );
    let accepted = accept(&store, "old-3");
    assert_eq!(
        accepted,
        qsys::Accepted::Exists {
            state: "NULL".into()
        }
    );
}

#[test]
fn empty_database_gets_the_current_schema() {
    let env = TestEnv::new("fresh");
    // The database does not exist yet: connect creates it.
    let store = Store::connect(&env.mysql_url(), false, "test", 2).expect("connect");
    assert_eq!(store.migrate().expect("migrate"), SCHEMA_VERSION);
    store
        .ensure_slots(&[("g0".into(), 2), ("g1".into(), 3)])
        .expect("slots");
    store
        .ensure_slots(&[("g0".into(), 2), ("g1".into(), 3)])
        .expect("slots again");
    let n: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_slots");
    assert_eq!(n[0], 5);
    let v: Vec<u32> = env.query("SELECT MAX(version) FROM qsys_schema");
    assert_eq!(v[0], SCHEMA_VERSION);
    assert!(store.held_slots().expect("held").is_empty());
}

/// Version 8 drops the deadline index an earlier version made (issue 20); the lease check's own
/// tests (liveness, faults) run without it.
#[test]
fn an_upgrade_to_v8_drops_the_deadline_index() {
    use mysql::prelude::Queryable;
    let env = TestEnv::new("v8");
    let store = Store::connect(&env.mysql_url(), false, "test", 2).expect("connect");
    store.migrate().expect("migrate");
    let mut c = env.mysql();
    // What a version-7 database looks like here: the index back, the version one lower.
    c.query_drop("CREATE INDEX idx_tasks_state_deadline ON tasks (state, deadline)")
        .expect("index");
    c.query_drop(format!(
        "DELETE FROM qsys_schema WHERE version = {SCHEMA_VERSION}"
    ))
    .expect("version");
    assert_eq!(store.migrate().expect("migrate"), SCHEMA_VERSION);
    let left: Vec<u64> = env.query(
        "SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE() \
         AND index_name = 'idx_tasks_state_deadline'",
    );
    assert_eq!(left, [0]);
}

#[test]
fn a_slot_is_claimed_once() {
    let env = TestEnv::new("claim");
    let store = Store::connect(&env.mysql_url(), false, "test", 4).expect("connect");
    store.migrate().expect("migrate");
    store.ensure_slots(&[("g0".into(), 1)]).expect("slots");
    for id in ["a", "b"] {
        store.accept("q", &[new_task(id)]).expect("accept");
    }
    use qsys::Claim;
    assert_eq!(claim_one(&store, "a", 0, "g0", 0), Claim::Claimed);
    assert_eq!(
        claim_one(&store, "b", 0, "g0", 0),
        Claim::SlotTaken {
            holder: "a".into(),
            attempt: 1
        }
    );
    // "b" is untouched by the failed claim.
    let b: Vec<(String, u32)> = env.query("SELECT state, attempts FROM tasks WHERE task_id = 'b'");
    assert_eq!(b, [("pending".to_string(), 0)]);
    // The same attempt cannot be claimed twice either.
    store.ensure_slots(&[("g0".into(), 2)]).expect("slots");
    assert_eq!(claim_one(&store, "a", 0, "g0", 1), Claim::NotPending);
    let held = store.held_slots().expect("held");
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].task_id.as_str(), held[0].attempt), ("a", 1));
}

/// Issue 20: a task that finds a free slot is recorded and claimed in one transaction; the
/// claims of a batch that is not all new are not tried, and a slot held is refused as ever.
#[test]
fn a_record_claims_the_free_slots_of_its_new_tasks_in_the_same_transaction() {
    use qsys::{Accepted, Claim};
    let env = TestEnv::new("intakeclaim");
    let store = Store::connect(&env.mysql_url(), false, "test", 4).expect("connect");
    store.migrate().expect("migrate");
    store.ensure_slots(&[("g0".into(), 2)]).expect("slots");
    let claim = |task_id, slot| claim_req(task_id, 0, "g0", slot);
    let (accepted, claimed) = store
        .accept_and_claim(
            "q",
            &[new_task("a"), new_task("b"), new_task("c")],
            &[claim("a", 0), claim("b", 0)], // b asks for the slot a takes
        )
        .expect("accept and claim");
    assert_eq!(accepted, [Accepted::New, Accepted::New, Accepted::New]);
    assert_eq!(
        claimed,
        [
            Some(Claim::Claimed),
            Some(Claim::SlotTaken {
                holder: "a".into(),
                attempt: 1
            })
        ]
    );
    let rows: Vec<(String, String, u32)> =
        env.query("SELECT task_id, state, attempts FROM tasks ORDER BY task_id");
    let want = |id: &str, state: &str, n| (id.to_string(), state.to_string(), n);
    assert_eq!(
        rows,
        [
            want("a", "processing", 1),
            want("b", "pending", 0),
            want("c", "pending", 0)
        ]
    );
    // "a" again (a copy taken after a crash) with a new one: not all new, so nothing is claimed.
    let (accepted, claimed) = store
        .accept_and_claim("q", &[new_task("a"), new_task("d")], &[claim("d", 1)])
        .expect("accept again");
    assert!(
        matches!(accepted[0], Accepted::Exists { .. }),
        "{accepted:?}"
    );
    assert_eq!(claimed, [None]);
    let held = store.held_slots().expect("held");
    assert_eq!(held.len(), 1);
    assert_eq!((held[0].task_id.as_str(), held[0].slot_index), ("a", 0));
}

/// Batches behave like their requests applied one by one: each claim or ending gets its own
/// verdict, a repeat within the batch sees the earlier one, and nothing half-applies.
#[test]
fn batched_claims_and_endings_give_one_verdict_each() {
    use qsys::{Claim, EndRequest, Ending, Finish, HandOver, Next, State};
    let env = TestEnv::new("batch");
    let store = Store::connect(&env.mysql_url(), false, "test", 4).expect("connect");
    store.migrate().expect("migrate");
    store
        .ensure_slots(&[("g0".into(), 2), ("g1".into(), 2)])
        .expect("slots");
    let ids = ["a", "b", "c", "d", "e"];
    let tasks: Vec<_> = ids.iter().map(|id| new_task(id)).collect();
    use qsys::Accepted;
    assert!(store
        .accept("q", &tasks)
        .expect("accept")
        .iter()
        .all(|a| *a == Accepted::New));
    // A batch with a known id is looked at row by row: "a" is pending here (a copy left in Redis
    // by a crash) and is taken over; "x" is new, which the slow path reports as resumed at 0.
    let again = store
        .accept("q", &[new_task("a"), new_task("x")])
        .expect("accept again");
    assert_eq!(
        again,
        [
            Accepted::Resumed { attempts: 0 },
            Accepted::Resumed { attempts: 0 }
        ]
    );
    let n: Vec<u64> = env.query("SELECT COUNT(*) FROM tasks");
    assert_eq!(n[0], 6);
    env.query::<u64>("DELETE FROM tasks WHERE task_id = 'x'");
    assert_eq!(claim_one(&store, "e", 0, "g1", 1), Claim::Claimed);
    let got = store
        .claim_gpu_attempts(&[
            claim_req("a", 0, "g0", 0),
            claim_req("b", 0, "g0", 0), // same slot as "a", later in the batch
            claim_req("c", 3, "g0", 1), // wrong attempt count
            claim_req("d", 0, "g1", 1), // held by "e"
            claim_req("d", 0, "g1", 0),
        ])
        .expect("claims");
    assert_eq!(
        got,
        [
            Claim::Claimed,
            Claim::SlotTaken {
                holder: "a".into(),
                attempt: 1
            },
            Claim::NotPending,
            Claim::SlotTaken {
                holder: "e".into(),
                attempt: 1
            },
            Claim::Claimed,
        ]
    );
    type Row = (String, String, u32, Option<String>, Option<u32>);
    let rows: Vec<Row> = env
        .query("SELECT task_id, state, attempts, gpu_id, slot_index FROM tasks ORDER BY task_id");
    let shown: Vec<_> = rows
        .iter()
        .map(|(id, st, n, g, s)| format!("{id} {st} {n} {g:?} {s:?}"))
        .collect();
    assert_eq!(
        shown,
        [
            "a processing 1 Some(\"g0\") Some(0)",
            "b pending 0 None None",
            "c pending 0 None None",
            "d processing 1 Some(\"g1\") Some(0)",
            "e processing 1 Some(\"g1\") Some(1)",
        ]
    );
    let deadlines: Vec<u64> = env.query(
        "SELECT COUNT(*) FROM tasks WHERE state = 'processing' AND deadline > NOW(3) + INTERVAL 50 SECOND",
    );
    assert_eq!(deadlines[0], 3, "each claim has its lease");

    let end = |task_id, attempt, ending| EndRequest {
        task_id,
        attempt,
        ending,
        retry: qsys::RetryDelay {
            base: std::time::Duration::from_millis(10),
            max: std::time::Duration::from_millis(10),
            // The top of the jitter range: exactly the base delay.
            jitter: 1.0,
        },
    };
    let flaky = Ending::Failed {
        error: "gpu said 503",
        retryable: true,
    };
    let got = store
        .end_attempts(
            &[
                end("a", 1, Ending::Finished { result: None }),
                end("a", 1, Ending::Finished { result: None }), // the same callback twice in one batch
                end("d", 1, flaky),
                end("e", 2, Ending::Finished { result: None }), // a stale attempt
                end("zz", 1, Ending::Finished { result: None }),
                end("b", 0, Ending::Finished { result: None }), // never dispatched
            ],
            3,
            &[
                // a's slot goes to b in the same transaction.
                HandOver {
                    after: 0,
                    claim: claim_req("b", 0, "g0", 0),
                },
                // e's ending is stale: its slot is not freed, nothing is handed over.
                HandOver {
                    after: 3,
                    claim: claim_req("c", 0, "g1", 1),
                },
                // d's slot, to a task that is not pending (a ended finished in this batch).
                HandOver {
                    after: 2,
                    claim: claim_req("a", 1, "g1", 0),
                },
            ],
        )
        .expect("ends");
    assert_eq!(
        got.handed,
        [Some(Claim::Claimed), None, Some(Claim::NotPending)]
    );
    // Ages depend on the clock; every applied ending has one.
    let got: Vec<Finish> = got
        .finishes
        .into_iter()
        .map(|f| match f {
            Finish::Applied {
                slot, next, age, ..
            } => {
                assert!(age.is_some());
                Finish::Applied {
                    slot,
                    next,
                    age: None,
                    work: None,
                }
            }
            other => other,
        })
        .collect();
    assert_eq!(
        got,
        [
            Finish::Applied {
                slot: Some(("g0".into(), 0)),
                next: Next::Done(State::Finished),
                age: None,
                work: None,
            },
            Finish::Duplicate,
            Finish::Applied {
                slot: Some(("g1".into(), 0)),
                next: Next::Retry {
                    after: std::time::Duration::from_millis(10)
                },
                age: None,
                work: None,
            },
            Finish::Stale { current: 1 },
            Finish::Unknown,
            Finish::Conflict {
                state: "pending".into()
            },
        ]
    );
    let rows: Vec<(String, String, Option<String>)> =
        env.query("SELECT task_id, state, error FROM tasks WHERE task_id IN ('a', 'd')");
    assert_eq!(
        rows,
        [
            ("a".to_string(), "finished".to_string(), None),
            (
                "d".to_string(),
                "pending".to_string(),
                Some("gpu said 503".to_string())
            ),
        ]
    );
    let history: Vec<(String, u32, Option<String>, String)> =
        env.query("SELECT task_id, attempt, gpu_id, outcome FROM task_attempts ORDER BY task_id");
    assert_eq!(
        history,
        [
            (
                "a".to_string(),
                1,
                Some("g0".to_string()),
                "finished".to_string()
            ),
            (
                "d".to_string(),
                1,
                Some("g1".to_string()),
                "failed".to_string()
            ),
        ]
    );
    // "e" still holds its slot; "b" holds the one "a" freed, as its first attempt.
    let mut held: Vec<(String, usize, String, u32)> = store
        .held_slots()
        .expect("held")
        .into_iter()
        .map(|h| (h.gpu_id, h.slot_index, h.task_id, h.attempt))
        .collect();
    held.sort();
    assert_eq!(
        held,
        [
            ("g0".to_string(), 0, "b".to_string(), 1),
            ("g1".to_string(), 1, "e".to_string(), 1),
        ]
    );
    let b: Vec<(String, u32, Option<String>, Option<u32>)> = env.query(
        "SELECT state, attempts, gpu_id, slot_index FROM tasks WHERE task_id = 'b' \
         AND deadline > NOW(3) + INTERVAL 50 SECOND",
    );
    assert_eq!(
        b,
        [("processing".to_string(), 1, Some("g0".to_string()), Some(0))],
        "b started on a's slot with its lease"
    );
}

/// Issue 13: on a table made by the seed DDL (here with the latin1, case-insensitive defaults a
/// stock server may have), ids that differ in case or in trailing spaces are different tasks, and
/// text outside latin1 (an emoji) is stored as sent.
#[test]
fn identities_are_exact_bytes_and_text_is_any_unicode() {
    let env = TestEnv::new("exactid");
    let mut root = mysql::Conn::new(
        mysql::Opts::from_url(env.mysql_url().rsplit_once('/').expect("db").0).expect("url"),
    )
    .expect("mysql");
    root.query_drop(format!(
        "CREATE DATABASE `{}` CHARACTER SET latin1 COLLATE latin1_swedish_ci",
        env.db
    ))
    .expect("create db");
    let mut c = env.mysql();
    for stmt in SEED_DDL {
        c.query_drop(*stmt).expect("seed ddl");
    }
    c.query_drop("INSERT INTO tasks VALUES ('Seed', 'q', 'finished', 't', 'G0', 0)")
        .expect("seed row");
    let store = Store::connect(&env.mysql_url(), false, "test", 2).expect("connect");
    store.migrate().expect("migrate");
    for id in ["CaseID", "caseid", "trail", "trail ", "seed"] {
        assert_eq!(
            accept(&store, id),
            qsys::Accepted::New,
            "{id:?} is a task of its own"
        );
    }
    let n: Vec<u64> = env.query("SELECT COUNT(*) FROM tasks");
    assert_eq!(n, vec![6]);
    let exact: Vec<String> = env.query("SELECT task_id FROM tasks WHERE task_id = 'trail'");
    assert_eq!(exact, vec!["trail".to_string()]);
    // Slots of GPUs whose ids differ only in case are separate rows.
    store
        .ensure_slots(&[("g0".into(), 1), ("G0".into(), 1)])
        .expect("slots");
    let slots: Vec<u64> = env.query("SELECT COUNT(*) FROM gpu_slots");
    assert_eq!(slots, vec![2]);
    let emoji = r#"{"type":"t","data":{"note":"🎙️ naïve"}}"#;
    let row = qsys::NewTask {
        payload: emoji,
        ..new_task("unicode")
    };
    store.accept("q", &[row]).expect("accept unicode");
    let stored: Vec<String> = env.query("SELECT payload FROM tasks WHERE task_id = 'unicode'");
    assert_eq!(stored, vec![emoji.to_string()]);
}
