//! In-memory counters and histograms for `GET /metrics`, and the Prometheus text rendering.
//!
//! Every thread records into the one [`Metrics`] in [`crate::shared::Shared`] with relaxed atomics
//! (no lock on any hot path); the admin thread renders them on a scrape together with the gauges it
//! reads at that moment (slot matrix, queue depths, task counts from MySQL). Label sets are fixed
//! at compile time, so a scrape's size never grows with traffic.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A histogram with fixed bucket bounds, in seconds.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        // Buckets are stored non-cumulatively; rendering adds them up.
        if let Some(i) = self.bounds.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, n) in self.bounds.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

/// A counter with one fixed label.
#[derive(Debug)]
pub(crate) struct Labeled {
    label: &'static str,
    values: &'static [&'static str],
    counts: Vec<AtomicU64>,
}

impl Labeled {
    pub(crate) fn new(label: &'static str, values: &'static [&'static str]) -> Labeled {
        Labeled {
            label,
            values,
            counts: values.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Adds one for `value`; a value outside the fixed set is a programming error, ignored in
    /// release builds rather than crashing a daemon over a metric.
    pub(crate) fn inc(&self, value: &str) {
        match self.values.iter().position(|v| *v == value) {
            Some(i) => {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
            None => debug_assert!(false, "unknown metric label {value}"),
        }
    }

    pub(crate) fn get(&self, value: &str) -> u64 {
        self.values
            .iter()
            .position(|v| *v == value)
            .map(|i| self.counts[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (v, n) in self.values.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}{{{}=\"{v}\"}} {}",
                self.label,
                n.load(Ordering::Relaxed)
            );
        }
    }
}

/// Seconds: 5 ms to 30 min, for both the dispatch call and the whole life of a task.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// Seconds a task waited from its producer's stamp to its first dispatch: up to a day.
const WAIT_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 21600.0,
    86400.0,
];

/// Results of a callback, as the `result` label of `qsys_callbacks_total`.
pub(crate) const CALLBACK_RESULTS: &[&str] = &[
    "applied",
    "duplicate",
    "cancelled",
    "stale",
    "conflict",
    "unknown",
    "unauthorized",
    "malformed",
    "too_large",
    "unavailable",
];

/// Results of a heartbeat, as the `result` label of `qsys_heartbeats_total` (one that fails
/// its token or its parse counts in `qsys_callbacks_total`, before it is known to be one).
pub(crate) const HEARTBEAT_RESULTS: &[&str] = &[
    "applied",
    "cancelling",
    "stale",
    "conflict",
    "unknown",
    "unavailable",
];

/// Who claimed a GPU slot, as the `by` label of `qsys_slot_claims_total`: the scheduler's round,
/// the ending that freed it (its transaction claimed it for the next task), or the record of a
/// task that found it free.
pub(crate) const CLAIMED_BY: &[&str] = &["scheduler", "ending", "intake"];

/// What operators' cancels found, as the `result` label of `qsys_cancels_total`.
pub(crate) const CANCEL_RESULTS: &[&str] = &["cancelled", "requested", "terminal"];

#[derive(Debug)]
pub(crate) struct Metrics {
    pub dispatch_seconds: Histogram,
    pub task_seconds: Histogram,
    pub queue_wait_seconds: Histogram,
    pub callbacks: Labeled,
    pub heartbeats: Labeled,
    pub cancels: Labeled,
    pub attempts: Labeled,
    pub retries: AtomicU64,
    /// GPU slots claimed, by who claimed them (the transaction that did): the scheduler's
    /// round, an ending handing its slot over, or the record of a task that found one free.
    pub claims: Labeled,
    pub errors: Labeled,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            dispatch_seconds: Histogram::new(BUCKETS),
            task_seconds: Histogram::new(BUCKETS),
            queue_wait_seconds: Histogram::new(WAIT_BUCKETS),
            callbacks: Labeled::new("result", CALLBACK_RESULTS),
            heartbeats: Labeled::new("result", HEARTBEAT_RESULTS),
            cancels: Labeled::new("result", CANCEL_RESULTS),
            attempts: Labeled::new("outcome", &["finished", "failed", "expired", "cancelled"]),
            retries: AtomicU64::new(0),
            claims: Labeled::new("by", CLAIMED_BY),
            errors: Labeled::new("kind", crate::obs::trouble::Trouble::LABELS),
        }
    }
}

impl Metrics {
    /// The counters and histograms in Prometheus text format.
    pub(crate) fn render(&self, out: &mut String) {
        self.dispatch_seconds.render(
            "qsys_dispatch_duration_seconds",
            "Time of one dispatch call to a GPU endpoint.",
            out,
        );
        self.task_seconds.render(
            "qsys_task_duration_seconds",
            "Time from a task being taken to its terminal state.",
            out,
        );
        self.queue_wait_seconds.render(
            "qsys_queue_wait_seconds",
            "Time from a task's enqueued_at (stamped by qsys-push) to its first dispatch.",
            out,
        );
        self.callbacks.render(
            "qsys_callbacks_total",
            "Callbacks received, by result.",
            out,
        );
        self.heartbeats.render(
            "qsys_heartbeats_total",
            "Heartbeats (running callbacks) received, by result.",
            out,
        );
        self.cancels.render(
            "qsys_cancels_total",
            "Cancels asked of this instance's admin API, by what they found.",
            out,
        );
        self.attempts
            .render("qsys_attempts_total", "Attempts ended, by outcome.", out);
        let _ = writeln!(
            out,
            "# HELP qsys_retries_total Attempts that were scheduled again.\n\
             # TYPE qsys_retries_total counter\nqsys_retries_total {}",
            self.retries.load(Ordering::Relaxed)
        );
        self.claims.render(
            "qsys_slot_claims_total",
            "GPU slots claimed, by the transaction that claimed them.",
            out,
        );
        self.errors
            .render("qsys_errors_total", "Errors met, by kind.", out);
    }
}

/// Escapes a label value for the text format.
pub(crate) fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let mut out = String::new();
        h.render("x", "help", &mut out);
        assert!(out.contains("x_bucket{le=\"0.1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"1\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(
            out.contains("x_sum 5.55\n") && out.contains("x_count 3"),
            "{out}"
        );
    }

    #[test]
    fn labeled_counters() {
        let m = Metrics::default();
        m.callbacks.inc("applied");
        m.callbacks.inc("applied");
        m.callbacks.inc("stale");
        assert_eq!(m.callbacks.get("applied"), 2);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("qsys_callbacks_total{result=\"applied\"} 2"));
        assert!(out.contains("qsys_callbacks_total{result=\"stale\"} 1"));
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
