//! The layers of a daemon's settings (feature `daemon`): defaults, the config file
//! (`/etc/siterecovery/<daemon>.toml`), the environment and the command line, merged
//! key by key with the precedence flag > environment > file > default.
//!
//! Each daemon declares one settings struct whose fields are all `Option` and whose
//! serde names (kebab-case) are its flag names; it derives `clap::Args` (flags, with
//! `env = "SITERECOVERY_<KEY>"`, so clap resolves flag > environment) and
//! `Deserialize` with `deny_unknown_fields` (the file). This module reads the file with
//! the line of every key ([`FileLayer`]), overlays the layers ([`Layers::merged`]) and
//! turns the daemon's per-key validation errors ([`KeyError`]) into errors naming the
//! key and where its value came from ([`SettingsError`]). [`reload`] re-reads the file
//! on SIGHUP.

pub mod check;
pub mod reload;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The prefix of every environment override: `SITERECOVERY_NBD_LISTEN` for `nbd-listen`.
pub const ENV_PREFIX: &str = "SITERECOVERY_";

/// Where a key's effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line of the config file.
    File { path: PathBuf, line: usize },
    /// A flag or its `SITERECOVERY_…` environment variable.
    CommandLine,
    /// The built-in default.
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::CommandLine => f.write_str("flag or environment"),
            Origin::Default => f.write_str("default"),
        }
    }
}

/// A value a daemon's validation refused: the key (kebab-case, as in the file) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub key: &'static str,
    pub reason: String,
}

impl KeyError {
    pub fn new(key: &'static str, reason: impl fmt::Display) -> Self {
        Self { key, reason: reason.to_string() }
    }
}

/// The errors of a validation, collected so every refused key is reported.
#[derive(Debug, Default)]
pub struct KeyErrors(Vec<KeyError>);

impl KeyErrors {
    /// The value, or `None` with its error kept.
    pub fn check<V>(&mut self, r: Result<V, KeyError>) -> Option<V> {
        r.map_err(|e| self.0.push(e)).ok()
    }

    /// `value` when nothing was refused (it is `Some` then), else every error.
    pub fn finish<R>(self, value: Option<R>) -> Result<R, Vec<KeyError>> {
        match value {
            Some(v) if self.0.is_empty() => Ok(v),
            _ => Err(self.0),
        }
    }
}

/// Settings that cannot be used, each naming the key and, for the file, its line.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read the config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: not valid TOML: {message}")]
    Syntax { path: PathBuf, line: usize, message: String },
    #[error("{path}:{line}: unknown key `{key}`")]
    UnknownKey { path: PathBuf, line: usize, key: String },
    #[error("{path}:{line}: key `{key}`: {message}")]
    WrongType { path: PathBuf, line: usize, key: String, message: String },
    #[error("key `{key}` ({origin}): {reason}")]
    Invalid { key: String, origin: Origin, reason: String },
    /// The layers could not be merged (a settings struct that does not round-trip
    /// through TOML: a bug, not an operator's error).
    #[error("cannot merge the settings: {0}")]
    Merge(String),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Many(Vec<SettingsError>),
}

/// The config file's layer: its values and the line of each key.
#[derive(Debug, Clone)]
pub struct FileLayer<T> {
    pub path: PathBuf,
    /// Whether the file was named (`--config`): then it must exist.
    pub explicit: bool,
    /// Whether it existed (a missing default file is an empty layer).
    pub found: bool,
    pub value: T,
    lines: BTreeMap<String, usize>,
}

impl<T: DeserializeOwned + Default> FileLayer<T> {
    /// Reads `path`. A missing file is an empty layer unless `explicit`.
    pub fn read(path: &Path, explicit: bool) -> Result<Self, SettingsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, explicit, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self {
                path: path.to_path_buf(),
                explicit,
                found: false,
                value: T::default(),
                lines: BTreeMap::new(),
            }),
            Err(source) => Err(SettingsError::Read { path: path.to_path_buf(), source }),
        }
    }

    /// The layer of `text`, read from `path`.
    pub fn parse(path: &Path, explicit: bool, text: &str) -> Result<Self, SettingsError> {
        let at = |span: Option<std::ops::Range<usize>>| line_of(text, span.map(|s| s.start).unwrap_or(0));
        let table = toml::de::DeTable::parse(text).map_err(|e| SettingsError::Syntax {
            path: path.to_path_buf(),
            line: at(e.span()),
            message: e.message().trim().to_owned(),
        })?;
        // Top-level keys only: the settings are flat.
        let keys: Vec<(String, std::ops::Range<usize>, std::ops::Range<usize>)> =
            table.get_ref().iter().map(|(k, v)| (k.get_ref().to_string(), k.span(), v.span())).collect();
        let value = toml::from_str::<T>(text).map_err(|e| {
            let start = e.span().map(|s| s.start).unwrap_or(0);
            let line = line_of(text, start);
            let key = keys
                .iter()
                .find(|(_, k, v)| k.contains(&start) || v.contains(&start) || v.start == start)
                .map(|(name, _, _)| name.clone());
            let message = e.message().trim().to_owned();
            match key {
                Some(key) if message.starts_with("unknown field") => {
                    SettingsError::UnknownKey { path: path.to_path_buf(), line, key }
                }
                Some(key) => SettingsError::WrongType { path: path.to_path_buf(), line, key, message },
                None => SettingsError::Syntax { path: path.to_path_buf(), line, message },
            }
        })?;
        let lines = keys.into_iter().map(|(k, span, _)| (k, line_of(text, span.start))).collect();
        Ok(Self { path: path.to_path_buf(), explicit, found: true, value, lines })
    }

    /// The file read again from the same path (SIGHUP).
    pub fn reread(&self) -> Result<Self, SettingsError> {
        Self::read(&self.path, self.explicit)
    }
}

impl<T> FileLayer<T> {
    /// The line `key` is set on, when the file sets it.
    pub fn line(&self, key: &str) -> Option<usize> {
        self.lines.get(key).copied()
    }
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|b| **b == b'\n').count() + 1
}

/// The TOML table of a settings value: its set keys (TOML has no null: `None` is left out).
pub fn to_table<T: Serialize>(value: &T) -> Result<toml::Table, SettingsError> {
    toml::Table::try_from(value).map_err(|e| SettingsError::Merge(e.to_string()))
}

/// The settings of a daemon in their three layers (flag and environment are one: clap
/// resolves them).
#[derive(Debug, Clone)]
pub struct Layers<T> {
    pub defaults: T,
    pub file: FileLayer<T>,
    pub cli: T,
}

impl<T: Serialize + DeserializeOwned + Default + Clone> Layers<T> {
    /// Every key from its highest layer: flag/environment, then file, then default.
    pub fn merged(&self) -> Result<T, SettingsError> {
        let mut table = to_table(&self.defaults)?;
        table.extend(to_table(&self.file.value)?);
        table.extend(to_table(&self.cli)?);
        toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| SettingsError::Merge(e.to_string()))
    }

    /// Where the effective value of `key` comes from.
    pub fn origin(&self, key: &str) -> Origin {
        let set = |t: &T| to_table(t).map(|t| t.contains_key(key)).unwrap_or(false);
        if set(&self.cli) {
            Origin::CommandLine
        } else if let Some(line) = self.file.line(key) {
            Origin::File { path: self.file.path.clone(), line }
        } else {
            Origin::Default
        }
    }

    /// The merged settings validated by `validate`; its errors name the key and origin.
    pub fn validate<R>(&self, validate: impl FnOnce(&T) -> Result<R, Vec<KeyError>>) -> Result<R, SettingsError> {
        let merged = self.merged()?;
        validate(&merged).map_err(|errors| self.named(errors))
    }

    /// Validation errors named with the origin of their keys.
    pub fn named(&self, errors: Vec<KeyError>) -> SettingsError {
        let mut all: Vec<SettingsError> = errors
            .into_iter()
            .map(|e| SettingsError::Invalid { key: e.key.to_owned(), origin: self.origin(e.key), reason: e.reason })
            .collect();
        if all.len() == 1 { all.remove(0) } else { SettingsError::Many(all) }
    }

    /// The effective settings as a TOML document (`config check`): every key of `keys`
    /// in that order with where its value comes from, the unset ones as comments.
    pub fn describe(&self, keys: &[String]) -> Result<String, SettingsError> {
        let merged = to_table(&self.merged()?)?;
        let mut out = String::new();
        for key in keys {
            match merged.get(key) {
                Some(v) => out.push_str(&format!("{key} = {v}  # {}\n", self.origin(key))),
                None => out.push_str(&format!("# {key}: not set\n")),
            }
        }
        Ok(out)
    }

    /// These layers with the file read again (SIGHUP).
    pub fn reread(&self) -> Result<Self, SettingsError> {
        Ok(Self { defaults: self.defaults.clone(), file: self.file.reread()?, cli: self.cli.clone() })
    }
}

impl<T: Clone> Layers<T> {
    /// A copy with another command-line layer (`config check` with its own flags).
    pub fn with_cli(&self, cli: T) -> Self {
        Self { defaults: self.defaults.clone(), file: self.file.clone(), cli }
    }
}

/// The keys whose values differ between `old` and `new` (set, unset or changed).
pub fn changed_keys<T: Serialize>(old: &T, new: &T) -> Result<Vec<String>, SettingsError> {
    let (a, b) = (to_table(old)?, to_table(new)?);
    let mut keys: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// The environment variable of `key`: `SITERECOVERY_` and the key in upper snake case.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('-', "_").to_ascii_uppercase())
}
