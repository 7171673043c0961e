//! Validated names and ids: every identifier that crosses a module or process boundary.
//!
//! One rule per kind, checked once by the constructor; a value of one of these types
//! is always safe to put in a file path, a log line or a SAN URI.
//!
//! | type | rule |
//! | --- | --- |
//! | [`HostName`], [`SiteName`], [`CloudName`], [`VmName`], [`DiskId`], [`NetworkName`], [`PlanName`], [`PolicyName`] | **name**: ASCII letters, digits, `-`, `_`, `.`; starts with a letter or digit; 1–63 chars (so never `.`, `..`, nor `/`) |
//! | [`HostId`] | a name of up to 80 chars (`<host name>-<6 hex>` as the vault issues it) |
//! | [`RelationshipId`] | `r-` and 8 lowercase hex digits |
//! | [`JobId`] | `j-` and 1–20 digits |
//! | [`PointId`] | `p` and the point's sequence ([`PointSeq`], decimal, no leading zero) |
//! | [`PointSelector`] | `latest`, `latest-app-consistent` or a [`PointId`] |

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The rule for names (documented at the top of the module).
pub const NAME_RULE: &str = "1-63 ASCII letters, digits, '-', '_' or '.', starting with a letter or digit";

/// A value that breaks the rule of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {kind}: {rule}")]
pub struct NameError {
    /// What the value was meant to be ("VM name", "relationship id", ...).
    pub kind: &'static str,
    /// The refused value, shortened to 80 chars (it may come from an attacker).
    pub value: String,
    pub rule: &'static str,
}

impl NameError {
    fn new(kind: &'static str, value: &str, rule: &'static str) -> Self {
        let mut short: String = value.chars().take(80).collect();
        if short.len() < value.len() {
            short.push('…');
        }
        Self { kind, value: short, rule }
    }
}

fn is_name(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Implements the string newtype boilerplate: constructor through `$check`, accessors,
/// `Display`, `FromStr`, `TryFrom<String>`, serde (validated on the way in), `Borrow<str>`.
macro_rules! string_type {
    ($(#[$meta:meta])* $ty:ident, $kind:literal, $rule:expr, $check:expr) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// What a value of this type is, in error messages.
            pub const KIND: &'static str = $kind;
            /// The rule a value must follow.
            pub const RULE: &'static str = $rule;

            pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
                let s = s.into();
                let check: fn(&str) -> bool = $check;
                if check(&s) { Ok(Self(s)) } else { Err(NameError::new($kind, &s, $rule)) }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = NameError;
            fn try_from(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

macro_rules! name_type {
    ($(#[$meta:meta])* $ty:ident, $kind:literal) => {
        string_type!($(#[$meta])* $ty, $kind, NAME_RULE, |s| is_name(s, 63));
    };
}

name_type!(
    /// A host's name, as the operator registered it (`hv1`).
    HostName,
    "host name"
);
name_type!(
    /// A site (location): `primary`, `secondary`, any name.
    SiteName,
    "site name"
);
name_type!(
    /// A named group of hosts at one site.
    CloudName,
    "cloud name"
);
name_type!(
    /// A VM's name, unique in the vault; also its folder name on its host.
    VmName,
    "VM name"
);
name_type!(
    /// A disk's id within its VM (`disk0`); also part of its file names.
    DiskId,
    "disk id"
);
name_type!(
    /// A VM network of one site.
    NetworkName,
    "network name"
);
name_type!(
    /// A recovery plan.
    PlanName,
    "plan name"
);
name_type!(
    /// A replication policy.
    PolicyName,
    "policy name"
);

string_type!(
    /// A registered host's id: `<host name>-<6 hex>`, in its certificate's SAN URI.
    HostId,
    "host id",
    "1-80 ASCII letters, digits, '-', '_' or '.', starting with a letter or digit",
    |s| is_name(s, 80)
);

fn is_relationship_id(s: &str) -> bool {
    s.len() == 10 && s.starts_with("r-") && s.bytes().skip(2).all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

string_type!(
    /// A replication relationship (one protected VM, one direction).
    RelationshipId,
    "relationship id",
    "'r-' and 8 lowercase hex digits",
    is_relationship_id
);

impl RelationshipId {
    /// A new random id.
    pub fn generate() -> Self {
        Self(format!("r-{:08x}", rand::random::<u32>()))
    }
}

fn is_job_id(s: &str) -> bool {
    s.len() > 2 && s.len() <= 22 && s.starts_with("j-") && s.bytes().skip(2).all(|b| b.is_ascii_digit())
}

string_type!(
    /// A job: `j-000042` (key order is creation order).
    JobId,
    "job id",
    "'j-' and 1-20 digits",
    is_job_id
);

impl JobId {
    /// The id of the `n`th job.
    pub fn from_seq(n: u64) -> Self {
        Self(format!("j-{n:06}"))
    }
}

/// The sequence of a recovery point: the sealed logs' sequence, strictly increasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct PointSeq(pub u64);

impl fmt::Display for PointSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A recovery point's id: `p<seq>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PointId(PointSeq);

impl PointId {
    pub const KIND: &'static str = "point id";
    pub const RULE: &'static str = "'p' and the point's sequence number";

    pub fn from_seq(seq: PointSeq) -> Self {
        Self(seq)
    }

    pub fn seq(self) -> PointSeq {
        self.0
    }

    pub fn new(s: &str) -> Result<Self, NameError> {
        let err = || NameError::new(Self::KIND, s, Self::RULE);
        let digits = s.strip_prefix('p').ok_or_else(err)?;
        if digits.is_empty() || digits.len() > 20 || (digits.len() > 1 && digits.starts_with('0')) {
            return Err(err());
        }
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        digits.parse::<u64>().map(|n| Self(PointSeq(n))).map_err(|_| err())
    }
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0.0)
    }
}

impl FromStr for PointId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl TryFrom<String> for PointId {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(&s)
    }
}

impl From<PointId> for String {
    fn from(p: PointId) -> String {
        p.to_string()
    }
}

/// Which recovery point an operator (or the provider) asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum PointSelector {
    /// The latest processed point.
    #[default]
    Latest,
    /// The latest point made with the quiesce hook.
    LatestAppConsistent,
    Id(PointId),
}

impl PointSelector {
    pub const KIND: &'static str = "recovery point";
    pub const RULE: &'static str = "'latest', 'latest-app-consistent' or a point id 'p<seq>'";

    /// Parses a selector; the empty string is `latest` (the wire's default).
    pub fn new(s: &str) -> Result<Self, NameError> {
        match s {
            "" | "latest" => Ok(Self::Latest),
            "latest-app-consistent" => Ok(Self::LatestAppConsistent),
            _ => PointId::new(s).map(Self::Id).map_err(|_| NameError::new(Self::KIND, s, Self::RULE)),
        }
    }
}

impl fmt::Display for PointSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Latest => f.write_str("latest"),
            Self::LatestAppConsistent => f.write_str("latest-app-consistent"),
            Self::Id(p) => p.fmt(f),
        }
    }
}

impl FromStr for PointSelector {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl TryFrom<String> for PointSelector {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(&s)
    }
}

impl From<PointSelector> for String {
    fn from(p: PointSelector) -> String {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &[&str] = &[
        "",
        ".",
        "..",
        "../../etc/passwd",
        "a/b",
        "/abs",
        "-lead",
        "_lead",
        ".hidden",
        "a b",
        "a\0b",
        "vm\n",
        "é",
        "a\\b",
    ];

    #[test]
    fn names_follow_the_rule() {
        for ok in ["a", "vm1", "VM-1_a.b", "0", &"x".repeat(63)] {
            assert!(VmName::new(ok).is_ok(), "{ok:?}");
            assert!(HostName::new(ok).is_ok(), "{ok:?}");
        }
        for bad in HOSTILE.iter().copied().chain([&*"x".repeat(64)]) {
            let e = VmName::new(bad).expect_err(bad);
            assert_eq!(e.kind, "VM name");
            assert!(DiskId::new(bad).is_err(), "{bad:?}");
            assert!(NetworkName::new(bad).is_err(), "{bad:?}");
            assert!(PlanName::new(bad).is_err(), "{bad:?}");
            assert!(PolicyName::new(bad).is_err(), "{bad:?}");
            assert!(SiteName::new(bad).is_err(), "{bad:?}");
            assert!(CloudName::new(bad).is_err(), "{bad:?}");
            assert!(HostId::new(bad).is_err() || bad.len() == 64, "{bad:?}");
            assert!(RelationshipId::new(bad).is_err(), "{bad:?}");
            assert!(JobId::new(bad).is_err(), "{bad:?}");
            assert!(PointId::new(bad).is_err(), "{bad:?}");
            assert!(PointSelector::new(bad).is_err() || bad.is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn error_names_kind_and_rule_and_truncates() {
        let e = VmName::new("../".repeat(100)).expect_err("hostile");
        let msg = e.to_string();
        assert!(msg.contains("VM name") && msg.contains("starting with a letter or digit"), "{msg}");
        assert!(e.value.chars().count() <= 81, "{}", e.value);
    }

    #[test]
    fn ids() {
        assert!(HostId::new(format!("{}-abcdef", "h".repeat(63))).is_ok());
        let r = RelationshipId::generate();
        assert_eq!(RelationshipId::new(r.as_str()).as_ref(), Ok(&r));
        for bad in ["r-1234567", "r-123456789", "r-ABCDEF12", "x-12345678", "r-1234567g"] {
            assert!(RelationshipId::new(bad).is_err(), "{bad}");
        }
        assert_eq!(JobId::from_seq(42).as_str(), "j-000042");
        assert!(JobId::new("j-1").is_ok());
        assert!(JobId::new("j-").is_err() && JobId::new("j-1a").is_err());
    }

    #[test]
    fn points() {
        let p = PointId::new("p42").expect("valid");
        assert_eq!(p.seq(), PointSeq(42));
        assert_eq!(p.to_string(), "p42");
        for bad in ["p", "42", "p042", "p-1", "p1.5", "P1", "p99999999999999999999999"] {
            assert!(PointId::new(bad).is_err(), "{bad}");
        }
        assert_eq!(PointSelector::new(""), Ok(PointSelector::Latest));
        assert_eq!(PointSelector::new("latest-app-consistent"), Ok(PointSelector::LatestAppConsistent));
        assert_eq!(PointSelector::new("p7"), Ok(PointSelector::Id(PointId::from_seq(PointSeq(7)))));
        assert_eq!(PointSelector::new("p7").map(|s| s.to_string()), Ok("p7".to_string()));
    }

    #[test]
    fn serde_validates_on_the_way_in() {
        let v: VmName = serde_json::from_str("\"vm1\"").expect("valid");
        assert_eq!(serde_json::to_string(&v).expect("ser"), "\"vm1\"");
        assert!(serde_json::from_str::<VmName>("\"../x\"").is_err());
        let p: PointId = serde_json::from_str("\"p3\"").expect("valid");
        assert_eq!(serde_json::to_string(&p).expect("ser"), "\"p3\"");
        let s: PointSelector = serde_json::from_str("\"latest\"").expect("valid");
        assert_eq!(s, PointSelector::Latest);
    }

    #[test]
    fn borrow_allows_str_lookups() {
        let mut m = std::collections::HashMap::new();
        m.insert(VmName::new("vm1").expect("valid"), 1);
        assert_eq!(m.get("vm1"), Some(&1));
    }
}
