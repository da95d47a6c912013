//! The log sink: one line per record on stderr, `LEVEL target: message key=value ...`.
//!
//! Structured fields (`task_id`, `gpu`, `queue`, ...) are passed as `log` key-values so that a journald
//! backend can turn them into journal fields; on stderr they are appended in `key=value` form, which
//! is still greppable by task id. Installed once by the binary's `main`; library code only uses the
//! `log` macros.

use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

struct Fields<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        use std::fmt::Write;
        let v = value.to_string();
        if v.is_empty() || v.contains([' ', '"', '=']) {
            let _ = write!(self.0, " {key}={v:?}");
        } else {
            let _ = write!(self.0, " {key}={v}");
        }
        Ok(())
    }
}

/// Formats one record as the stderr line (without the newline).
pub fn format_record(record: &Record<'_>) -> String {
    let mut line = format!(
        "{:<5} {}: {}",
        record.level(),
        record.target(),
        record.args()
    );
    let _ = record.key_values().visit(&mut Fields(&mut line));
    line
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = format_record(record);
        line.push('\n');
        // One write per line keeps lines from different threads whole.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the stderr logger at `level`. A second call only changes the level.
pub fn init(level: LevelFilter) {
    static LOGGER: StderrLogger = StderrLogger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_appended() {
        let kvs: &[(&str, &str)] = &[("task_id", "t-1"), ("error", "connection refused")];
        let args = format_args!("dispatch failed");
        let record = Record::builder()
            .level(log::Level::Warn)
            .target("qsys::dispatch")
            .args(args)
            .key_values(&kvs)
            .build();
        assert_eq!(
            format_record(&record),
            "WARN  qsys::dispatch: dispatch failed task_id=t-1 error=\"connection refused\""
        );
    }
}
