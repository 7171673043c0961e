//! The vault PKI.
