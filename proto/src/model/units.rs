//! The operator's grammar for sizes and durations, the one both binaries parse flags
//! with, and the size the provider's messages and the CLI print.
//!
//! - Sizes: bytes (`1048576`), or a whole number with a binary unit `K`, `M`, `G`, `T`
//!   (case-insensitive; `B` = bytes): `10G`, `512m`.
//! - Durations: a whole number with a unit `ms`, `s`, `m`, `h` or `d` (a bare number is
//!   seconds), or several of them in a row: `30s`, `5m`, `24h`, `5d`, `1h30m`, `500ms`.
//!   Other units (weeks, months) are refused rather than guessed: policies and
//!   certificates are stated in days.
//!
//! A hand-written parser rather than a crate such as humantime: that grammar is wider
//! (weeks, months, years, spaces) than what the documentation promises, and widening
//! what the flags accept is a change of the product.

use std::time::Duration;

/// A size or duration the grammar refuses; the message names the input and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("{0:?} is not a size (e.g. 10G, 512M, 1048576)")]
    NotASize(String),
    #[error("{input:?}: unknown size suffix {suffix:?} (use K, M, G or T)")]
    SizeSuffix { input: String, suffix: char },
    #[error("{0:?} is not a duration (e.g. 30s, 5m, 24h, 5d)")]
    NotADuration(String),
    #[error("{input:?}: unknown duration unit {unit:?} (use s, m, h or d)")]
    DurationUnit { input: String, unit: String },
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a size: bytes, or a number with K/M/G/T (binary units), e.g. `10G`, `512M`.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(UnitError::SizeSuffix { input: s.into(), suffix: c }),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| UnitError::NotASize(s.into()))?;
    n.checked_mul(mult).ok_or_else(|| UnitError::TooLarge(s.into()))
}

/// Parses a duration: `30s`, `5m`, `24h`, `5d`, `500ms`, `1h30m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let s = s.trim();
    let not_one = || UnitError::NotADuration(s.into());
    if s.is_empty() {
        return Err(not_one());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return Err(not_one());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| UnitError::TooLarge(s.into()))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            // A bare number is seconds, but only on its own: `1h30` is a typo, not 1h 30s.
            "" if digits == s.len() => Some(Duration::from_secs(n)),
            "" => return Err(not_one()),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "d" => n.checked_mul(86400).map(Duration::from_secs),
            _ => return Err(UnitError::DurationUnit { input: s.into(), unit: unit.into() }),
        };
        total = part.and_then(|p| total.checked_add(p)).ok_or_else(|| UnitError::TooLarge(s.into()))?;
    }
    Ok(total)
}

/// A size with binary units for people: `512 B`, `1.5 GiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_bytes_and_binary_units() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4k"), Ok(4 << 10));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("7B"), Ok(7));
        assert_eq!(parse_size(" 1G "), Ok(1 << 30));
    }

    #[test]
    fn bad_sizes_are_refused_with_the_rule() {
        assert_eq!(parse_size("10X"), Err(UnitError::SizeSuffix { input: "10X".into(), suffix: 'X' }));
        assert_eq!(
            parse_size("10X").map_err(|e| e.to_string()),
            Err("\"10X\": unknown size suffix 'X' (use K, M, G or T)".into())
        );
        assert_eq!(parse_size("G"), Err(UnitError::NotASize("G".into())));
        assert_eq!(parse_size(""), Err(UnitError::NotASize("".into())));
        assert_eq!(parse_size("-1G"), Err(UnitError::NotASize("-1G".into())));
        assert_eq!(parse_size("99999999999999999999T"), Err(UnitError::NotASize("99999999999999999999T".into())));
        assert_eq!(parse_size("16777216T"), Err(UnitError::TooLarge("16777216T".into())));
    }

    #[test]
    fn durations_in_s_m_h_d() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(5 * 86400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn bad_durations_are_refused_with_the_rule() {
        assert_eq!(parse_duration("5w"), Err(UnitError::DurationUnit { input: "5w".into(), unit: "w".into() }));
        assert_eq!(
            parse_duration("5w").map_err(|e| e.to_string()),
            Err("\"5w\": unknown duration unit \"w\" (use s, m, h or d)".into())
        );
        assert_eq!(parse_duration("m"), Err(UnitError::NotADuration("m".into())));
        assert_eq!(parse_duration(""), Err(UnitError::NotADuration("".into())));
        assert_eq!(parse_duration("1h30"), Err(UnitError::NotADuration("1h30".into())));
        assert_eq!(parse_duration("-5s"), Err(UnitError::NotADuration("-5s".into())));
        assert_eq!(parse_duration("1 h"), Err(UnitError::DurationUnit { input: "1 h".into(), unit: " h".into() }));
        assert_eq!(parse_duration("99999999999999999999s"), Err(UnitError::TooLarge("99999999999999999999s".into())));
        assert_eq!(parse_duration("999999999999999999d"), Err(UnitError::TooLarge("999999999999999999d".into())));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(10 << 30), "10.0 GiB");
        assert_eq!(human_size(3 << 40), "3.0 TiB");
    }
}
