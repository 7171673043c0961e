//! Errors of converting a wire message into domain types, and the helpers receivers use.
//!
//! Every conversion names the field it refused (`create_vm.disks[1].id`) and the rule
//! it broke; a service answers it with `InvalidArgument` before anything touches a file.

use std::str::FromStr;

use crate::model::names::NameError;

/// A wire message that does not convert into domain types.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A name or id field breaks its rule.
    #[error("{field}: {source}")]
    Invalid {
        field: String,
        #[source]
        source: NameError,
    },
    /// A required field (or message) is absent or empty.
    #[error("{field}: required")]
    Missing { field: String },
    /// An enum field holds an unspecified or unknown value.
    #[error("{field}: value {value} is not one of {allowed}")]
    Enum { field: String, value: i32, allowed: &'static str },
    /// Any other rule of a field (a range, a combination).
    #[error("{field}: {reason}")]
    Rule { field: String, reason: String },
}

impl WireError {
    pub fn missing(field: impl Into<String>) -> Self {
        Self::Missing { field: field.into() }
    }

    pub fn rule(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Rule { field: field.into(), reason: reason.into() }
    }

    /// The refused field.
    pub fn field(&self) -> &str {
        match self {
            Self::Invalid { field, .. }
            | Self::Missing { field }
            | Self::Enum { field, .. }
            | Self::Rule { field, .. } => field,
        }
    }
}

impl From<WireError> for tonic::Status {
    fn from(e: WireError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Converts a required name/id field.
pub fn field<T: FromStr<Err = NameError>>(field: &str, value: &str) -> Result<T, WireError> {
    if value.is_empty() {
        return Err(WireError::missing(field));
    }
    value.parse().map_err(|source| WireError::Invalid { field: field.to_owned(), source })
}

/// Converts an optional name/id field: empty is `None`.
pub fn optional<T: FromStr<Err = NameError>>(field_name: &str, value: &str) -> Result<Option<T>, WireError> {
    if value.is_empty() { Ok(None) } else { field(field_name, value).map(Some) }
}

/// Converts every element of a repeated name/id field (`field[i]`).
pub fn each<T: FromStr<Err = NameError>>(field_name: &str, values: &[String]) -> Result<Vec<T>, WireError> {
    values.iter().enumerate().map(|(i, v)| field(&format!("{field_name}[{i}]"), v)).collect()
}

/// Converts a required enum field (the wire's `i32`) into a domain enum.
pub fn enumeration<E: TryFrom<i32>>(field: &str, value: i32, allowed: &'static str) -> Result<E, WireError> {
    E::try_from(value).map_err(|_| WireError::Enum { field: field.to_owned(), value, allowed })
}

/// A required sub-message.
pub fn required<'a, T>(field: &str, value: &'a Option<T>) -> Result<&'a T, WireError> {
    value.as_ref().ok_or_else(|| WireError::missing(field))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PointId, VmName};

    #[test]
    fn fields_name_themselves() {
        let e = field::<VmName>("failover.vm", "../x").expect_err("hostile");
        assert_eq!(e.field(), "failover.vm");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("failover.vm") && status.message().contains("VM name"),
            "{}",
            status.message()
        );
        assert_eq!(field::<VmName>("vm", ""), Err(WireError::missing("vm")));
        assert_eq!(optional::<PointId>("point", ""), Ok(None));
        let e = each::<VmName>("group.vms", &["a".into(), "b/c".into()]).expect_err("hostile");
        assert_eq!(e.field(), "group.vms[1]");
    }
}
