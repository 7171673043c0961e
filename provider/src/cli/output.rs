//! How the CLI prints: aligned tables, dates and ages of unix-ms times, durations of
//! milliseconds, and the `--json` views.

use std::time::Duration;

use serde::Serialize;

use super::CliError;
use crate::policy::human_duration;

/// Prints a view as pretty JSON (the `--json` output of every command).
pub fn print_json<T: Serialize + ?Sized>(view: &T) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(view).map_err(|e| CliError::Output(e.to_string()))?;
    println!("{s}");
    Ok(())
}

/// A duration of milliseconds as `policy list` shows it ("5m", "1d"); 0 → "-".
pub fn ms(d: u64) -> String {
    if d == 0 { "-".into() } else { human_duration(Duration::from_millis(d)) }
}

/// "2025-01-31 22:00:05 UTC" for a unix-ms time (0, or out of the calendar's range → "-").
pub fn utc(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    match time::OffsetDateTime::from_unix_timestamp(unix_ms.div_euclid(1000)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => "-".into(),
    }
}

/// "12s ago" style age of a unix-ms timestamp.
pub fn age(unix_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".into();
    }
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let s = (now - unix_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// "2026-12-03 (in 3d)" or "2026-12-03 (expired)": a certificate's expiry (0 → "-").
pub fn expiry(unix_ms: i64) -> String {
    expiry_at(unix_ms, now_ms())
}

/// [`expiry`] as seen at `now_ms`.
pub fn expiry_at(unix_ms: i64, now_ms: i64) -> String {
    if unix_ms <= 0 {
        return "-".into();
    }
    let date: String = utc(unix_ms).chars().take(10).collect();
    let s = (unix_ms - now_ms) / 1000;
    let left = match s {
        ..=0 => return format!("{date} (expired)"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    };
    format!("{date} (in {left})")
}

/// Prints rows as an aligned table with a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(|s| s.as_str()).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "-");
        assert_eq!(utc(951_868_800_000), "2000-03-01 00:00:00 UTC");
        assert_eq!(utc(1_738_360_805_000), "2025-01-31 22:00:05 UTC");
        assert_eq!(utc(1_738_360_805_999), "2025-01-31 22:00:05 UTC");
        assert_eq!(utc(i64::MAX), "-");
    }

    #[test]
    fn ages() {
        assert_eq!(age(0), "never");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        assert_eq!(age(now - 2 * 3600 * 1000 - 5), "2h ago");
        assert_eq!(age(now - 3 * 86400 * 1000), "3d ago");
    }

    #[test]
    fn expiries() {
        let t = 1_738_360_805_000; // 2025-01-31 22:00:05 UTC
        assert_eq!(expiry_at(0, t), "-");
        assert_eq!(expiry_at(t + 3 * 86_400_000 + 5, t), "2025-02-03 (in 3d)");
        assert_eq!(expiry_at(t + 5 * 3_600_000, t), "2025-02-01 (in 5h)");
        assert_eq!(expiry_at(t + 90_000, t), "2025-01-31 (in 1m)");
        assert_eq!(expiry_at(t + 30_000, t), "2025-01-31 (in 30s)");
        assert_eq!(expiry_at(t, t), "2025-01-31 (expired)");
        assert_eq!(expiry_at(t - 86_400_000, t), "2025-01-30 (expired)");
    }

    #[test]
    fn durations_of_milliseconds() {
        assert_eq!(ms(0), "-");
        assert_eq!(ms(300_000), "5m");
    }
}
