//! Plan runs against fake agents.
