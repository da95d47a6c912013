//! Durations as the config file writes them: a whole number and one unit (`250ms`, `30s`, `5m`,
//! `2h`, `1d`).

use std::time::Duration;

use super::{invalid, ConfigError};

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"2h"`, `"1d"`: a whole number and one unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| "missing unit (use ms, s, m, h or d)".to_string())?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err("expected a whole number followed by ms, s, m, h or d".into());
    }
    let n: u64 = num.parse().map_err(|_| "number too large".to_string())?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => return Err(format!("unknown unit {unit:?} (use ms, s, m, h or d)")),
    }
    .ok_or_else(|| "duration too large".to_string())?;
    Ok(Duration::from_millis(ms))
}

/// The inverse of [`parse_duration`], for summaries: the largest unit that divides exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// A span for people, to the second: `45s`, `3m20s`, `2h05m` (an ETA, a time to drain).
pub(crate) fn format_span(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The duration at `key` (`default` when unset): positive, or an error naming the key.
pub(super) fn duration(
    key: &str,
    value: Option<&String>,
    default: &str,
) -> Result<Duration, ConfigError> {
    let v = value.map(String::as_str).unwrap_or(default);
    let d = parse_duration(v).map_err(|reason| invalid(key, v, reason))?;
    if d.is_zero() {
        return Err(invalid(key, v, "must be greater than zero"));
    }
    Ok(d)
}

/// `key`'s duration for a feature that is off unless set: absent or `"0"` is `None`.
pub(super) fn optional_duration(
    key: &str,
    value: Option<&String>,
) -> Result<Option<Duration>, ConfigError> {
    match value.map(String::as_str) {
        None | Some("0") => Ok(None),
        Some(_) => duration(key, value, "").map(Some),
    }
}
