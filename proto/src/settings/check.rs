//! The checks the daemons' validations share: each turns one key's string into its
//! type or a [`KeyError`] naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::KeyError;
use crate::daemon::LogFilter;
use crate::model::units::{parse_duration, parse_size};

/// A path (`default` when unset); not empty.
pub fn path(key: &'static str, p: Option<&Path>, default: &str) -> Result<PathBuf, KeyError> {
    let p = p.unwrap_or(Path::new(default));
    if p.as_os_str().is_empty() {
        return Err(KeyError::new(key, "empty path"));
    }
    Ok(p.to_path_buf())
}

/// A log filter (`info` when unset), checked as `RUST_LOG` would be parsed.
pub fn log_filter(key: &'static str, f: Option<&str>) -> Result<LogFilter, KeyError> {
    LogFilter::parse(f.unwrap_or("info")).map_err(|e| KeyError::new(key, e))
}

/// A socket address IP:PORT (a bind address: no host names).
pub fn address(key: &'static str, a: &str) -> Result<SocketAddr, KeyError> {
    a.trim()
        .parse()
        .map_err(|_| KeyError::new(key, format!("{a:?} is not an address IP:PORT (e.g. 127.0.0.1:7000, [::]:7000)")))
}

/// A Unix group name by its syntax (whether it exists is checked where it is used).
pub fn group(key: &'static str, g: &str) -> Result<String, KeyError> {
    let ok = !g.is_empty()
        && g.len() <= 32
        && !g.starts_with('-')
        && g.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok { Ok(g.to_owned()) } else { Err(KeyError::new(key, format!("{g:?} is not a group name"))) }
}

/// A count (`default` when unset) of at least `min`.
pub fn at_least(key: &'static str, v: Option<usize>, default: usize, min: usize) -> Result<usize, KeyError> {
    let v = v.unwrap_or(default);
    if v < min { Err(KeyError::new(key, format!("{v} is out of range: at least {min}"))) } else { Ok(v) }
}

/// A size with K/M/G/T.
pub fn size(key: &'static str, s: &str) -> Result<u64, KeyError> {
    parse_size(s).map_err(|e| KeyError::new(key, e))
}

/// A duration with s/m/h/d within `min..=max`.
pub fn duration_in(key: &'static str, s: &str, (min, max): (Duration, Duration)) -> Result<Duration, KeyError> {
    let d = parse_duration(s).map_err(|e| KeyError::new(key, e))?;
    if d < min || d > max {
        return Err(KeyError::new(key, format!("{s:?} is out of range: {min:?} to {max:?}")));
    }
    Ok(d)
}

/// A shell command; set means not blank.
pub fn command(key: &'static str, c: Option<&str>) -> Result<Option<String>, KeyError> {
    match c {
        Some(c) if c.trim().is_empty() => Err(KeyError::new(key, "empty command (leave the key out for none)")),
        c => Ok(c.map(str::to_owned)),
    }
}
