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
//! value through `clean`: control characters are escaped (a newline cannot start a forged line,
//! an escape sequence cannot repaint a terminal), and URL passwords are hidden
//! ([`redact_urls`]), the safety net under the callers that redact the URLs they know.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write;

use log::kv::{Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};

use crate::sync::Locked;

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

/// `text` with the password of every URL in it replaced by `***`: `redis://:***@host`,
/// `mysql://user:***@host/db`. A URL ends at white space or a quote. Where a password holding a
/// raw `/`, `?` or `#` leaves no telling where the user part ends, all of it up to the URL's last
/// `@` is hidden.
pub(crate) fn redact_urls(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .unwrap_or(rest.len());
        out.push_str(&redact_after_scheme(&rest[..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// `url` with its password replaced by `***`, for a value known to be one URL (a config value,
/// white space and all). Without `://`, all of it up to its last `@` is hidden.
pub(crate) fn redact_url(url: &str) -> Cow<'_, str> {
    match url.find("://") {
        Some(i) => match redact_after_scheme(&url[i + 3..]) {
            Cow::Borrowed(_) => Cow::Borrowed(url),
            Cow::Owned(rest) => Cow::Owned(format!("{}{rest}", &url[..i + 3])),
        },
        None => match url.rfind('@') {
            Some(at) => Cow::Owned(format!("***{}", &url[at..])),
            None => Cow::Borrowed(url),
        },
    }
}

/// What follows a URL's `://`, its password hidden.
fn redact_after_scheme(url: &str) -> Cow<'_, str> {
    // Where the authority ends for the URL parser; its last `@` ends the user part.
    let authority = &url[..url.find(['/', '?', '#', '\\']).unwrap_or(url.len())];
    match (authority.rfind('@'), url.rfind('@')) {
        (Some(at), _) => match authority[..at].find(':') {
            Some(colon) => Cow::Owned(format!("{}:***{}", &url[..colon], &url[at..])),
            // A user name alone is no secret.
            None => Cow::Borrowed(url),
        },
        // No user part where a URL has one, and no host and port there either: a password with a
        // `/`, `?` or `#` cut the authority short.
        (None, Some(at)) if !is_host_port(authority) => Cow::Owned(format!("***{}", &url[at..])),
        (None, _) => Cow::Borrowed(url),
    }
}

/// `host`, `host:port` or `[v6]:port`, the port digits only.
fn is_host_port(s: &str) -> bool {
    let (host, port) = match s.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, rest)) if rest.is_empty() || rest.starts_with(':') => {
                (host, rest.trim_start_matches(':'))
            }
            _ => return false,
        },
        None => s.split_once(':').unwrap_or((s, "")),
    };
    !host.is_empty() && port.chars().all(|c| c.is_ascii_digit())
}

/// A message, key or value as a sink may write it: URL passwords hidden, controls escaped.
fn clean(s: &str) -> Cow<'_, str> {
    match redact_urls(s) {
        Cow::Borrowed(s) => escape_controls(s),
        Cow::Owned(s) => Cow::Owned(escape_controls(&s).into_owned()),
    }
}

struct StderrLogger;

struct Fields<'a>(&'a mut String);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let key = clean(key.as_str());
        let value = value.to_string();
        let v = redact_urls(&value);
        // Quoted, Debug-escaped (controls included), when it could not be read back otherwise.
        if v.is_empty() || v.contains([' ', '"', '=']) || v.contains(needs_escape) {
            let _ = write!(self.0, " {key}={v:?}");
        } else {
            let _ = write!(self.0, " {key}={v}");
        }
        Ok(())
    }
}

/// The component each module logs as: the names log lines carried before the module tree was
/// arranged by role, kept so that what operators grep for (`qsys::callback`, `qsys::queue`) does
/// not change with the tree. The longest matching prefix wins.
const COMPONENTS: &[(&str, &str)] = &[
    ("admin::ops", "ops"),
    ("admin", "admin"),
    ("config", "config"),
    ("contract::message", "message"),
    ("contract::token", "token"),
    ("daemon::notify", "notify"),
    ("daemon", "daemon"),
    ("fleet", "slots"),
    ("net::backoff", "backoff"),
    ("net::http", "http"),
    ("net::redis", "redis"),
    ("net::server", "listener"),
    ("obs::logging", "logging"),
    ("obs::metrics", "metrics"),
    ("producer::events", "events"),
    ("producer::follow", "follow"),
    ("producer::lambda", "lambda"),
    ("producer::push", "push"),
    ("sched::scheduler", "scheduler"),
    ("sched::slotsync", "slotsync"),
    ("shared::shutdown", "shutdown"),
    ("shared", "shared"),
    ("store", "store"),
    ("work::callback", "callback"),
    ("work::dispatch", "dispatch"),
    ("work::handlers", "handlers"),
    ("work::maintenance", "maintenance"),
    ("work::poller", "queue"),
];

/// The name a record's target goes by in a line: `qsys::` and its component ([`COMPONENTS`]),
/// e.g. `qsys::work::callback::server` is `qsys::callback`. Other crates' targets are kept.
fn component(target: &str) -> Cow<'_, str> {
    let Some(path) = target.strip_prefix("qsys::") else {
        return target.into();
    };
    let within = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    };
    match COMPONENTS
        .iter()
        .filter(|(prefix, _)| within(prefix))
        .max_by_key(|(prefix, _)| prefix.len())
    {
        Some((_, name)) => format!("qsys::{name}").into(),
        None => target.into(),
    }
}

/// Formats one record as the stderr line (without the newline): one line, whatever it carries.
pub(crate) fn format_record(record: &Record<'_>) -> String {
    let message = record.args().to_string();
    let mut line = format!(
        "{:<5} {}: {}",
        record.level(),
        component(record.target()),
        clean(&message)
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
        let mut w = self.0.locked();
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
                    clean(k.as_str()).into_owned(),
                    clean(&v.to_string()).into_owned(),
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
                .args(format_args!("{}", clean(&message)))
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
    fn lines_name_the_component_not_the_module_path() {
        for (target, shown) in [
            ("qsys::work::callback::server", "qsys::callback"),
            ("qsys::work::callback", "qsys::callback"),
            ("qsys::work::poller", "qsys::queue"),
            ("qsys::daemon::build", "qsys::daemon"),
            ("qsys::daemon::notify", "qsys::notify"),
            ("qsys::store::endings", "qsys::store"),
            ("qsys::admin::ops", "qsys::ops"),
            ("qsys::fleet::placement", "qsys::slots"),
            ("qsys::storex", "qsys::storex"),
            ("qsys", "qsys"),
            ("ureq::unit", "ureq::unit"),
        ] {
            assert_eq!(component(target), shown, "{target}");
        }
    }

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

    #[test]
    fn url_passwords_are_hidden() {
        for (url, shown) in [
            ("redis://:secret@host:6379/0", "redis://:***@host:6379/0"),
            ("rediss://user:secret@host/0", "rediss://user:***@host/0"),
            (
                "mysql://app:p%40ss@db.internal:3307/qs",
                "mysql://app:***@db.internal:3307/qs",
            ),
            ("https://u:pw@h/p?q=1#f", "https://u:***@h/p?q=1#f"),
            ("http://u:a@b@h/", "http://u:***@h/"),
            ("http://[::1]:80/x", "http://[::1]:80/x"),
            // Not parseable, password and all: everything up to the last @ goes.
            ("redis://:pa/ss@host:1/0", "redis://***@host:1/0"),
            ("redis://:pa?ss#x@host", "redis://***@host"),
            ("redis://:sec ret@host", "redis://:***@host"),
            ("user:pw@host", "***@host"),
            // Nothing to hide.
            (
                "mysql://root@127.0.0.1:3306/queue_system",
                "mysql://root@127.0.0.1:3306/queue_system",
            ),
            ("http://host:8080/users/@me", "http://host:8080/users/@me"),
            ("http://h/?mail=a@b.c", "http://h/?mail=a@b.c"),
            ("localhost", "localhost"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        assert_eq!(
            redact_urls("cannot connect to redis://:secret@h:1/0 (refused); \"mysql://u:pw@db/q\""),
            "cannot connect to redis://:***@h:1/0 (refused); \"mysql://u:***@db/q\""
        );
        assert_eq!(
            redact_urls("3 | url = \"redis://:secret@host\n  |       ^"),
            "3 | url = \"redis://:***@host\n  |       ^"
        );
        assert_eq!(redact_urls("no url here: a@b"), "no url here: a@b");
        let once = redact_urls("x redis://:secret@h y").into_owned();
        assert_eq!(redact_urls(&once), once, "idempotent");
        assert_eq!(clean("a\nredis://:pw@h b"), "a\\nredis://:***@h b");
    }

    #[test]
    fn logged_urls_hide_their_password() {
        let kvs: &[(&str, &str)] = &[("url", "redis://:hunter2@h:1/0")];
        let record = Record::builder()
            .level(log::Level::Error)
            .target("qsys::queue")
            .args(format_args!("lost mysql://u:hunter2@db/q"))
            .key_values(&kvs)
            .build();
        let line = format_record(&record);
        assert!(!line.contains("hunter2"), "{line}");
        assert!(
            line.contains("redis://:***@h:1/0") && line.contains("mysql://u:***@db/q"),
            "{line}"
        );
    }
}
