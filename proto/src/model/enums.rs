//! Enums that both ends of a wire use, with the words the CLI and the logs print.
//!
//! Each domain enum has no "unspecified" variant: the wire's `0` (or an unknown value)
//! is refused by `TryFrom<i32>`. Serde uses the same words (kebab-case), so persisted
//! records read as before.

use crate::v1;

/// Declares a domain enum mirroring a proto enum: words, `Display`, `TryFrom<i32>`,
/// `From<Self> for i32` and the proto enum.
#[macro_export]
macro_rules! wire_enum {
    ($(#[$meta:meta])* $vis:vis enum $ty:ident => $wire:ty { $($(#[$vmeta:meta])* $var:ident = $wvar:ident, $word:literal;)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        $vis enum $ty {
            $($(#[$vmeta])* #[serde(rename = $word)] $var,)+
        }

        impl $ty {
            /// Every variant, in wire order.
            pub const ALL: &'static [$ty] = &[$($ty::$var),+];
            /// The words, for error messages ("test, planned or unplanned").
            pub const WORDS: &'static str = concat!($($word, " "),+);

            /// The word the CLI prints.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$var => $word,)+ }
            }

            /// Parses the CLI's word.
            pub fn from_word(s: &str) -> Option<Self> {
                match s { $($word => Some($ty::$var),)+ _ => None }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<$ty> for $wire {
            fn from(v: $ty) -> $wire {
                match v { $($ty::$var => <$wire>::$wvar,)+ }
            }
        }

        impl From<$ty> for i32 {
            fn from(v: $ty) -> i32 {
                <$wire>::from(v) as i32
            }
        }

        impl TryFrom<i32> for $ty {
            type Error = i32;
            fn try_from(v: i32) -> Result<Self, i32> {
                match <$wire>::try_from(v) {
                    $(Ok(<$wire>::$wvar) => Ok($ty::$var),)+
                    _ => Err(v),
                }
            }
        }
    };
}

wire_enum! {
    /// How a VM came to run at the other site (or a test VM was made).
    pub enum FailoverKind => v1::FailoverKind {
        Test = Test, "test";
        Planned = Planned, "planned";
        Unplanned = Unplanned, "unplanned";
        /// The agent failed the VM over on its own, provider down.
        Local = Local, "local";
    }
}

wire_enum! {
    /// Why a recovery point is retained.
    pub enum PointKind => v1::PointKind {
        Latest = Latest, "latest";
        Hourly = Hourly, "hourly";
        AppConsistent = AppConsistent, "app-consistent";
        /// Made by a resync.
        Resync = Resync, "resync";
    }
}

wire_enum! {
    /// The phase a primary host's sender reports.
    pub enum SenderState => v1::SenderState {
        Waiting = Waiting, "waiting";
        Initial = Initial, "initial";
        Replicating = Replicating, "replicating";
        ResyncRequired = ResyncRequired, "resync-required";
        Resynchronising = Resynchronising, "resynchronising";
        Paused = Paused, "paused";
        Stopped = Stopped, "stopped";
        /// A recoverable error, retried with backoff.
        Error = Error, "error";
        /// Offline initial replication: exported, waiting for the replica host's import.
        WaitingForImport = WaitingForImport, "waiting-for-import";
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_wire_round_trip() {
        for &k in FailoverKind::ALL {
            assert_eq!(FailoverKind::from_word(k.as_str()), Some(k));
            assert_eq!(FailoverKind::try_from(i32::from(k)), Ok(k));
        }
        for &s in SenderState::ALL {
            assert_eq!(SenderState::try_from(i32::from(s)), Ok(s));
            let json = serde_json::to_string(&s).expect("ser");
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert_eq!(FailoverKind::try_from(0), Err(0));
        assert_eq!(SenderState::try_from(99), Err(99));
        assert_eq!(PointKind::AppConsistent.to_string(), "app-consistent");
    }
}
