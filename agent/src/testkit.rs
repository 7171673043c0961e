//! Helpers of the decoders' property tests (test builds only): a scratch directory on
//! tmpfs (the tests exercise decoders, not durability, and fsync on a real disk would
//! make hundreds of cases slow) and the ways to damage a valid file.

use proptest::prelude::*;

/// A scratch directory, on `/dev/shm` when the machine has one.
pub(crate) fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("props").tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("tempdir")
}

/// One way to damage a valid file.
#[derive(Debug, Clone)]
pub(crate) enum Damage {
    /// XOR one byte with a non-zero value.
    Flip(prop::sample::Index, u8),
    /// Cut the file short (it keeps fewer bytes than it had).
    Cut(prop::sample::Index),
    /// Append bytes.
    Extend(Vec<u8>),
}

impl Damage {
    /// The position of a flip in a file of `len` bytes.
    pub(crate) fn flipped_at(&self, len: usize) -> Option<usize> {
        match self {
            Damage::Flip(i, _) => Some(i.index(len)),
            _ => None,
        }
    }

    pub(crate) fn apply(&self, mut b: Vec<u8>) -> Vec<u8> {
        match self {
            Damage::Flip(i, x) => {
                let i = i.index(b.len());
                b[i] ^= x;
            }
            Damage::Cut(i) => b.truncate(i.index(b.len())),
            Damage::Extend(tail) => b.extend_from_slice(tail),
        }
        b
    }
}

pub(crate) fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<prop::sample::Index>(), 1..=255u8).prop_map(|(i, x)| Damage::Flip(i, x)),
        any::<prop::sample::Index>().prop_map(Damage::Cut),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(Damage::Extend),
    ]
}
