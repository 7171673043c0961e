//! The Protection service: thin handlers. Each authorises the operator, converts the
//! request once into domain types ([`crate::protection::requests`]; an invalid field is
//! refused with `InvalidArgument` naming it, before anything touches the store), calls
//! the domain function and maps its typed error with [`crate::error::status`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use siterecovery_certs::{Role, VaultId};
use siterecovery_proto::model::{PolicyName, wire};
use siterecovery_proto::v1;
use siterecovery_proto::v1::protection_server::Protection;
use tonic::{Request, Response, Status};

use crate::auth::authorize;
use crate::error::{Classify, status, store_err};
use crate::failover;
use crate::jobs::{JobRecord, JobState};
use crate::protection::requests::{ExportPoint, ImportInitial, JobRef, ProtectVm, UnpairClouds, VmTarget};
use crate::protection::{self, points, settings};
use crate::relationship::Core;
use crate::{network, policy};

pub struct ProtectionService {
    pub core: Arc<Core>,
    pub vault_id: VaultId,
}

type JobStream = Pin<Box<dyn Stream<Item = Result<v1::Job, Status>> + Send>>;

/// The request as domain types, or `InvalidArgument` naming the field.
fn convert<'a, T: TryFrom<&'a M, Error = E>, M, E: Classify>(m: &'a M) -> Result<T, Status> {
    T::try_from(m).map_err(|e| status(&e))
}

fn st<E: Classify>(e: E) -> Status {
    status(&e)
}

impl ProtectionService {
    fn auth<T>(&self, req: &Request<T>) -> Result<(), Status> {
        authorize(req, &self.vault_id, &[Role::Operator]).map(|_| ())
    }
}

#[tonic::async_trait]
impl Protection for ProtectionService {
    async fn failover(&self, req: Request<v1::FailoverRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = failover::StartFailover::try_from(req.get_ref()).map_err(st)?;
        let job = failover::start_failover(&self.core, r).await.map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn commit_failover(&self, req: Request<v1::VmRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let VmTarget(vm) = convert(req.get_ref())?;
        let job = failover::start_commit(&self.core, &vm).await.map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn cleanup_test_failover(&self, req: Request<v1::VmRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let VmTarget(vm) = convert(req.get_ref())?;
        let job = failover::start_cleanup(&self.core, &vm).await.map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn change_point(&self, req: Request<v1::ChangePointRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = failover::ChangePoint::try_from(req.get_ref()).map_err(st)?;
        let job = failover::start_change_point(&self.core, &r.vm, r.point).await.map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn reprotect(&self, req: Request<v1::VmRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let VmTarget(vm) = convert(req.get_ref())?;
        let job = failover::start_reprotect(&self.core, &vm).await.map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn create_network(&self, req: Request<v1::VmNetwork>) -> Result<Response<v1::VmNetwork>, Status> {
        self.auth(&req)?;
        let n = network::NetworkRequest::try_from(req.get_ref()).map_err(st)?;
        let rec = settings::create_network(&self.core, &n).map_err(st)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_networks(
        &self,
        req: Request<v1::ListNetworksRequest>,
    ) -> Result<Response<v1::ListNetworksResponse>, Status> {
        self.auth(&req)?;
        let nets = settings::list_networks(&self.core).map_err(st)?;
        Ok(Response::new(v1::ListNetworksResponse { networks: nets.iter().map(|n| n.to_proto()).collect() }))
    }

    async fn map_network(&self, req: Request<v1::NetworkMapping>) -> Result<Response<v1::NetworkMapping>, Status> {
        self.auth(&req)?;
        let m = network::MappingRequest::try_from(req.get_ref()).map_err(st)?;
        let rec = settings::map_network(&self.core, &m).map_err(st)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_network_mappings(
        &self,
        req: Request<v1::ListNetworkMappingsRequest>,
    ) -> Result<Response<v1::ListNetworkMappingsResponse>, Status> {
        self.auth(&req)?;
        let maps = settings::list_mappings(&self.core).map_err(st)?;
        Ok(Response::new(v1::ListNetworkMappingsResponse { mappings: maps.iter().map(|m| m.to_proto()).collect() }))
    }

    async fn create_plan(&self, req: Request<v1::RecoveryPlan>) -> Result<Response<v1::RecoveryPlan>, Status> {
        self.auth(&req)?;
        let spec = crate::plan::PlanSpec::try_from(req.get_ref()).map_err(st)?;
        let rec = crate::plan::create(&self.core, spec).map_err(st)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_plans(&self, req: Request<v1::ListPlansRequest>) -> Result<Response<v1::ListPlansResponse>, Status> {
        self.auth(&req)?;
        let plans = crate::plan::list(&self.core).map_err(st)?;
        Ok(Response::new(v1::ListPlansResponse { plans: plans.iter().map(|p| p.to_proto()).collect() }))
    }

    async fn plan_failover(&self, req: Request<v1::PlanFailoverRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = crate::plan::PlanFailover::try_from(req.get_ref()).map_err(st)?;
        let job = crate::plan::start_failover(&self.core, &r.plan, r.kind).await.map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn confirm_plan_action(
        &self,
        req: Request<v1::ConfirmPlanActionRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = crate::plan::ConfirmAction::try_from(req.get_ref()).map_err(st)?;
        let job = crate::plan::confirm(&self.core, &r.job).map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn create_policy(&self, req: Request<v1::Policy>) -> Result<Response<v1::Policy>, Status> {
        self.auth(&req)?;
        let p = policy::PolicyRequest::try_from(req.get_ref()).map_err(st)?;
        let rec = settings::create_policy(&self.core, &p).map_err(st)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_policies(
        &self,
        req: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        self.auth(&req)?;
        let policies = settings::list_policies(&self.core).map_err(st)?;
        Ok(Response::new(v1::ListPoliciesResponse { policies: policies.iter().map(|p| p.to_proto()).collect() }))
    }

    async fn delete_policy(
        &self,
        req: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        self.auth(&req)?;
        let name: PolicyName = wire::field("delete_policy.name", &req.get_ref().name).map_err(st)?;
        settings::delete_policy(&self.core, &name).map_err(st)?;
        Ok(Response::new(v1::DeletePolicyResponse {}))
    }

    async fn pair_clouds(&self, req: Request<v1::CloudPairing>) -> Result<Response<v1::CloudPairing>, Status> {
        self.auth(&req)?;
        let r = policy::PairingRequest::try_from(req.get_ref()).map_err(st)?;
        let rec = settings::pair_clouds(&self.core, &r).map_err(st)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_pairings(
        &self,
        req: Request<v1::ListPairingsRequest>,
    ) -> Result<Response<v1::ListPairingsResponse>, Status> {
        self.auth(&req)?;
        let pairings = settings::list_pairings(&self.core).map_err(st)?;
        Ok(Response::new(v1::ListPairingsResponse { pairings: pairings.iter().map(|p| p.to_proto()).collect() }))
    }

    async fn unpair_clouds(
        &self,
        req: Request<v1::UnpairCloudsRequest>,
    ) -> Result<Response<v1::UnpairCloudsResponse>, Status> {
        self.auth(&req)?;
        let UnpairClouds(source) = convert(req.get_ref())?;
        settings::unpair_clouds(&self.core, &source).map_err(st)?;
        Ok(Response::new(v1::UnpairCloudsResponse {}))
    }

    async fn protect(&self, req: Request<v1::ProtectRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let ProtectVm { vm, export_dir } = convert(req.get_ref())?;
        let job = protection::start_protect(&self.core, &vm, &export_dir).await.map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn import_initial(&self, req: Request<v1::ImportInitialRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let ImportInitial { vm, dir } = convert(req.get_ref())?;
        let job = protection::start_import(&self.core, &vm, &dir).await.map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn unprotect(&self, req: Request<v1::UnprotectRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let VmTarget(vm) = convert(req.get_ref())?;
        let job = protection::start_unprotect(&self.core, &vm).await.map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn resync(&self, req: Request<v1::ResyncRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let VmTarget(vm) = convert(req.get_ref())?;
        let job = protection::start_resync(&self.core, &vm).await.map_err(st)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn list_points(
        &self,
        req: Request<v1::ListPointsRequest>,
    ) -> Result<Response<v1::ListPointsResponse>, Status> {
        self.auth(&req)?;
        let VmTarget(vm) = convert(req.get_ref())?;
        let points = points::list_points(&self.core, &vm).await.map_err(st)?;
        Ok(Response::new(v1::ListPointsResponse { points }))
    }

    async fn export_point(
        &self,
        req: Request<v1::ExportPointRequest>,
    ) -> Result<Response<v1::ExportPointResponse>, Status> {
        self.auth(&req)?;
        let ExportPoint { vm, point } = convert(req.get_ref())?;
        let e = points::export_point(&self.core, &vm, point).await.map_err(st)?;
        Ok(Response::new(v1::ExportPointResponse { uri: e.uri, point_id: e.point_id }))
    }

    async fn unexport_point(
        &self,
        req: Request<v1::UnexportPointRequest>,
    ) -> Result<Response<v1::UnexportPointResponse>, Status> {
        self.auth(&req)?;
        let VmTarget(vm) = convert(req.get_ref())?;
        points::unexport_point(&self.core, &vm).await.map_err(st)?;
        Ok(Response::new(v1::UnexportPointResponse {}))
    }

    async fn list_jobs(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        self.auth(&req)?;
        let jobs = protection::list_jobs(&self.core).map_err(st)?;
        Ok(Response::new(v1::ListJobsResponse { jobs: jobs.iter().map(|j| j.to_proto()).collect() }))
    }

    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let JobRef(id) = convert(req.get_ref())?;
        Ok(Response::new(protection::job(&self.core, id.as_str()).map_err(st)?.to_proto()))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<JobStream>, Status> {
        self.auth(&req)?;
        let JobRef(id) = convert(req.get_ref())?;
        let first = protection::job(&self.core, id.as_str()).map_err(st)?;
        Ok(Response::new(Box::pin(watch(self.core.clone(), id.to_string(), first))))
    }
}

/// The job as it changes, until it ends (or the watcher, or the provider, goes away).
fn watch(
    state: Arc<Core>,
    id: String,
    first: JobRecord,
) -> tokio_stream::wrappers::ReceiverStream<Result<v1::Job, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut changes = state.protection.jobs.subscribe();
        let mut last: Option<JobRecord> = None;
        let mut cur = first;
        loop {
            if last.as_ref() != Some(&cur) {
                if tx.send(Ok(cur.to_proto())).await.is_err() {
                    return;
                }
                if cur.state != JobState::Running {
                    return;
                }
                last = Some(cur.clone());
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = tx.closed() => return,
                _ = state.shutdown.cancelled() => return,
            }
            match state.protection.jobs.get(&state.store, &id) {
                Ok(Some(j)) => cur = j,
                Ok(None) => {
                    let _ = tx.send(Err(Status::not_found(format!("job {id} was deleted")))).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(store_err(e))).await;
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
