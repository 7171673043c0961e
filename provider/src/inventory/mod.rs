//! Inventory: sites, clouds, hosts and VMs as the provider knows them, and the
//! operator's Inventory service.
//!
//! Hosts are persisted at registration; their connection state and heartbeat live in
//! the control sessions (module `control`). VMs are reported by their hosts (a full
//! list at each connection, and with every command result) and persisted, so the
//! inventory is intact across provider restarts even before hosts reconnect.
//!
//! - [`records`]: the stored records and their wire conversions.
//! - [`service`]: the Inventory service, its requests and errors.
//! - [`hosts`]: the operator's commands on hosts: reset, remove, move, the revoked
//!   certificates.

pub mod hosts;
pub mod machine;
pub mod records;
pub mod service;

pub use records::{
    DiskRecord, FailoverRecord, HostRecord, LiveStatus, NicRecord, PowerState, RefusedReport, RelationshipHosts,
    ReportVerdict, VmRecord, is_host_port, judge_report, report_wins,
};
pub use service::{CreateVmRequest, InventoryContext, InventoryError, InventoryService, NicSpec};
