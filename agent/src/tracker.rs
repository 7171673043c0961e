//! The replication tracker: a VM disk whose every write is appended to its HRL log.
