//! The log sink, chosen once at start by `daemon.log_target`:
//!
//! - `journal`: native journald entries with priorities, and every structured field (`task_id`,
//!   `gpu`, `queue`, ...) as a journal field (`TASK_ID=`, `GPU=`, `QUEUE=`), so
//!   `journalctl -u qsysd TASK_ID=...` traces one task;
//! - `stderr`: one line per record, `LEVEL target: message key=value ...`;
//! - `syslog`: the same line to the local syslog daemon (facility daemon);
//! - `auto` (default): `journal` when stderr is connected to the journal (running under systemd),
//!   else `stderr`.
//!
//! Library code only uses the `log` macros with key-values. Other crates' records are let through at
//! `warn` and above only: their debug output is noise to an operator and could carry request
//! headers. Installed once by the binary's `main`.
//!
//! What a record says is not trusted, whatever the target: a task id from a hostile callback or a
//! peer's slot event goes into a message or a field. So every sink writes each message, key and
//! value through `escape_controls`: a newline cannot start a forged line, an escape sequence
//! cannot repaint a terminal.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where log records go (`daemon.log_target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Auto,
    Journal,
    Stderr,
    Syslog,
}

impl std::str::FromStr for Target {
    type Err = ();
    fn from_str(s: &str) -> Result<Target, ()> {
        Ok(match s {
            "auto" => Target::Auto,
            "journal" => Target::Journal,
            "stderr" => Target::Stderr,
            "syslog" => Target::Syslog,
            _ => return Err(()),
        })
    }
}

/// Whether a record passes: ours at the configured level, other crates' at `warn` and above.
fn wanted(metadata: &Metadata<'_>) -> bool {
    let ours = metadata.target().starts_with("qsys");
    metadata.level() <= log::max_level() && (ours || metadata.level() <= Level::Warn)
}

/// What may not be written as it is: control characters, and the Unicode line and paragraph
/// separators that some viewers break lines at.
fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// `s` with `\n`, `\r` and `\t` written as those two characters and every other character of
/// [`needs_escape`] as `\u{..}`, so it stays on one line and cannot drive a terminal.
fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.contains(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

struct StderrLogger;

struct Fields<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let key = escape_controls(key.as_str());
        let v = value.to_string();
        // Quoted, Debug-escaped (controls included), when it could not be read back otherwise.
        if v.is_empty() || v.contains([' ', '"', '=']) || v.contains(needs_escape) {
            let _ = write!(self.0, " {key}={v:?}");
        } else {
            let _ = write!(self.0, " {key}={v}");
        }
        Ok(())
    }
}

/// Formats one record as the stderr line (without the newline): one line, whatever it carries.
pub fn format_record(record: &Record<'_>) -> String {
    let message = record.args().to_string();
    let mut line = format!(
        "{:<5} {}: {}",
        record.level(),
        record.target(),
        escape_controls(&message)
    );
    let _ = record.key_values().visit(&mut Fields(&mut line));
    line
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        wanted(metadata)
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

struct SyslogLogger(std::sync::Mutex<syslog::Logger<syslog::LoggerBackend, syslog::Formatter3164>>);

impl Log for SyslogLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        wanted(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format_record(record);
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = match record.level() {
            Level::Error => w.err(line),
            Level::Warn => w.warning(line),
            Level::Info => w.info(line),
            Level::Debug | Level::Trace => w.debug(line),
        };
    }

    fn flush(&self) {}
}

/// The journal logger with the same filter as the others.
struct JournalLogger(systemd_journal_logger::JournalLog);

impl Log for JournalLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        wanted(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // The same record with its message and fields cleaned; journald keeps the fields apart.
        struct Cleaned(Vec<(String, String)>);
        impl<'kvs> VisitSource<'kvs> for Cleaned {
            fn visit_pair(&mut self, k: Key<'kvs>, v: Value<'kvs>) -> Result<(), log::kv::Error> {
                self.0.push((
                    escape_controls(k.as_str()).into_owned(),
                    escape_controls(&v.to_string()).into_owned(),
                ));
                Ok(())
            }
        }
        let mut fields = Cleaned(Vec::new());
        let _ = record.key_values().visit(&mut fields);
        let fields: Vec<(&str, &str)> = fields
            .0
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let fields: &[(&str, &str)] = &fields;
        let message = record.args().to_string();
        self.0.log(
            &Record::builder()
                .metadata(record.metadata().clone())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .key_values(&fields)
                .args(format_args!("{}", escape_controls(&message)))
                .build(),
        );
    }

    fn flush(&self) {}
}

/// Installs the logger for `target` at `level`. Falls back to stderr (and says so there) when the
/// journal or syslog cannot be reached. A second call only changes the level.
pub fn init(target: Target, level: LevelFilter) {
    log::set_max_level(level);
    let journal = match target {
        Target::Auto => systemd_journal_logger::connected_to_journal(),
        Target::Journal => true,
        Target::Stderr | Target::Syslog => false,
    };
    let installed = if journal {
        match systemd_journal_logger::JournalLog::new() {
            Ok(j) => log::set_boxed_logger(Box::new(JournalLogger(
                j.with_syslog_identifier("qsysd".into()),
            )))
            .is_ok(),
            Err(e) => {
                eprintln!("qsysd: cannot log to the journal ({e}); logging to stderr");
                false
            }
        }
    } else if target == Target::Syslog {
        let formatter = syslog::Formatter3164 {
            facility: syslog::Facility::LOG_DAEMON,
            hostname: None,
            process: "qsysd".into(),
            pid: std::process::id(),
        };
        match syslog::unix(formatter) {
            Ok(w) => {
                log::set_boxed_logger(Box::new(SyslogLogger(std::sync::Mutex::new(w)))).is_ok()
            }
            Err(e) => {
                eprintln!("qsysd: cannot log to syslog ({e}); logging to stderr");
                false
            }
        }
    } else {
        false
    };
    if !installed {
        static LOGGER: StderrLogger = StderrLogger;
        let _ = log::set_logger(&LOGGER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!("journal".parse(), Ok(Target::Journal));
        assert_eq!("auto".parse(), Ok(Target::Auto));
        assert!("file".parse::<Target>().is_err());
    }

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

    #[test]
    fn controls_are_escaped() {
        assert_eq!(escape_controls("plain text é"), "plain text é");
        assert!(matches!(escape_controls("plain"), Cow::Borrowed(_)));
        assert_eq!(escape_controls("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(
            escape_controls("\u{1b}[31m\u{0}\u{7f}\u{85}\u{2028}\u{2029}"),
            "\\u{1b}[31m\\u{0}\\u{7f}\\u{85}\\u{2028}\\u{2029}"
        );
    }

    /// A field or a message from a hostile client cannot make a line of its own.
    #[test]
    fn a_record_is_one_line_whatever_it_carries() {
        let forged = "x\nERROR qsys::daemon: thread qsys-poller ended unexpectedly";
        for value in [
            forged,
            "x\nERROR\tqsys::daemon:forged",
            "x\r\u{1b}[2K\u{2028}y",
        ] {
            let kvs: &[(&str, &str)] = &[("task_id", value), ("attempt", "1")];
            let line = format_record(
                &Record::builder()
                    .level(log::Level::Warn)
                    .target("qsys::callback")
                    .args(format_args!("refused {value}"))
                    .key_values(&kvs)
                    .build(),
            );
            assert!(!line.contains(needs_escape), "{line:?}");
            assert!(
                line.starts_with("WARN  qsys::callback: refused x\\"),
                "{line}"
            );
            assert!(line.ends_with(" attempt=1"), "{line}");
            // The value reads back: quoted and escaped as Rust would.
            assert!(line.contains(&format!(" task_id={value:?} ")), "{line}");
        }
    }
}
