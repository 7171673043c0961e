//! The operator's CLI: the command groups of `provider` that talk to a running provider
//! over mutual TLS, each with its clap definitions, its calls and its rendering as text
//! or JSON.
//!
//! Below the groups: [`connect`] (certificates, channel, errors as sentences),
//! [`views`] (the `--json` shapes, serialised from the `v1` messages), [`words`] (the
//! words printed for the wire's enums) and [`output`] (tables, dates, ages). The server
//! core never imports this module.

pub mod connect;
pub mod failover;
pub mod hosts;
pub mod inventory;
pub mod jobs;
pub mod nbd_cert;
pub mod network;
pub mod output;
pub mod plan;
pub mod protection;
pub mod vault;
pub mod views;
pub mod words;

pub use connect::{OperatorCerts, connect, rpc_error};
use siterecovery_proto::v1::inventory_client::InventoryClient;
use siterecovery_proto::v1::protection_client::ProtectionClient;
use tonic::transport::Channel;

/// Failure to reach or talk to the provider.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no provider address: pass --connect HOST:PORT or set SITERECOVERY_CONNECT")]
    NoAddress,
    #[error("no operator certificates: pass --certs DIR (from `provider operator-cert`) or set SITERECOVERY_CERTS")]
    NoCerts,
    #[error("cannot read operator certificates in {dir}: {reason}")]
    Certs { dir: std::path::PathBuf, reason: String },
    #[error("operator certificate {path} is not valid now: {reason}; ask for a new one with `provider operator-cert`")]
    Expired { path: std::path::PathBuf, reason: String },
    #[error("cannot reach the provider at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error(
        "the provider at {address} refused the connection's TLS: {reason} (are --certs from this provider's vault?)"
    )]
    Tls { address: String, reason: String },
    #[error("{0}")]
    Rpc(String),
    #[error("job {id} ({kind}) failed: {error}")]
    JobFailed { id: String, kind: String, error: String },
    #[error("lost the stream of job {id} while it ran; follow it again with `job watch {id}`")]
    JobLost { id: String },
    #[error("output: {0}")]
    Output(String),
    #[error("{0}")]
    Usage(String),
}

/// A connected operator: both service clients, the output mode, and the address that
/// RPC errors are explained against.
pub struct Operator {
    pub inv: InventoryClient<Channel>,
    pub prot: ProtectionClient<Channel>,
    /// `--json`: print the views as JSON instead of tables and sentences.
    pub json: bool,
    address: String,
}

impl Operator {
    /// Connects to `address` with the operator certificates in `certs`.
    pub async fn connect(address: String, certs: &OperatorCerts, json: bool) -> Result<Self, CliError> {
        let channel = connect(&address, certs).await?;
        Ok(Self { inv: InventoryClient::new(channel.clone()), prot: ProtectionClient::new(channel), json, address })
    }

    /// Turns an RPC status into an operator-facing error.
    pub fn rpc(&self, s: tonic::Status) -> CliError {
        rpc_error(&self.address, s)
    }
}
