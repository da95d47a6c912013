//! The schema: created at start and migrated in place, from an empty database or from the seed
//! README's table. Each step checks `information_schema` before it changes anything, rather than
//! rely on MariaDB-only DDL, so any MySQL-protocol server can run it and re-running it is harmless.

use mysql::prelude::Queryable;
use mysql::PooledConn;

use super::{Store, StoreError};

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: u32 = 8;

impl Store {
    /// Creates or upgrades the schema to [`SCHEMA_VERSION`]. Safe to run from several instances at
    /// once: a named lock serialises them.
    pub fn migrate(&self) -> Result<u32, StoreError> {
        let mut c = self.conn()?;
        let got: Option<i64> = c.query_first("SELECT GET_LOCK('qsysd_migrate', 30)")?;
        if got != Some(1) {
            return Err(StoreError::Schema(
                "another instance held the migration lock for 30s".into(),
            ));
        }
        let result = migrate_locked(&mut c);
        let _ = c.query_drop("DO RELEASE_LOCK('qsysd_migrate')");
        result
    }
}

/// Whether `table` has `column`: MySQL has no `ADD COLUMN IF NOT EXISTS`, so a step asks first.
fn column_exists(c: &mut PooledConn, table: &str, column: &str) -> Result<bool, StoreError> {
    schema_has(c, "columns", "column_name", table, column)
}

/// Whether `table` has the index `index`, for the same reason as [`column_exists`].
fn index_exists(c: &mut PooledConn, table: &str, index: &str) -> Result<bool, StoreError> {
    schema_has(c, "statistics", "index_name", table, index)
}

/// Whether `information_schema.<view>` lists `name` (in its `field`) for `table` of this database.
fn schema_has(
    c: &mut PooledConn,
    view: &str,
    field: &str,
    table: &str,
    name: &str,
) -> Result<bool, StoreError> {
    let n: Option<u64> = c.exec_first(
        format!(
            "SELECT COUNT(*) FROM information_schema.{view} \
             WHERE table_schema = DATABASE() AND table_name = ? AND {field} = ?"
        ),
        (table, name),
    )?;
    Ok(n.unwrap_or(0) > 0)
}

/// Adds each `(name, ddl)` column `tasks` does not have yet.
fn add_task_columns(c: &mut PooledConn, columns: &[(&str, &str)]) -> Result<(), StoreError> {
    for (name, ddl) in columns {
        if !column_exists(c, "tasks", name)? {
            c.query_drop(format!("ALTER TABLE tasks ADD COLUMN {name} {ddl}"))?;
        }
    }
    Ok(())
}

/// An identity column's type of `len` under `exact` ([`exact_collation`]): bytes compared as bytes.
fn identity_type(exact: &Option<String>, len: u32) -> String {
    match exact {
        Some(collation) => format!("VARCHAR({len}) CHARACTER SET utf8mb4 COLLATE {collation}"),
        None => format!("VARBINARY({len})"),
    }
}

/// Columns qsysd adds to the seed's table, in order.
const TASK_COLUMNS: &[(&str, &str)] = &[
    ("payload", "MEDIUMTEXT NULL"),
    ("attempts", "INT NOT NULL DEFAULT 0"),
    ("max_attempts", "INT NULL"),
    ("timeout_s", "INT NULL"),
    ("error", "TEXT NULL"),
    ("created_at", "DATETIME(3) NULL"),
    (
        "updated_at",
        "DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)",
    ),
    ("dispatched_at", "DATETIME(3) NULL"),
    ("finished_at", "DATETIME(3) NULL"),
    ("deadline", "DATETIME(3) NULL"),
    ("instance_id", "VARCHAR(64) NULL"),
];

/// Indexes: the seed's three (same names) and the ones qsysd's queries need.
const TASK_INDEXES: &[(&str, &str)] = &[
    ("idx_tasks_state", "(state)"),
    ("idx_tasks_gpu_id", "(gpu_id)"),
    ("idx_tasks_type", "(type)"),
];

/// The steps from the recorded version up, under [`Store::migrate`]'s lock. A database newer
/// than this build is refused: this build would write rows that schema does not expect.
fn migrate_locked(c: &mut PooledConn) -> Result<u32, StoreError> {
    c.query_drop("CREATE TABLE IF NOT EXISTS qsys_schema (version INT NOT NULL) ENGINE=InnoDB")?;
    let current: Option<Option<u32>> = c.query_first("SELECT MAX(version) FROM qsys_schema")?;
    let current = current.flatten().unwrap_or(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Schema(format!(
            "database schema is version {current}, newer than this qsysd ({SCHEMA_VERSION}): \
             upgrade qsysd"
        )));
    }
    if current < 1 {
        migrate_v1(c)?;
    }
    if current < 2 {
        migrate_v2(c)?;
    }
    if current < 3 {
        migrate_v3(c)?;
    }
    if current < 4 {
        migrate_v4(c)?;
    }
    if current < 5 {
        migrate_v5(c)?;
    }
    if current < 6 {
        migrate_v6(c)?;
    }
    if current < 7 {
        migrate_v7(c)?;
    }
    if current < 8 {
        migrate_v8(c)?;
    }
    Ok(SCHEMA_VERSION)
}

/// Fewer index writes a task (issue 20): `idx_tasks_state_deadline (state, deadline)` moved twice
/// a task, at the claim and at the end, for the lease check alone, which reads only `processing`
/// rows: as many as there are slots and workers, found through `idx_tasks_state`. Dropping it
/// cut MariaDB's CPU a task by 4-15% (median 12%) in the benchmark (BENCHMARKS.md).
fn migrate_v8(c: &mut PooledConn) -> Result<(), StoreError> {
    if index_exists(c, "tasks", "idx_tasks_state_deadline")? {
        c.query_drop("ALTER TABLE tasks DROP INDEX idx_tasks_state_deadline")?;
    }
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (8)")?;
    Ok(())
}

/// Work-aware placement (issue 18): a task's work size, for the pools' backlog; the rows a busy
/// pool let go found by their type; each GPU's
/// learned speed, so that a restart or a peer does not start from nothing; each pool's backlog
/// and time to drain as an instance last saw it, for `qsys-push --wait`'s ETA (a producer reads
/// MySQL, not an instance's listener).
fn migrate_v7(c: &mut PooledConn) -> Result<(), StoreError> {
    add_task_columns(c, &[("cost", "DOUBLE NULL")])?;
    // The due index gains the type: the rows a busy pool let go wait at one due time, and are
    // woken by type, for the pool with room, without passing over the other pools' rows.
    widen_index(
        c,
        "idx_tasks_due",
        3,
        "(state, instance_id, not_before, type)",
    )?;
    let id = identity_type(&exact_collation(c)?, 64);
    c.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS gpu_speeds (
            gpu_id {id} NOT NULL PRIMARY KEY,
            speed DOUBLE NOT NULL,
            samples BIGINT NOT NULL,
            updated_at DATETIME(3) NOT NULL
        ) ENGINE=InnoDB"
    ))?;
    c.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS pool_stats (
            pool {id} NOT NULL PRIMARY KEY,
            backlog_cost DOUBLE NOT NULL,
            capacity DOUBLE NULL,
            drain_s DOUBLE NULL,
            types TEXT CHARACTER SET utf8mb4 NOT NULL,
            updated_at DATETIME(3) NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARACTER SET utf8mb4"
    ))?;
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (7)")?;
    Ok(())
}

/// Rebuilds index `name` of `tasks` as `after` if it still has its `before` column count (a step
/// that ran already, or an operator's own version of the index, is left alone).
fn widen_index(c: &mut PooledConn, name: &str, before: u64, after: &str) -> Result<(), StoreError> {
    let columns: Option<u64> = c.exec_first(
        "SELECT COUNT(*) FROM information_schema.statistics WHERE table_schema = DATABASE() \
         AND table_name = 'tasks' AND index_name = ?",
        (name,),
    )?;
    if columns == Some(before) {
        c.query_drop(format!(
            "ALTER TABLE tasks DROP INDEX {name}, ADD INDEX {name} {after}"
        ))?;
    }
    Ok(())
}

/// Running for months (issue 17): delayed tasks waiting held by nobody are found by their due
/// time (`idx_tasks_due`); paused queues and types; terminal counts rolled up into `task_totals`
/// up to the time in `task_totals_mark`, so counting costs the same with 100 rows or 100 million.
fn migrate_v6(c: &mut PooledConn) -> Result<(), StoreError> {
    if !index_exists(c, "tasks", "idx_tasks_due")? {
        c.query_drop("CREATE INDEX idx_tasks_due ON tasks (state, instance_id, not_before)")?;
    }
    // Two indexes gain the type, so that every count reads an index alone, never the rows: the
    // seed's (state), which keeps its name, for the tasks in flight (a backlog of delayed or
    // paused ones, say), and (state, finished_at) for the rollup and the rows since its mark.
    widen_index(c, "idx_tasks_state", 1, "(state, type)")?;
    widen_index(
        c,
        "idx_tasks_state_finished",
        2,
        "(state, finished_at, type)",
    )?;
    let exact = exact_collation(c)?;
    let id = |len: u32| identity_type(&exact, len);
    c.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS paused (
            kind VARCHAR(8) NOT NULL,
            name {} NOT NULL,
            paused_at DATETIME(3) NOT NULL,
            paused_by VARCHAR(128) CHARACTER SET utf8mb4 NULL,
            PRIMARY KEY (kind, name)
        ) ENGINE=InnoDB DEFAULT CHARACTER SET utf8mb4",
        id(255)
    ))?;
    c.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS task_totals (
            state VARCHAR(20) NOT NULL,
            type {} NOT NULL,
            n BIGINT NOT NULL,
            PRIMARY KEY (state, type)
        ) ENGINE=InnoDB DEFAULT CHARACTER SET utf8mb4",
        id(100)
    ))?;
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS task_totals_mark (
            id TINYINT NOT NULL PRIMARY KEY,
            through DATETIME(3) NOT NULL
        ) ENGINE=InnoDB",
    )?;
    c.query_drop(
        "INSERT IGNORE INTO task_totals_mark (id, through) VALUES (1, '1970-01-01 00:00:00')",
    )?;
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (6)")?;
    Ok(())
}

/// A task's life with the GPU (issue 16): a cancel asked of a running attempt, the attempt's
/// last heartbeat and progress, the lease end heartbeats never push past, and results (a table
/// of their own, so `tasks` rows stay narrow for the scans of `/status` and the sweeps).
fn migrate_v5(c: &mut PooledConn) -> Result<(), StoreError> {
    add_task_columns(
        c,
        &[
            ("cancel_requested_at", "DATETIME(3) NULL"),
            ("heartbeat_at", "DATETIME(3) NULL"),
            ("progress", "DOUBLE NULL"),
            (
                "progress_message",
                "VARCHAR(1000) CHARACTER SET utf8mb4 NULL",
            ),
            ("lease_until", "DATETIME(3) NULL"),
        ],
    )?;
    let id = identity_type(&exact_collation(c)?, 255);
    c.query_drop(format!(
        "CREATE TABLE IF NOT EXISTS task_results (
            task_id {id} NOT NULL PRIMARY KEY,
            result MEDIUMTEXT CHARACTER SET utf8mb4 NOT NULL,
            stored_at DATETIME(3) NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARACTER SET utf8mb4"
    ))?;
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (5)")?;
    Ok(())
}

/// The identity columns of every table, with their length: (table, column, length, nullable).
const IDENTITY_COLUMNS: &[(&str, &str, u32, bool)] = &[
    ("tasks", "task_id", 255, false),
    ("tasks", "queue", 255, true),
    ("tasks", "type", 100, true),
    ("tasks", "gpu_id", 64, true),
    ("tasks", "instance_id", 64, true),
    ("task_attempts", "task_id", 255, false),
    ("task_attempts", "gpu_id", 64, true),
    ("task_attempts", "instance_id", 64, true),
    ("gpu_slots", "gpu_id", 64, false),
    ("gpu_slots", "task_id", 255, true),
    ("gpu_slots", "instance_id", 64, true),
    ("gpu_state", "gpu_id", 64, false),
    ("gpu_state", "updated_by", 64, true),
    ("instances", "instance_id", 64, false),
];

/// The collation under which two identities are equal only when their bytes are: binary and
/// without padding (`utf8mb4_bin` is PAD SPACE: `'trail' = 'trail '`). MariaDB and MySQL 8 name it
/// differently; a server with neither gets `VARBINARY` columns.
fn exact_collation(c: &mut PooledConn) -> Result<Option<String>, StoreError> {
    let found: Vec<String> = c.query(
        "SELECT COLLATION_NAME FROM information_schema.COLLATIONS \
         WHERE COLLATION_NAME IN ('utf8mb4_nopad_bin', 'utf8mb4_0900_bin') \
         ORDER BY COLLATION_NAME DESC",
    )?;
    Ok(found.into_iter().next())
}

/// Exact identities (issue 13): task ids, GPU ids, queue, type and instance names compared as
/// bytes, as qsysd's own code compares them. Under the default case-insensitive, PAD SPACE
/// collations `Abc` after `abc` (or `trail ` after `trail`) was dropped as a duplicate and never
/// ran. Text columns become utf8mb4, so any Unicode a producer sends is stored, whatever the
/// server's or the seed table's default character set was.
fn migrate_v4(c: &mut PooledConn) -> Result<(), StoreError> {
    let exact = exact_collation(c)?;
    let identity = |len: u32, nullable: bool| {
        let ty = identity_type(&exact, len);
        format!("{ty} {}", if nullable { "NULL" } else { "NOT NULL" })
    };
    let mut tables: Vec<&str> = IDENTITY_COLUMNS.iter().map(|(t, ..)| *t).collect();
    tables.dedup();
    for table in tables {
        let mut changes: Vec<String> = IDENTITY_COLUMNS
            .iter()
            .filter(|(t, ..)| *t == table)
            .map(|(_, col, len, nullable)| format!("MODIFY `{col}` {}", identity(*len, *nullable)))
            .collect();
        for (t, col, ddl) in [
            ("tasks", "payload", "MEDIUMTEXT CHARACTER SET utf8mb4 NULL"),
            ("tasks", "error", "TEXT CHARACTER SET utf8mb4 NULL"),
            ("task_attempts", "error", "TEXT CHARACTER SET utf8mb4 NULL"),
        ] {
            if t == table {
                changes.push(format!("MODIFY `{col}` {ddl}"));
            }
        }
        c.query_drop(format!(
            "ALTER TABLE `{table}` DEFAULT CHARACTER SET utf8mb4, {}",
            changes.join(", ")
        ))?;
    }
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (4)")?;
    Ok(())
}

/// Operations: persisted drains, and requeues that keep the attempt history.
fn migrate_v3(c: &mut PooledConn) -> Result<(), StoreError> {
    add_task_columns(
        c,
        &[
            ("attempt_base", "INT NOT NULL DEFAULT 0"),
            ("requeues", "INT NOT NULL DEFAULT 0"),
        ],
    )?;
    if !index_exists(c, "tasks", "idx_tasks_state_finished")? {
        c.query_drop("CREATE INDEX idx_tasks_state_finished ON tasks (state, finished_at)")?;
    }
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS gpu_state (
            gpu_id VARCHAR(64) NOT NULL PRIMARY KEY,
            drained TINYINT NOT NULL DEFAULT 0,
            updated_at DATETIME(3) NOT NULL,
            updated_by VARCHAR(64) NULL
        ) ENGINE=InnoDB",
    )?;
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (3)")?;
    Ok(())
}

/// Retries, attempt history and instance heartbeats.
fn migrate_v2(c: &mut PooledConn) -> Result<(), StoreError> {
    add_task_columns(c, &[("not_before", "DATETIME(3) NULL")])?;
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS task_attempts (
            task_id VARCHAR(255) NOT NULL,
            attempt INT NOT NULL,
            gpu_id VARCHAR(64) NULL,
            slot_index INT NULL,
            instance_id VARCHAR(64) NULL,
            started_at DATETIME(3) NULL,
            ended_at DATETIME(3) NULL,
            outcome VARCHAR(20) NOT NULL,
            error TEXT NULL,
            PRIMARY KEY (task_id, attempt)
        ) ENGINE=InnoDB",
    )?;
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS instances (
            instance_id VARCHAR(64) NOT NULL PRIMARY KEY,
            started_at DATETIME(3) NOT NULL,
            heartbeat_at DATETIME(3) NOT NULL
        ) ENGINE=InnoDB",
    )?;
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (2)")?;
    Ok(())
}

/// The seed's table, widened and extended, and the slot table.
fn migrate_v1(c: &mut PooledConn) -> Result<(), StoreError> {
    // Version 1. The seed's DDL, verbatim in its columns, so an existing seed table is the same
    // starting point as an empty database.
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS tasks (
            task_id VARCHAR(255) PRIMARY KEY,
            queue VARCHAR(100),
            state VARCHAR(20),
            type VARCHAR(50),
            gpu_id VARCHAR(10),
            slot_index INT
        ) ENGINE=InnoDB",
    )?;
    // Widen what the seed made too narrow: endpoint ids up to 64, type names up to 100.
    c.query_drop(
        "ALTER TABLE tasks MODIFY queue VARCHAR(255) NULL, MODIFY type VARCHAR(100) NULL, \
         MODIFY gpu_id VARCHAR(64) NULL",
    )?;
    add_task_columns(c, TASK_COLUMNS)?;
    for (name, cols) in TASK_INDEXES {
        if !index_exists(c, "tasks", name)? {
            c.query_drop(format!("CREATE INDEX {name} ON tasks {cols}"))?;
        }
    }
    c.query_drop(
        "CREATE TABLE IF NOT EXISTS gpu_slots (
            gpu_id VARCHAR(64) NOT NULL,
            slot_index INT NOT NULL,
            task_id VARCHAR(255) NULL,
            attempt INT NULL,
            instance_id VARCHAR(64) NULL,
            claimed_at DATETIME(3) NULL,
            PRIMARY KEY (gpu_id, slot_index)
        ) ENGINE=InnoDB",
    )?;
    c.query_drop("INSERT INTO qsys_schema (version) VALUES (1)")?;
    Ok(())
}
