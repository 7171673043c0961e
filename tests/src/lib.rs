//! Harness for the end-to-end tests: real `provider` and `agent` processes on loopback,
//! real certificates, and the real clients operators use (`grpcurl`, `qemu-io`, `qemu-img`).
//!
//! Every test makes its own [`Lab`] (or a [`World`]: a lab with two connected sites):
//! a short temp dir under `/tmp`, its own loopback ports, and log files for every
//! process it starts. Processes ([`Proc`]) are stopped by PID when dropped. When a test
//! panics, dropping its `Lab` prints the tail of every log and of the command
//! transcript, so a CI failure can be read from its output.
//!
//! No bare sleeps synchronise anything: waits poll a condition with a bounded deadline
//! ([`wait_until`]).
//!
//! Modules, lowest first: [`wait`] (clocks, polls), [`output`] (a command's output and
//! the assertions on it), [`proc`] (binaries, ports, processes), [`proxy`] (network faults), [`files`], [`lab`]
//! (starting things, running commands), then what runs in a lab: [`cli`] (the operator
//! CLI and its JSON), [`grpcurl`], [`qemu`], [`guest`] (a real Linux guest for the QEMU hook), [`writers`] (background qemu-io writers), [`service`] (systemd's notify socket, health checks),
//! [`world`] (the two-site set-up), and [`campaign`] (the seeded crash campaign).

pub mod campaign;
pub mod cli;
pub mod files;
pub mod grpcurl;
pub mod guest;
pub mod lab;
pub mod metrics;
pub mod output;
pub mod proc;
pub mod proxy;
pub mod qemu;
pub mod service;
pub mod tmpfs;
pub mod wait;
pub mod world;
pub mod writers;

pub use cli::{EVENT_TIMEOUT, JOB_TIMEOUT, job_from, job_resync_figures, resync_figures, step, try_step};
pub use files::{Tree, files_ending, snapshot, tree_diff, write_script};
pub use grpcurl::{grpc_exit, host_tls, proto_args, proto_dir, strings, tls_args};
pub use lab::{COMMAND_TIMEOUT, HEARTBEAT, HostSlot, Lab};
pub use output::{assert_exit, assert_fails, assert_fails_saying, assert_ok, describe, stderr, stdout};
pub use proc::{Proc, TERM_DEADLINE, bin, free_port};
pub use proxy::{FaultProxy, Mode};
pub use service::NotifySocket;
pub use tmpfs::Tmpfs;
pub use wait::{POLL, holds_for, unix_now, unix_now_ms, wait_until, wait_until_every};
pub use world::{TEST_INTERVALS, World};
pub use writers::{ACK_BLOCK, AckWriter, Writer, pattern_at, random_u64};
