//! The operator's bandwidth grammar (`policy create --bandwidth`, `--resync-bandwidth`,
//! `agent serve --bandwidth`, `agent.toml` `bandwidth`), parsed the same way on both
//! sides into a [`BandwidthSpec`].
//!
//! A spec is a comma-separated list of `HH:MM-HH:MM=RATE` windows in the host's local
//! time zone and at most one `*=RATE` for the rest of the day; a bare `RATE` means
//! `*=RATE`. Without `*`, the rest of the day is unlimited. `RATE` is a size per second
//! in the [`units`](super::units) grammar (`50M` = 50 MiB/s, `1048576`); `0` is
//! unlimited. A window starts at its first minute and ends before its last
//! (`08:00-18:00` is 08:00:00 up to 17:59:59); `24:00` may end a window, and a window
//! whose end is before its start wraps past midnight (`22:00-06:00`). Windows may not
//! overlap, be empty, or cover the whole day.
//!
//! Example: `08:00-18:00=50M,*=0` — 50 MiB/s in business hours, unlimited otherwise.

use std::fmt;
use std::str::FromStr;

use super::units::{UnitError, parse_size};

/// Seconds in a day.
pub const DAY_SECS: u32 = 86_400;

/// A spec the grammar refuses; the message names the part and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BandwidthError {
    #[error("empty bandwidth spec (e.g. \"08:00-18:00=50M,*=0\", or \"0\" for unlimited)")]
    Empty,
    #[error("{0:?}: an empty entry between commas")]
    EmptyEntry(String),
    #[error("{0:?}: expected WINDOW=RATE or *=RATE (e.g. 08:00-18:00=50M)")]
    MissingRate(String),
    #[error("{0:?}: a window is HH:MM-HH:MM (e.g. 08:00-18:00)")]
    NotAWindow(String),
    #[error("{0:?} is not a time of day (HH:MM, 00:00 to 23:59, or 24:00 to end a window)")]
    NotATime(String),
    #[error("{0:?}: a window must not be empty (start and end are the same)")]
    EmptyWindow(String),
    #[error("{0:?}: a rate is a size per second (e.g. 50M, 0 for unlimited): {1}")]
    Rate(String, UnitError),
    #[error("\"*\" appears twice: one rate for the rest of the day")]
    DuplicateDefault,
    #[error("windows {0} and {1} overlap")]
    Overlap(String, String),
}

/// A time window of the day, in seconds since local midnight: `[start, end)`, wrapping
/// past midnight when `end <= start` (`end` is never equal to `start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

impl Window {
    /// Whether `sec` (since local midnight) is inside.
    pub fn contains(&self, sec: u32) -> bool {
        if self.start < self.end { (self.start..self.end).contains(&sec) } else { sec >= self.start || sec < self.end }
    }

    /// The non-wrapping pieces of the window.
    fn pieces(&self) -> Vec<(u32, u32)> {
        if self.start < self.end { vec![(self.start, self.end)] } else { vec![(self.start, DAY_SECS), (0, self.end)] }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |s: u32| format!("{:02}:{:02}", s / 3600, (s % 3600) / 60);
        write!(f, "{}-{}", hm(self.start), hm(self.end))
    }
}

/// A validated bandwidth spec: rates in bytes per second, 0 = unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BandwidthSpec {
    /// The windows in the order given (they do not overlap).
    pub windows: Vec<(Window, u64)>,
    /// The rate outside every window.
    pub otherwise: u64,
}

impl BandwidthSpec {
    /// No limit at any time.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Whether the spec never limits.
    pub fn is_unlimited(&self) -> bool {
        self.otherwise == 0 && self.windows.iter().all(|(_, r)| *r == 0)
    }

    /// The rate (bytes/s, 0 = unlimited) at `sec` seconds since local midnight.
    pub fn rate_at(&self, sec: u32) -> u64 {
        let sec = sec % DAY_SECS;
        self.windows.iter().find(|(w, _)| w.contains(sec)).map_or(self.otherwise, |(_, r)| *r)
    }
}

fn parse_time(s: &str, is_end: bool) -> Result<u32, BandwidthError> {
    let bad = || BandwidthError::NotATime(s.to_owned());
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 || !h.chars().chain(m.chars()).all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    match (h, m) {
        (24, 0) if is_end => Ok(DAY_SECS),
        (0..=23, 0..=59) => Ok(h * 3600 + m * 60),
        _ => Err(bad()),
    }
}

fn parse_window(s: &str) -> Result<Window, BandwidthError> {
    let (a, b) = s.split_once('-').ok_or_else(|| BandwidthError::NotAWindow(s.to_owned()))?;
    let (start, end) = (parse_time(a.trim(), false)?, parse_time(b.trim(), true)?);
    if start == end || (start == 0 && end == DAY_SECS) {
        return Err(BandwidthError::EmptyWindow(s.to_owned()));
    }
    Ok(Window { start, end })
}

impl FromStr for BandwidthSpec {
    type Err = BandwidthError;
    fn from_str(s: &str) -> Result<Self, BandwidthError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(BandwidthError::Empty);
        }
        let mut spec = BandwidthSpec::default();
        let mut have_default = false;
        let entries: Vec<&str> = s.split(',').map(str::trim).collect();
        for entry in &entries {
            if entry.is_empty() {
                return Err(BandwidthError::EmptyEntry(s.to_owned()));
            }
            let (when, rate) = match entry.split_once('=') {
                Some((w, r)) => (Some(w.trim()), r.trim()),
                // A bare rate is the whole day, but only on its own.
                None if entries.len() == 1 && !entry.contains(['-', ':']) => (None, *entry),
                None => return Err(BandwidthError::MissingRate((*entry).to_owned())),
            };
            let rate = parse_size(rate).map_err(|e| BandwidthError::Rate((*entry).to_owned(), e))?;
            match when {
                None | Some("*") => {
                    if have_default {
                        return Err(BandwidthError::DuplicateDefault);
                    }
                    have_default = true;
                    spec.otherwise = rate;
                }
                Some(w) => {
                    let w = parse_window(w)?;
                    if let Some((o, _)) = spec.windows.iter().find(|(o, _)| overlap(o, &w)) {
                        return Err(BandwidthError::Overlap(o.to_string(), w.to_string()));
                    }
                    spec.windows.push((w, rate));
                }
            }
        }
        Ok(spec)
    }
}

fn overlap(a: &Window, b: &Window) -> bool {
    a.pieces().iter().any(|(s1, e1)| b.pieces().iter().any(|(s2, e2)| s1 < e2 && s2 < e1))
}

fn rate(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "T"), (1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")];
    UNITS.iter().find(|(m, _)| n >= *m && n.is_multiple_of(*m)).map_or(n.to_string(), |(m, u)| format!("{}{u}", n / m))
}

/// A rate for people: `unlimited`, `50.0 MiB/s`.
pub fn human_rate(n: u64) -> String {
    if n == 0 { "unlimited".into() } else { format!("{}/s", super::units::human_size(n)) }
}

/// The canonical text, which parses back to the same spec (`08:00-18:00=50M,*=0`).
impl fmt::Display for BandwidthSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (w, r) in &self.windows {
            write!(f, "{w}={},", rate(*r))?;
        }
        write!(f, "*={}", rate(self.otherwise))
    }
}

/// In config files (`agent.toml` `bandwidth = "08:00-18:00=50M,*=0"`): the same text.
impl serde::Serialize for BandwidthSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BandwidthSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
#[path = "bandwidth_tests.rs"]
mod tests;
