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
        Ok(Self { db })
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
        tx.commit()?;
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
        tx.commit()?;
        Ok(existed)
    }

    /// Reads, changes and writes one record in one write transaction: writers are
    /// serialised, so no other write falls between the read and the write (a
    /// read-modify-write that a concurrent one cannot undo). `f` gets the record (`None`
    /// when absent) and returns what to store (`None`: delete) and a result; when it
    /// errs, nothing is written.
    pub fn update<T, R, E>(
        &self,
        table: Table,
        key: &(impl AsRef<str> + ?Sized),
        f: impl FnOnce(Option<T>) -> Result<(Option<T>, R), E>,
    ) -> Result<R, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<StoreError>,
    {
        let key = key.as_ref();
        let tx = self.db.begin_write().map_err(StoreError::from)?;
        let result = {
            let mut t = tx.open_table(table.0).map_err(StoreError::from)?;
            let current: Option<T> = match t.get(key).map_err(StoreError::from)? {
                Some(v) => Some(serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                    table: table.1,
                    key: key.into(),
                    source,
                })?),
                None => None,
            };
            let (next, result) = f(current)?;
            match next {
                Some(v) => {
                    let bytes = serde_json::to_vec(&v).map_err(StoreError::from)?;
                    t.insert(key, bytes.as_slice()).map_err(StoreError::from)?;
                }
                None => {
                    t.remove(key).map_err(StoreError::from)?;
                }
            }
            result
        };
        tx.commit().map_err(StoreError::from)?;
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
        tx.commit()?;
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
    fn update_is_one_read_modify_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = std::sync::Arc::new(Store::open(dir.path()).expect("open"));
        // Concurrent increments: none is lost.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        s.update(META, "n", |n: Option<u32>| Ok::<_, StoreError>((Some(n.unwrap_or(0) + 1), ())))
                            .expect("update");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(s.get::<u32>(META, "n").expect("get"), Some(100));
        // An error writes nothing; `None` deletes.
        let e = s.update(META, "n", |_: Option<u32>| {
            Err::<(Option<u32>, ()), _>(StoreError::Encode(serde_json::from_str::<u32>("x").expect_err("not json")))
        });
        assert!(e.is_err());
        assert_eq!(s.get::<u32>(META, "n").expect("get"), Some(100));
        let old = s.update(META, "n", |n: Option<u32>| Ok::<_, StoreError>((None, n))).expect("delete");
        assert_eq!((old, s.get::<u32>(META, "n").expect("get")), (Some(100), None));
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
