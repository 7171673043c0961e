//! One control session, from its first message to its end: each agent message is
//! converted ([`AgentReport`]) and acted on; the revocation list is pushed at the start
//! and at every change; inventories are written as [`super::writes`] allows.
//!
//! The session is bound to its certificate ([`Binding`]): before any write (the address
//! from Hello, an inventory, a status) the host record is re-read, and a session whose
//! record moved on (renewed elsewhere, reset, re-registered, removed) or whose serial
//! was revoked ends with `PermissionDenied`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use siterecovery_certs::ca::ServerNames;
use siterecovery_proto::model::VmName;
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;
use tokio::time::Instant;
use tonic::Status;

use super::binding::Binding;
use super::renew::{RenewError, RenewLimiter, renew};
use super::report::AgentReport;
use super::service::{ControlContext, ControlError};
use super::sessions::{Outbound, Pending, now_ms};
use super::writes::{due, plan_inventory};
use crate::inventory::{HostRecord, RelationshipHosts, VmRecord};
use crate::store::{Change, VMS};

/// Whether the session goes on.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    End,
}

/// An inventory report kept until its write is due.
#[derive(Debug)]
pub(super) struct PendingInventory {
    pub vms: Vec<VmRecord>,
    pub due: Instant,
    /// Keys of the VM records the report deleted when it came (this host's VMs it no
    /// longer lists); the write deletes no other.
    pub deletable: std::collections::HashSet<String>,
}

/// A live session's state.
pub(super) struct Session<C> {
    pub state: Arc<C>,
    pub binding: Binding,
    /// The host record as last read.
    pub host: HostRecord,
    pub epoch: u64,
    pub pending: Arc<Mutex<Pending>>,
    pub tx: Outbound,
    pub renewals: RenewLimiter,
    pub hello_seen: bool,
    /// The latest inventory not written yet, and when it is due.
    pub inventory: Option<PendingInventory>,
    /// Expiry of the bound certificate (unix ms; 0: unknown): the session ends then.
    pub cert_expires_unix_ms: i64,
    /// Cancelled at shutdown or when a newer session of this host replaced this one.
    pub ended: tokio_util::sync::CancellationToken,
}

impl<C: ControlContext> Session<C> {
    pub fn new(
        state: Arc<C>,
        binding: Binding,
        host: HostRecord,
        epoch: u64,
        pending: Arc<Mutex<Pending>>,
        tx: Outbound,
        cert_expires_unix_ms: i64,
    ) -> Self {
        Self {
            ended: tokio_util::sync::CancellationToken::new(),
            cert_expires_unix_ms,
            state,
            binding,
            host,
            epoch,
            pending,
            tx,
            renewals: RenewLimiter::default(),
            hello_seen: false,
            inventory: None,
        }
    }

    /// The session ends when `ended` is cancelled (another session of the host opened).
    pub fn ended_by(mut self, ended: tokio_util::sync::CancellationToken) -> Self {
        self.ended = ended;
        self
    }

    /// Runs until the agent closes, the stream breaks, the session's binding is lost,
    /// or shutdown.
    pub async fn run<S>(mut self, mut inbound: S)
    where
        S: Stream<Item = Result<v1::AgentMessage, Status>> + Unpin + Send,
    {
        let mut revocations = self.state.revocations().subscribe();
        let mut revocations_open = true;
        let mut flow = self.push_revocations().await;
        while flow == Flow::Continue {
            let due = self.inventory.as_ref().map(|p| p.due);
            let expires = (self.cert_expires_unix_ms > 0).then(|| {
                let left = self.cert_expires_unix_ms.saturating_sub(now_ms());
                Instant::now() + std::time::Duration::from_millis(u64::try_from(left).unwrap_or(0))
            });
            flow = tokio::select! {
                m = inbound.next() => match m {
                    Some(Ok(m)) => self.on_message(m).await,
                    Some(Err(e)) => {
                        tracing::warn!(host = %self.host.name, "control session lost: {e}");
                        Flow::End
                    }
                    None => {
                        tracing::info!(host = %self.host.name, "host closed its control session");
                        Flow::End
                    }
                },
                changed = revocations.changed(), if revocations_open => match changed {
                    Ok(()) => self.push_revocations().await,
                    Err(_) => {
                        revocations_open = false;
                        Flow::Continue
                    }
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.flush_inventory().await
                }
                _ = tokio::time::sleep_until(expires.unwrap_or_else(Instant::now)), if expires.is_some() => {
                    self.end(ControlError::Certificate(format!("{} expired", self.binding.serial))).await
                }
                _ = self.state.shutdown().cancelled() => Flow::End,
                _ = self.ended.cancelled() => {
                    if self.state.shutdown().is_cancelled() {
                        Flow::End
                    } else {
                        self.end(ControlError::Replaced).await
                    }
                }
            };
        }
        self.state.sessions().close(&self.binding.id, self.epoch);
        // Waiters of this stream's commands see a disconnection (their senders drop).
        if let Ok(mut p) = self.pending.lock() {
            p.clear();
        }
    }

    /// Ends the session: logged once here, and the agent is told why.
    async fn end(&self, e: ControlError) -> Flow {
        match &e {
            ControlError::Store(_) => {}
            _ => tracing::warn!(host = %self.host.name, host_id = %self.binding.id, "control session ended: {e}"),
        }
        let _ = self.tx.send(Err(e.into())).await;
        Flow::End
    }

    async fn push(&self, command: Command) {
        let _ = self.tx.send(Ok(v1::ProviderMessage { command_id: 0, command: Some(command) })).await;
    }

    /// Pushes the revocation list; ends the session when its own serial is on it.
    async fn push_revocations(&self) -> Flow {
        let (version, serials) = self.state.revocations().snapshot();
        self.push(Command::RevocationList(v1::RevocationList { version, serials })).await;
        if self.state.revocations().is_revoked(&self.binding.serial) {
            return self.end(ControlError::Revoked(self.binding.serial.clone())).await;
        }
        Flow::Continue
    }

    /// The host record, when the session is still bound to it.
    async fn bound(&mut self) -> Result<(), Flow> {
        match self.binding.check(self.state.store()) {
            Ok(h) => {
                self.host = h;
                Ok(())
            }
            Err(e @ ControlError::Store(_)) => {
                tracing::error!(host = %self.host.name, "cannot read the host record: {e:#}");
                Err(Flow::Continue)
            }
            Err(e) => Err(self.end(e).await),
        }
    }

    async fn on_message(&mut self, m: v1::AgentMessage) -> Flow {
        match AgentReport::from_wire(m, &self.binding.id) {
            Ok(report) => self.handle(report).await,
            // The values in `e` are shortened by the conversion (they come from the agent).
            Err(e) => self.end(ControlError::Report(e)).await,
        }
    }

    async fn handle(&mut self, report: AgentReport) -> Flow {
        let sessions = self.state.sessions();
        match report {
            AgentReport::Empty => {}
            AgentReport::Heartbeat { free_bytes } => sessions.update_status(&self.binding.id, |s| {
                s.last_heartbeat_unix_ms = now_ms();
                s.free_bytes = free_bytes;
            }),
            AgentReport::Hello { agent_version, listen_address } => {
                sessions.update_status(&self.binding.id, |s| s.agent_version = Some(agent_version));
                // Only the first Hello of a session may move the address: a stream of
                // Hellos is not a stream of writes.
                let first = !std::mem::replace(&mut self.hello_seen, true);
                if let Some(address) = listen_address.filter(|a| first && *a != self.host.address) {
                    return self.record_address(address).await;
                }
            }
            AgentReport::Inventory { vms, free_bytes } => {
                sessions.update_status(&self.binding.id, |s| {
                    s.last_heartbeat_unix_ms = now_ms();
                    s.free_bytes = free_bytes;
                });
                return self.offer_inventory(vms).await;
            }
            AgentReport::Replication(r) => {
                if let Err(flow) = self.bound().await {
                    return flow;
                }
                self.state.on_replication(&self.host, &r);
            }
            AgentReport::RenewCertificate { csr_pem } => return self.renew(&csr_pem).await,
            AgentReport::Result(r) => {
                let waiter = self.pending.lock().ok().and_then(|mut p| p.remove(&r.command_id));
                match waiter {
                    Some(w) => {
                        let _ = w.send(*r);
                    }
                    // An agent that does not know a push answers it like a command.
                    None if r.command_id == 0 => tracing::debug!(host = %self.host.name, "answer to a push ignored"),
                    None => {
                        tracing::warn!(host = %self.host.name, command_id = r.command_id, "result for an unknown command")
                    }
                }
            }
        }
        Flow::Continue
    }

    async fn record_address(&mut self, address: String) -> Flow {
        if let Err(e) = ServerNames::for_address(&address) {
            tracing::warn!(host = %self.host.name, "listen address in Hello ignored: {e}");
            return Flow::Continue;
        }
        match self.binding.update(self.state.store(), |h| {
            let changed = h.address != address;
            h.address = address.clone();
            changed
        }) {
            Ok(h) => self.host = h,
            Err(e @ ControlError::Store(_)) => {
                tracing::error!(host = %self.host.name, "cannot record host address: {e:#}")
            }
            Err(e) => return self.end(e).await,
        }
        Flow::Continue
    }

    fn relationships(&self, vms: &[VmRecord]) -> HashMap<VmName, RelationshipHosts> {
        vms.iter().filter_map(|v| self.state.relationship_hosts(&v.name).map(|r| (v.name.clone(), r))).collect()
    }

    /// Classifies a report against the store (read only) and schedules its write.
    async fn offer_inventory(&mut self, vms: Vec<VmRecord>) -> Flow {
        if let Err(flow) = self.bound().await {
            return flow;
        }
        let stored = match self.state.store().list::<VmRecord>(VMS) {
            Ok(v) => v.into_iter().map(|v| (v.name.to_string(), v)).collect::<Vec<_>>(),
            Err(e) => {
                tracing::error!(host = %self.host.name, "cannot read the inventory: {e:#}");
                return Flow::Continue;
            }
        };
        let rels = self.relationships(&vms);
        let plan = plan_inventory(&stored, &self.binding.id, &vms, |n| rels.get(n).cloned());
        for (vm, why) in &plan.refused {
            if self.state.sessions().first_refusal(&self.binding.id, vm.as_str()) {
                let vm: String = vm.as_str().chars().take(80).collect();
                tracing::warn!(host = %self.host.name, %vm, "reported VM refused, not recorded: {why}");
            }
        }
        let now = Instant::now();
        let last = self.state.sessions().last_inventory_write(&self.binding.id);
        let limits = self.state.write_limits();
        // A report equal to the store is "written" on the slow clock too: nothing is
        // committed, but failover hears of the host's VMs.
        let mut at = due(plan.difference, last, now, &limits);
        if let Some(earlier) = &self.inventory {
            at = at.min(earlier.due);
        }
        let deletable = plan
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Delete(key) => Some(key.clone()),
                Change::Put(..) => None,
            })
            .collect();
        self.inventory = Some(PendingInventory { vms, due: at, deletable });
        if at <= now { self.flush_inventory().await } else { Flow::Continue }
    }

    /// Writes the pending inventory, deciding again inside the write transaction.
    async fn flush_inventory(&mut self) -> Flow {
        let Some(PendingInventory { vms, deletable, .. }) = self.inventory.take() else { return Flow::Continue };
        if let Err(flow) = self.bound().await {
            return flow;
        }
        let rels = self.relationships(&vms);
        let id = self.binding.id.clone();
        let written = self.state.store().reconcile(VMS, |stored: &[(String, VmRecord)]| {
            let plan = plan_inventory(stored, &id, &vms, |n| rels.get(n).cloned());
            // A report written late deletes only what was this host's when it came: a VM
            // placed here since (a failover's record) is not in it and must stay.
            let changes = plan
                .changes
                .iter()
                .filter(|c| match c {
                    Change::Delete(key) => deletable.contains(key),
                    Change::Put(..) => true,
                })
                .cloned()
                .collect();
            (changes, plan)
        });
        self.state.sessions().inventory_written(&self.binding.id, Instant::now());
        match written {
            Ok(plan) => self.state.on_inventory(&self.host, &plan.recorded),
            Err(e) => tracing::error!(host = %self.host.name, "cannot record inventory: {e:#}"),
        }
        Flow::Continue
    }

    async fn renew(&mut self, csr_pem: &str) -> Flow {
        let answer = |certificate_pem: String, error: String| {
            Command::CertificateIssued(v1::CertificateIssued { certificate_pem, error })
        };
        if !self.renewals.allow(Instant::now()) {
            tracing::warn!(host = %self.host.name, "certificate renewal refused: {}", RenewError::TooMany);
            self.push(answer(String::new(), RenewError::TooMany.to_string())).await;
            return Flow::Continue;
        }
        let old = self.binding.serial.clone();
        match renew(self.state.as_ref(), &mut self.binding, csr_pem) {
            Ok(pem) => {
                if let Ok((_, not_after)) = siterecovery_certs::ca::validity(&pem) {
                    self.cert_expires_unix_ms = not_after.saturating_mul(1000);
                }
                tracing::info!(host = %self.host.name, old_serial = %old, serial = %self.binding.serial,
                    "host certificate renewed");
                self.push(answer(pem, String::new())).await;
                Flow::Continue
            }
            Err(RenewError::Session(e)) => {
                self.push(answer(String::new(), e.to_string())).await;
                self.end(e).await
            }
            Err(e) => {
                tracing::warn!(host = %self.host.name, "certificate renewal refused: {e}");
                self.push(answer(String::new(), e.to_string())).await;
                Flow::Continue
            }
        }
    }
}
