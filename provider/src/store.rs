//! The provider's store: an embedded redb database in the data dir.
//!
//! Why redb: pure Rust (no C toolchain, no second copy of SQLite), ACID transactions
//! with copy-on-write B-trees and a durable commit (fsync) by default, so a `kill -9`
//! after an acknowledged change loses nothing and a torn write is impossible by design.
//! Records are small serde JSON documents keyed by name; the whole inventory of a
//! 100-VM deployment is a few hundred KiB, so simplicity beats a relational schema.
//!
//! Tables: `hosts` (host name → [`HostRecord`]), `vms` (VM name → [`VmRecord`]),
//! `meta` (key → JSON: registration secret, job id sequence, ...), `policies` (policy name →
//! `PolicyRecord` (policy)), `pairings` (source cloud → `PairingRecord` (policy)),
//! `relationships` (relationship id → `RelationshipRecord` (relationship)) and `jobs`
//! (job id → `JobRecord` (jobs)).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Failure of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened, read or committed. Boxed: redb's error is
    /// large and this one travels through every store call.
    #[error("store: {0}")]
    Db(Box<redb::Error>),
    /// A record did not decode: the file was written by an incompatible version.
    #[error("store: record {key:?} in {table} does not decode: {source}")]
    Decode {
        table: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// A record could not be encoded (should not happen for our types).
    #[error("store: encode: {0}")]
    Encode(#[from] serde_json::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Db(Box::new(e))
    }
}
from_redb!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// A named table of JSON records.
#[derive(Clone, Copy)]
pub struct Table(TableDefinition<'static, &'static str, &'static [u8]>, &'static str);

pub const HOSTS: Table = Table(TableDefinition::new("hosts"), "hosts");
pub const VMS: Table = Table(TableDefinition::new("vms"), "vms");
pub const META: Table = Table(TableDefinition::new("meta"), "meta");
pub const POLICIES: Table = Table(TableDefinition::new("policies"), "policies");
pub const PAIRINGS: Table = Table(TableDefinition::new("pairings"), "pairings");
pub const RELATIONSHIPS: Table = Table(TableDefinition::new("relationships"), "relationships");
pub const JOBS: Table = Table(TableDefinition::new("jobs"), "jobs");
/// Revoked certificate serials (the trust module's revoked records).
pub const REVOKED: Table = Table(TableDefinition::new("revoked"), "revoked");
const ALL: [Table; 8] = [HOSTS, VMS, META, POLICIES, PAIRINGS, RELATIONSHIPS, JOBS, REVOKED];

/// Serde of an optional name kept as a plain string that is empty when absent: the
/// stored shape of records from before the domain types (`"test_of": ""`).
pub mod empty_is_none {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: AsRef<str>>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.as_ref().map(|x| x.as_ref()).unwrap_or(""))
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let s = String::deserialize(d)?;
        if s.is_empty() { Ok(None) } else { s.parse().map(Some).map_err(serde::de::Error::custom) }
    }
}

/// The open database. Cheap to share behind an `Arc`; redb serialises writers.
pub struct Store {
    db: Database,
    /// Committed write transactions since open (what a flood test counts).
    writes: AtomicU64,
}

/// One change decided by [`Store::reconcile`].
#[derive(Debug, Clone, PartialEq)]
pub enum Change<T> {
    Put(String, T),
    Delete(String),
}

impl Store {
    /// Opens (or creates) `store.redb` in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let db = Database::create(data_dir.join("store.redb"))?;
        let tx = db.begin_write()?;
        for t in ALL {
            tx.open_table(t.0)?;
        }
        tx.commit()?;
        Ok(Self { db, writes: AtomicU64::new(0) })
    }

    /// Write transactions committed since the store was opened.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    fn commit(&self, tx: redb::WriteTransaction) -> Result<(), StoreError> {
        tx.commit()?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reads one record.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &(impl AsRef<str> + ?Sized),
    ) -> Result<Option<T>, StoreError> {
        let key = key.as_ref();
        let tx = self.db.begin_read()?;
        let t = tx.open_table(table.0)?;
        match t.get(key)? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(|source| StoreError::Decode {
                table: table.1,
                key: key.into(),
                source,
            }),
            None => Ok(None),
        }
    }

    /// Reads every record of a table, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(table.0)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push(serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                table: table.1,
                key: k.value().into(),
                source,
            })?);
        }
        Ok(out)
    }

    /// Writes one record durably.
    pub fn put<T: Serialize>(
        &self,
        table: Table,
        key: &(impl AsRef<str> + ?Sized),
        value: &T,
    ) -> Result<(), StoreError> {
        let key = key.as_ref();
        let bytes = serde_json::to_vec(value)?;
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(table.0)?;
            t.insert(key, bytes.as_slice())?;
        }
        self.commit(tx)?;
        Ok(())
    }

    /// Deletes one record durably; true when it existed.
    pub fn delete(&self, table: Table, key: &(impl AsRef<str> + ?Sized)) -> Result<bool, StoreError> {
        let key = key.as_ref();
        let tx = self.db.begin_write()?;
        let existed = {
            let mut t = tx.open_table(table.0)?;
            t.remove(key)?.is_some()
        };
        self.commit(tx)?;
        Ok(existed)
    }

    /// Reads, changes and writes one record in one write transaction, so what `f` decided
    /// from is what it replaces (a record changed meanwhile is never written back). `f`
    /// returns the new record, or `None` to write nothing (then nothing is committed),
    /// and its own result.
    pub fn update<T: Serialize + DeserializeOwned, R>(
        &self,
        table: Table,
        key: &(impl AsRef<str> + ?Sized),
        f: impl FnOnce(Option<T>) -> (Option<T>, R),
    ) -> Result<R, StoreError> {
        let key = key.as_ref();
        let tx = self.db.begin_write()?;
        let result = {
            let mut t = tx.open_table(table.0)?;
            let current = match t.get(key)? {
                Some(v) => Some(serde_json::from_slice::<T>(v.value()).map_err(|source| StoreError::Decode {
                    table: table.1,
                    key: key.into(),
                    source,
                })?),
                None => None,
            };
            let (new, result) = f(current);
            match new {
                Some(new) => {
                    let bytes = serde_json::to_vec(&new)?;
                    t.insert(key, bytes.as_slice())?;
                }
                None => return Ok(result),
            }
            result
        };
        self.commit(tx)?;
        Ok(result)
    }

    /// Reads every record of `table` (those that decode) and applies the changes `f`
    /// decides from them, in one write transaction; commits only when there is a
    /// change. Returns `f`'s result.
    pub fn reconcile<T: Serialize + DeserializeOwned, R>(
        &self,
        table: Table,
        f: impl FnOnce(&[(String, T)]) -> (Vec<Change<T>>, R),
    ) -> Result<R, StoreError> {
        let tx = self.db.begin_write()?;
        let result = {
            let mut t = tx.open_table(table.0)?;
            let mut current = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                if let Ok(rec) = serde_json::from_slice::<T>(v.value()) {
                    current.push((k.value().to_owned(), rec));
                }
            }
            let (changes, result) = f(&current);
            if changes.is_empty() {
                return Ok(result);
            }
            for c in changes {
                match c {
                    Change::Put(k, v) => {
                        let bytes = serde_json::to_vec(&v)?;
                        t.insert(k.as_str(), bytes.as_slice())?;
                    }
                    Change::Delete(k) => {
                        t.remove(k.as_str())?;
                    }
                }
            }
            result
        };
        self.commit(tx)?;
        Ok(result)
    }

    /// Replaces, in one transaction, the records of `table` selected by `owned` with
    /// `records` (key, value). Used when a host reports its whole VM list.
    pub fn replace_where<T: Serialize + DeserializeOwned, K: AsRef<str>>(
        &self,
        table: Table,
        owned: impl Fn(&T) -> bool,
        records: &[(K, T)],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(table.0)?;
            let mut stale = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                if let Ok(rec) = serde_json::from_slice::<T>(v.value())
                    && owned(&rec)
                {
                    stale.push(k.value().to_owned());
                }
            }
            for k in stale {
                t.remove(k.as_str())?;
            }
            for (k, v) in records {
                let bytes = serde_json::to_vec(v)?;
                t.insert(k.as_ref(), bytes.as_slice())?;
            }
        }
        self.commit(tx)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_delete_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path()).expect("open");
            s.put(META, "a", &1u32).expect("put");
            s.put(META, "b", &2u32).expect("put");
            assert!(s.delete(META, "a").expect("delete"));
            assert!(!s.delete(META, "a").expect("delete again"));
        }
        let s = Store::open(dir.path()).expect("reopen");
        assert_eq!(s.get::<u32>(META, "b").expect("get"), Some(2));
        assert_eq!(s.get::<u32>(META, "a").expect("get"), None);
        assert_eq!(s.list::<u32>(META).expect("list"), vec![2]);
    }

    #[test]
    fn update_and_reconcile_commit_only_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        s.put(META, "a", &1u32).expect("put");
        let before = s.writes();
        let seen = s.update(META, "a", |v: Option<u32>| (None, v)).expect("no-op update");
        assert_eq!((seen, s.writes()), (Some(1), before), "a no-op update committed");
        s.update(META, "a", |v: Option<u32>| (v.map(|v| v + 1), ())).expect("update");
        assert_eq!((s.get::<u32>(META, "a").expect("get"), s.writes()), (Some(2), before + 1));
        let n = s.reconcile(META, |all: &[(String, u32)]| (vec![], all.len())).expect("no-op reconcile");
        assert_eq!((n, s.writes()), (1, before + 1));
        s.reconcile(META, |_: &[(String, u32)]| (vec![Change::Delete("a".into()), Change::Put("b".into(), 7)], ()))
            .expect("reconcile");
        assert_eq!(s.list::<u32>(META).expect("list"), vec![7]);
        assert_eq!(s.writes(), before + 2);
    }

    #[test]
    fn replace_where_swaps_only_owned_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        s.put(VMS, "x", &("h1".to_string(), 1)).expect("put");
        s.put(VMS, "y", &("h2".to_string(), 2)).expect("put");
        s.replace_where(VMS, |r: &(String, i32)| r.0 == "h1", &[("z", ("h1".to_string(), 3))]).expect("replace");
        let all: Vec<(String, i32)> = s.list(VMS).expect("list");
        assert_eq!(all, vec![("h2".to_string(), 2), ("h1".to_string(), 3)]);
    }
}
