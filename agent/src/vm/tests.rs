//! Unit tests of the VM manager: the config file in the envelope, legacy and damaged
//! configs at load.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use siterecovery_proto::model::VmName;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::nbd::Exports;
use crate::persist::{self, VM_CONFIG};
use crate::replica::ReplicaSet;

async fn manager(root: &Path) -> VmManager {
    let replicas = Arc::new(ReplicaSet::open(&root.join("replicas")).expect("replicas"));
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    VmManager::load(
        root.join("vms"),
        replicas,
        Arc::new(Exports::new()),
        addr,
        crate::files::SocketAccess::default(),
        Hooks::default(),
        CancellationToken::new(),
    )
    .await
    .expect("load")
}

fn vm(name: &str) -> VmName {
    VmName::new(name).expect("a valid VM name")
}

async fn names(mgr: &VmManager) -> Vec<String> {
    mgr.list().await.into_iter().map(|v| v.name).collect()
}

#[tokio::test]
async fn configs_are_in_the_envelope_and_legacy_ones_still_load() {
    let dir = tempfile::tempdir().expect("tmp");
    let mgr = manager(dir.path()).await;
    mgr.create(&vm("vm1"), &[1 << 20], &[], Default::default(), false).await.expect("create");
    let folder = mgr.folder(&vm("vm1")).await.expect("folder");
    let config = mgr.config(&vm("vm1")).await.expect("config");
    drop(mgr);
    let path = folder.join(CONFIG_FILE);
    let stored = std::fs::read(&path).expect("vm.json");
    assert_eq!(&stored[..4], &VM_CONFIG.magic);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
    // What older agents wrote: plain JSON.
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("legacy");
    assert_eq!(read_config(&folder).expect("read"), Some(config.clone()));
    let mgr = manager(dir.path()).await;
    assert_eq!(mgr.config(&vm("vm1")).await, Some(config));
    mgr.set_tracking(&vm("vm1"), true).await.expect("tracking");
    assert_eq!(&std::fs::read(&path).expect("vm.json")[..4], &VM_CONFIG.magic, "rewritten in the envelope");
    assert_eq!(read_config(&dir.path().join("vms/none")).expect("no folder"), None);
}

#[tokio::test]
async fn a_torn_or_corrupt_config_skips_the_vm_and_keeps_its_folder() {
    let dir = tempfile::tempdir().expect("tmp");
    let mgr = manager(dir.path()).await;
    mgr.create(&vm("good"), &[1 << 20], &[], Default::default(), false).await.expect("create");
    mgr.create(&vm("bad"), &[1 << 20], &[], Default::default(), false).await.expect("create");
    let folder = mgr.folder(&vm("bad")).await.expect("folder");
    drop(mgr);
    let path = folder.join(CONFIG_FILE);
    let good = std::fs::read(&path).expect("vm.json");
    let mut corrupt = good.clone();
    corrupt[persist::HEADER_LEN + 3] ^= 0x01;
    let newer = [&VM_CONFIG.magic[..], &(VM_CONFIG.version + 1).to_le_bytes(), &good[6..]].concat();
    for (what, bytes) in [("torn", good[..20].to_vec()), ("corrupt", corrupt), ("newer", newer)] {
        std::fs::write(&path, &bytes).expect("damage");
        let err = read_config(&folder).expect_err(what);
        assert_eq!(err.path(), path, "{what}");
        assert!(err.is_damage(), "{what}: {err}");
        let mgr = manager(dir.path()).await;
        assert_eq!(names(&mgr).await, vec!["good".to_owned()], "{what}");
        drop(mgr);
        assert_eq!(std::fs::read(&path).expect("kept"), bytes, "{what}: the damaged file is kept");
        assert!(folder.join("disk0.img").exists(), "{what}: the image is kept");
    }
    std::fs::write(&path, &good).expect("repair");
    assert_eq!(names(&manager(dir.path()).await).await, vec!["bad".to_owned(), "good".to_owned()]);
}
