//! Test failover: a `V-test` VM on an overlay over the chosen point, on the replica
//! host, while replication goes on.

use siterecovery_proto::model::FailoverKind;
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::common::{disks_text, nics_text, record_vm, reported_point, resolve_point, update, vm_failover};
use super::start::Run;
use crate::jobs::now_ms;
use crate::network;
use crate::relationship::TestFailoverRecord;

pub(crate) const START_TEST_VM: &str = "Start the test VM on the replica host";

/// Runs the job's steps after the check; false when the job failed.
pub(crate) async fn run(run: &mut Run) -> bool {
    let vm = run.rel.vm.clone();
    let rname = run.rname.clone();
    run.job.start_step(START_TEST_VM, &format!("on {rname}"), now_ms());
    run.save();
    let point = match resolve_point(&run.state, &run.rel, &run.opts.point).await {
        Ok(p) => p,
        Err(e) => {
            run.fail(&e.to_string());
            return false;
        }
    };
    let test_vm = format!("{vm}-test");
    let nics = network::test_nics(&run.rel.addresses, &run.macs, run.opts.test_network);
    let cmd = Command::Failover(v1::Failover {
        relationship_id: run.rel.id.clone(),
        vm: vm.clone(),
        point: point.clone(),
        nics: nics.clone(),
        test: true,
        test_vm_name: test_vm.clone(),
        planned: false,
    });
    let timeout = run.state.protection.config.command_timeout;
    let res = match run.state.agents.command(&run.rel.replica_host_id, cmd, timeout).await {
        Ok(r) => r,
        Err(s) => {
            run.fail(&format!("replica host {rname}: {}", s.message()));
            return false;
        }
    };
    let point_id = reported_point(&res, &point);
    let rec = record_vm(
        &run.state,
        &res,
        &run.rel.replica_host_id,
        &test_vm,
        &nics,
        vm_failover(&run.rel, FailoverKind::Test, &point_id, false, &vm),
    );
    let mode = run.opts.test_network.as_str();
    let t = TestFailoverRecord {
        test_vm: test_vm.clone(),
        point_id: point_id.clone(),
        network: mode.into(),
        job_id: run.job.id.clone(),
        started_unix_ms: now_ms(),
    };
    if let Err(e) = update(&run.state, &run.rel.id, |r| {
        r.test_failover = Some(t);
        Ok(())
    }) {
        run.fail(&e.to_string());
        return false;
    }
    run.job.succeed_step(
        START_TEST_VM,
        &format!(
            "test VM {test_vm} runs on {rname} from point {point_id} (network {mode}){}{}; replication goes on; \
             remove it with `failover cleanup {vm}`",
            nics_text(&nics),
            disks_text(rec.as_ref())
        ),
        now_ms(),
    );
    true
}
