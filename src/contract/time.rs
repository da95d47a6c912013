//! Times that arrive from outside: a message's `run_at` and `enqueued_at`, `qsys-push --at`. Unix
//! seconds, or RFC 3339 (`2026-12-01T14:30:00Z`, `2026-12-01T15:30:00.250+01:00`), parsed here
//! without a calendar library: the proleptic Gregorian day count is a few lines, and pure.

/// The latest time accepted: the end of 9999, MySQL's last `DATETIME`.
pub(crate) const MAX_UNIX: f64 = 253_402_300_799.0;

/// A point in time as Unix seconds: a number, or an RFC 3339 string. Out of 0..=[`MAX_UNIX`] or
/// not a time is an error saying so.
pub(crate) fn unix_seconds(v: &serde_json::Value) -> Result<f64, String> {
    let t = match v {
        serde_json::Value::Number(n) => n.as_f64().ok_or("not a number")?,
        serde_json::Value::String(s) => parse_rfc3339(s)?,
        _ => return Err("expected Unix seconds or an RFC 3339 time".into()),
    };
    if !t.is_finite() || !(0.0..=MAX_UNIX).contains(&t) {
        return Err(format!("{t} is out of range (1970 to 9999)"));
    }
    Ok(t)
}

/// Days from 1970-01-01 to `y-m-d` (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` (a space or `t` for the `T`, `z` for `Z`) as Unix
/// seconds.
pub(crate) fn parse_rfc3339(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?} is not an RFC 3339 time (like 2026-12-01T14:30:00Z)");
    let b = s.as_bytes();
    if b.len() < 20 || !b.is_ascii() {
        return Err(bad());
    }
    let num = |from: usize, to: usize| -> Result<i64, String> {
        let part = &s[from..to];
        if part.bytes().all(|c| c.is_ascii_digit()) {
            part.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let sep_ok = b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[16] == b':';
    if !sep_ok {
        return Err(bad());
    }
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 60
    {
        return Err(bad());
    }
    let mut i = 19;
    let mut fraction = 0.0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(bad());
        }
        fraction = format!("0.{}", &s[start..i]).parse().map_err(|_| bad())?;
    }
    let offset = match &s[i..] {
        "Z" | "z" => 0,
        o if o.len() == 6 && matches!(o.as_bytes()[0], b'+' | b'-') && o.as_bytes()[3] == b':' => {
            let (oh, om) = (num(i + 1, i + 3)?, num(i + 4, i + 6)?);
            if oh > 23 || om > 59 {
                return Err(bad());
            }
            let sign = if o.as_bytes()[0] == b'-' { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return Err(bad()),
    };
    // A leap second counts as the next second's start.
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Ok(secs as f64 + fraction)
}

/// Now, as Unix seconds.
pub(crate) fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0.0));
        assert_eq!(parse_rfc3339("2026-12-01T14:30:00Z"), Ok(1_796_135_400.0));
        assert_eq!(
            parse_rfc3339("2026-12-01T15:30:00+01:00"),
            Ok(1_796_135_400.0)
        );
        assert_eq!(
            parse_rfc3339("2026-12-01 09:30:00-05:00"),
            Ok(1_796_135_400.0)
        );
        assert_eq!(
            parse_rfc3339("2000-02-29T00:00:00.250z"),
            Ok(951_782_400.25)
        );
        assert_eq!(parse_rfc3339("9999-12-31T23:59:59Z"), Ok(MAX_UNIX));
        for bad in [
            "",
            "2026-12-01",
            "2026-12-01T14:30:00",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T14:30:00.Z",
            "2026-12-01T14:30:00+0100",
            "2026-12-01T14:30:00+01:60",
            "２026-12-01T14:30:00Z",
            "2026/12/01T14:30:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unix_seconds_from_numbers_and_strings() {
        assert_eq!(unix_seconds(&json!(1_796_135_400)), Ok(1_796_135_400.0));
        assert_eq!(unix_seconds(&json!(1.5)), Ok(1.5));
        assert_eq!(unix_seconds(&json!("1970-01-01T00:00:01Z")), Ok(1.0));
        assert!(unix_seconds(&json!(-1)).is_err());
        assert!(unix_seconds(&json!(1e300)).is_err());
        assert!(unix_seconds(&json!(true)).is_err());
        assert!(unix_seconds(&json!("tomorrow")).is_err());
    }
}
