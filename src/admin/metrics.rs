//! The `/metrics` exposition: gauges read at scrape time (task counts, queue depths, the slot
//! matrix) and then the counters and histograms of [`crate::obs::metrics`].

use std::fmt::Write;

use crate::fleet::Health;
use crate::obs::metrics::label;
use crate::shared::Shared;
use crate::sync::Locked;

/// Reads one per-GPU number off a slot-matrix row.
type GpuGauge = fn(&crate::fleet::GpuView) -> u64;

/// The `/metrics` document.
pub(crate) fn metrics(shared: &Shared) -> String {
    let mut out = String::new();
    out.push_str("# HELP qsys_tasks Tasks in MySQL, by state and type.\n# TYPE qsys_tasks gauge\n");
    if let Ok(rows) = shared.store.counts() {
        for (state, kind, n) in rows {
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
    let view = shared.slots().view();
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
        for g in &view {
            let _ = writeln!(out, "{name}{{gpu=\"{}\"}} {}", label(&g.id), f(g));
        }
    }
    shared.metrics.render(&mut out);
    out
}
