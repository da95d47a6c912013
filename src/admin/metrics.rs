//! The `/metrics` exposition: gauges read at scrape time (task counts, queue depths, the slot
//! matrix) and then the counters and histograms of [`crate::obs::metrics`].

use std::fmt::Write;

use crate::fleet::Health;
use crate::obs::metrics::label;
use crate::shared::Shared;
use crate::sync::Locked;

/// Reads one per-GPU number off a slot-matrix row.
type GpuGauge = fn(&crate::fleet::GpuView) -> u64;

/// Counts with a type label only for the configured types: any other a producer ever sent is
/// one `other`, so the label set is bounded by the config, not by the queues' history.
fn bounded_types(
    counts: crate::store::Counts,
    config: &crate::config::Config,
) -> std::collections::BTreeMap<(String, String), u64> {
    let mut out = std::collections::BTreeMap::new();
    for ((state, kind), n) in counts {
        let kind = if config.types.contains_key(&kind) {
            kind
        } else {
            "other".to_string()
        };
        *out.entry((state, kind)).or_insert(0) += n;
    }
    out
}

/// The `/metrics` document.
pub(crate) fn metrics(shared: &Shared) -> String {
    let mut out = String::new();
    out.push_str("# HELP qsys_tasks Tasks in MySQL, by state and type.\n# TYPE qsys_tasks gauge\n");
    if let Ok(counts) = shared.store.counts() {
        for ((state, kind), n) in bounded_types(counts, &shared.config()) {
            let _ = writeln!(
                out,
                "qsys_tasks{{state=\"{}\",type=\"{}\"}} {n}",
                label(&state),
                label(&kind)
            );
        }
    }
    out.push_str(
        "# HELP qsys_queue_depth Tasks waiting in a Redis queue.\n# TYPE qsys_queue_depth gauge\n",
    );
    for (q, n) in shared.queue_depths.locked().iter() {
        let _ = writeln!(out, "qsys_queue_depth{{queue=\"{}\"}} {n}", label(q));
    }
    out.push_str(
        "# HELP qsys_queue_oldest_seconds Age of the task at the head of a Redis queue: from its \
         enqueued_at, else from when this instance first saw it there.\n\
         # TYPE qsys_queue_oldest_seconds gauge\n",
    );
    for (q, age) in shared.queue_ages.locked().iter() {
        let _ = writeln!(
            out,
            "qsys_queue_oldest_seconds{{queue=\"{}\"}} {age:.3}",
            label(q)
        );
    }
    let paused = shared.paused();
    out.push_str(
        "# HELP qsys_queue_paused 1 for a paused queue.\n# TYPE qsys_queue_paused gauge\n",
    );
    for q in &shared.config().redis.queues {
        let on = u8::from(paused.queues.contains(q));
        let _ = writeln!(out, "qsys_queue_paused{{queue=\"{}\"}} {on}", label(q));
    }
    out.push_str(
        "# HELP qsys_type_paused 1 for a paused task type.\n# TYPE qsys_type_paused gauge\n",
    );
    for t in shared.config().types.keys() {
        let on = u8::from(paused.types.contains(t));
        let _ = writeln!(out, "qsys_type_paused{{type=\"{}\"}} {on}", label(t));
    }
    gpus(&shared.slots().view(), &mut out);
    pools(shared, &mut out);
    shared.metrics.render(&mut out);
    out
}

/// The per-GPU gauges and counters of the slot matrix's rows.
fn gpus(view: &[crate::fleet::GpuView], out: &mut String) {
    let gauges: [(&str, &str, GpuGauge); 4] = [
        ("qsys_gpu_slots", "Configured slots of a GPU.", |g| {
            g.slots as u64
        }),
        (
            "qsys_gpu_slots_busy",
            "Slots of a GPU running a task.",
            |g| g.cells.iter().filter(|c| c.is_some()).count() as u64,
        ),
        (
            "qsys_gpu_up",
            "1 when a GPU takes work (up and not drained).",
            |g| u64::from(g.health == Health::Up && !g.drained && !g.retired),
        ),
        ("qsys_gpu_dispatches_total", "Dispatches to a GPU.", |g| {
            g.dispatched
        }),
    ];
    for (name, help, f) in gauges {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for g in view {
            let _ = writeln!(out, "{name}{{gpu=\"{}\"}} {}", label(&g.id), f(g));
        }
    }
    out.push_str(
        "# HELP qsys_gpu_speed A GPU's learned speed: cost units per second of wall time per \
         attempt (absent while unknown).\n# TYPE qsys_gpu_speed gauge\n",
    );
    for g in view {
        if let Some(speed) = g.speed {
            let _ = writeln!(out, "qsys_gpu_speed{{gpu=\"{}\"}} {speed}", label(&g.id));
        }
    }
}

/// Each pool's backlog and time to drain: what an autoscaler scales on (README).
fn pools(shared: &Shared, out: &mut String) {
    let pools = shared.pools.locked().clone();
    out.push_str(
        "# HELP qsys_backlog_cost Work a pool has not done yet, in cost units: running, pending \
         in MySQL and waiting in Redis.\n# TYPE qsys_backlog_cost gauge\n",
    );
    for d in &pools {
        let pool = label(&d.view.pool);
        let _ = writeln!(
            out,
            "qsys_backlog_cost{{pool=\"{pool}\"}} {}",
            d.backlog_cost
        );
    }
    out.push_str(
        "# HELP qsys_time_to_drain_seconds A pool's backlog over its learned capacity (absent \
         while no speed is known).\n# TYPE qsys_time_to_drain_seconds gauge\n",
    );
    for d in &pools {
        if let Some(s) = d.drain_s {
            let pool = label(&d.view.pool);
            let _ = writeln!(out, "qsys_time_to_drain_seconds{{pool=\"{pool}\"}} {s:.3}");
        }
    }
    out.push_str(
        "# HELP qsys_pool_capacity A pool's learned capacity: cost units per second with every \
         usable slot of its GPUs up busy.\n# TYPE qsys_pool_capacity gauge\n",
    );
    for d in &pools {
        if let Some(c) = d.view.capacity {
            let pool = label(&d.view.pool);
            let _ = writeln!(out, "qsys_pool_capacity{{pool=\"{pool}\"}} {c}");
        }
    }
}
