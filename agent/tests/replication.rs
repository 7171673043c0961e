//! In-process replication tests: a primary (tracked disks + `sender`) replicating to a
//! replica host (`peer::serve` + `ReplicaSet`) over real mutual TLS on 127.0.0.1,
//! with certificates of a vault made here.
//!
//! Covered: initial copy + delta points converge the replica image to the primary's;
//! a connection cut mid-copy resumes from the acknowledged offset (not from zero); a
//! damaged HRL log triggers a resync that sends only the differing blocks; a host that
//! is not the relationship's primary is refused (PermissionDenied, non-recoverable).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use siterecovery_agent::config::{AgentConfig, AgentFiles};
use siterecovery_agent::disk::BlockDevice;
use siterecovery_agent::hrl::DiskId;
use siterecovery_agent::peer;
use siterecovery_agent::replica::{ReplicaDisk, ReplicaSet, ReplicaSpec};
use siterecovery_agent::sender::{self, SenderHandle, SenderParams, VmDisks};
use siterecovery_agent::tracker::TrackedDisk;
use siterecovery_certs::ca::ServerNames;
use siterecovery_certs::tls::PemIdentity;
use siterecovery_certs::{PeerIdentity, Role, VaultCa, VaultId};
use siterecovery_proto::v1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
// A relationship id as the provider makes them (`r-` and 8 hex digits): the peer refuses others.
const REL: &str = "r-000000e1";
const VM: &str = "vm1";

fn vm() -> siterecovery_proto::model::VmName {
    VM.parse().expect("VM name")
}
const DEADLINE: Duration = Duration::from_secs(20);

/// splitmix64: reproducible incompressible data.
fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn host_files(ca: &VaultCa, root: &Path, host_id: &str, listen: &str) -> Arc<AgentFiles> {
    let id = PeerIdentity::new(ca.vault_id().clone(), Role::Host, host_id).expect("identity");
    let (cert_pem, key_pem) = ca
        .issue_local(&id, &ServerNames::for_address(listen).expect("names"), Duration::from_secs(3600))
        .expect("issue");
    let dir = root.join(host_id);
    let config = AgentConfig {
        host_id: host_id.into(),
        host_name: host_id.into(),
        site: "s".into(),
        cloud: "c".into(),
        vault_id: ca.vault_id().as_str().into(),
        provider_address: "127.0.0.1:1".into(),
        listen_address: listen.into(),
        registered_unix: 0,
    };
    AgentFiles::save(&dir, &config, ca.cert_pem(), &PemIdentity { cert_pem, key_pem }).expect("save");
    Arc::new(AgentFiles::load(&dir).expect("load"))
}

type Disks = Vec<(DiskId, Arc<TrackedDisk>)>;

struct TestVm(Mutex<Option<Disks>>);

impl VmDisks for TestVm {
    fn disks(&self) -> Option<Disks> {
        self.0.lock().expect("lock").clone()
    }
}

/// A vault, a replica host serving its peer listener, a primary host with one VM disk.
struct Env {
    _root: tempfile::TempDir,
    root: PathBuf,
    ca: VaultCa,
    replica_addr: String,
    replicas: Arc<ReplicaSet>,
    primary: Arc<AgentFiles>,
    vm_dir: PathBuf,
    image: PathBuf,
    vm: Arc<TestVm>,
    disk: Arc<TrackedDisk>,
    shutdown: CancellationToken,
}

impl Env {
    /// `allocated`: (offset, len) ranges written into the image before tracking starts.
    async fn new(size: u64, allocated: &[(u64, u64)]) -> Env {
        siterecovery_certs::tls::install_crypto_provider();
        let root_dir = tempfile::tempdir().expect("tmp");
        let root = root_dir.path().to_owned();
        let ca = VaultCa::create(VaultId::generate(), "test").expect("ca");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let replica_addr = listener.local_addr().expect("addr").to_string();
        let replica_files = host_files(&ca, &root, "host-b", &replica_addr);
        let primary = host_files(&ca, &root, "host-a", "127.0.0.1:1");
        let replicas = Arc::new(ReplicaSet::open(&root.join("host-b/replicas")).expect("replicas"));
        replicas
            .prepare(ReplicaSpec {
                machine: Default::default(),
                relationship_id: REL.into(),
                vm: VM.into(),
                primary_host_id: "host-a".into(),
                disks: vec![ReplicaDisk { id: "disk0".into(), size_bytes: size }],
                retention_ms: 3_600_000,
                bucket_ms: 3_600_000,
            })
            .expect("prepare");
        let shutdown = CancellationToken::new();
        let health = siterecovery_proto::lifecycle::Lifecycle::starting(&[]).await.health_service();
        tokio::spawn(peer::serve(replica_files, replicas.clone(), listener, health, shutdown.clone()));

        let vm_dir = root.join("host-a/vms").join(VM);
        std::fs::create_dir_all(&vm_dir).expect("vm dir");
        let image = vm_dir.join("disk0.img");
        let f = File::create(&image).expect("image");
        f.set_len(size).expect("len");
        for (i, &(off, len)) in allocated.iter().enumerate() {
            f.write_all_at(&fill(i as u64 + 1, len as usize), off).expect("write");
        }
        drop(f);
        let disk = Arc::new(TrackedDisk::open(&image, DiskId::new("disk0").expect("id"), true).expect("tracked"));
        let vm = Arc::new(TestVm(Mutex::new(Some(vec![(DiskId::new("disk0").expect("id"), disk.clone())]))));
        Env { _root: root_dir, root, ca, replica_addr, replicas, primary, vm_dir, image, vm, disk, shutdown }
    }

    fn params(&self, address: &str, compression: bool) -> SenderParams {
        SenderParams {
            relationship_id: REL.parse().expect("relationship id"),
            vm: VM.parse().expect("VM name"),
            replica_host_id: "host-b".parse().expect("host id"),
            replica_address: address.into(),
            settings: v1::ReplicationSettings {
                interval_ms: 300,
                retention_ms: 3_600_000,
                app_consistent_every_ms: 0,
                compression,
                retry_unit_ms: 100,
                resync_window_start_hour: 0,
                resync_window_end_hour: 0,
                ..Default::default()
            },
            state_dir: self.vm_dir.clone(),
            quiesce_hook: None,
        }
    }

    fn start(&self, params: SenderParams, files: Arc<AgentFiles>) -> (SenderHandle, Statuses) {
        let (tx, rx) = mpsc::channel(1024);
        let h = sender::spawn(params, self.vm.clone(), files, tx, self.shutdown.clone());
        (h, Statuses::collect(rx))
    }

    fn replica_image(&self) -> PathBuf {
        self.replicas.get(&vm()).expect("replica").dir().join("disk0.img")
    }

    fn assert_images_equal(&self) {
        let a = std::fs::read(&self.image).expect("primary");
        let b = std::fs::read(self.replica_image()).expect("replica");
        assert_eq!(a.len(), b.len());
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            panic!("images differ first at byte {i} (block {})", i as u64 / (64 << 10));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The latest status of a sender, plus the highest bytes_replicated seen.
struct Statuses(watch::Receiver<v1::ReplicationStatus>);

impl Statuses {
    fn collect(mut rx: mpsc::Receiver<v1::ReplicationStatus>) -> Self {
        let (tx, wrx) = watch::channel(v1::ReplicationStatus::default());
        tokio::spawn(async move {
            while let Some(s) = rx.recv().await {
                let _ = tx.send(s);
            }
        });
        Statuses(wrx)
    }

    fn last(&self) -> v1::ReplicationStatus {
        self.0.borrow().clone()
    }

    /// Waits (bounded) for a status matching `pred`.
    async fn wait(&mut self, what: &str, pred: impl Fn(&v1::ReplicationStatus) -> bool) -> v1::ReplicationStatus {
        let r = tokio::time::timeout(DEADLINE, self.0.wait_for(|s| pred(s))).await.map(|r| r.map(|s| s.clone()));
        match r {
            Ok(Ok(s)) => s,
            _ => panic!("timed out waiting for {what}; last status: {:?}", self.last()),
        }
    }

    /// Waits until every write made so far is in an acknowledged point: a newer point,
    /// and the logs hold no record any more (an empty open log is its 128-byte header).
    async fn wait_point_after_now(&mut self) -> v1::ReplicationStatus {
        let seen = self.last().last_point.map_or(0, |p| p.seq);
        self.wait("a point after the writes", |s| {
            s.last_point.as_ref().is_some_and(|p| p.seq > seen) && s.pending_log_bytes < 512
        })
        .await
    }
}

fn write(disk: &TrackedDisk, seed: u64, offset: u64, len: usize) {
    disk.write_at(&fill(seed, len), offset, false).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn initial_copy_then_deltas_converge() {
    let env = Env::new(32 * MIB, &[(0, 3 * MIB), (10 * MIB, 2 * MIB + 4096), (31 * MIB, MIB)]).await;
    let (h, mut st) = env.start(env.params(&env.replica_addr, true), env.primary.clone());
    // Writes while the copy runs end up in the merged first point.
    write(&env.disk, 100, 5 * MIB, 64 << 10);
    env.disk.write_zeroes(MIB, 4096, false, false).expect("zeroes");
    env.disk.trim(10 * MIB, 8192).expect("trim");
    let s = st
        .wait("replicating with a first point", |s| s.state() == v1::SenderState::Replicating && s.last_point.is_some())
        .await;
    assert!(s.total_bytes >= 6 * MIB && s.total_bytes < 8 * MIB, "allocated bytes {}", s.total_bytes);
    for i in 0..20u64 {
        write(&env.disk, 200 + i, (i * 1_300_017) % (31 * MIB), 5000 + i as usize * 300);
    }
    let s = st.wait_point_after_now().await;
    env.assert_images_equal();
    assert!(s.bytes_replicated > 0 && s.error.is_empty(), "{s:?}");
    let replica = env.replicas.get(&vm()).expect("replica");
    // Points keep coming every interval (empty ones too), so the replica may be ahead.
    let reported = s.last_point.as_ref().map(|p| p.seq).expect("a point");
    assert!(
        replica.latest_seq().is_some_and(|l| l >= reported),
        "replica {:?} < reported {reported}",
        replica.latest_seq()
    );
    h.stop().await;
    let state = sender::SenderState::load(&env.vm_dir.join(sender::STATE_FILE)).expect("state").expect("a state file");
    assert_eq!(state.phase, sender::Stage::Replicating);
}

/// A TCP proxy that cuts the first connection once `cut_after` client bytes passed.
async fn cutting_proxy(target: String, cut_after: u64) -> (String, Arc<AtomicU64>, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let sent = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let (sent2, cut2) = (sent.clone(), cut.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&target).await else { continue };
            let arm = !cut2.load(Ordering::SeqCst);
            let (sent, cut) = (sent2.clone(), cut2.clone());
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut here = 0u64;
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        here += n as u64;
                        sent.fetch_add(n as u64, Ordering::SeqCst);
                        if arm && here > cut_after && !cut.swap(true, Ordering::SeqCst) {
                            return; // drop both directions: the connection breaks
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    (addr, sent, cut)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_connection_resumes_the_copy() {
    let allocated = 40 * MIB;
    let env = Env::new(64 * MIB, &[(0, 24 * MIB), (32 * MIB, 16 * MIB)]).await;
    let (proxy, proxied, cut) = cutting_proxy(env.replica_addr.clone(), 20 * MIB).await;
    let (h, mut st) = env.start(env.params(&proxy, false), env.primary.clone());
    let s = st.wait("replicating", |s| s.state() == v1::SenderState::Replicating && s.last_point.is_some()).await;
    assert!(cut.load(Ordering::SeqCst), "the proxy never cut the connection");
    eprintln!(
        "resume: allocated {allocated} B, bytes_replicated {} B ({:.2}x), through the proxy {} B, missed cycles {}",
        s.bytes_replicated,
        s.bytes_replicated as f64 / allocated as f64,
        proxied.load(Ordering::SeqCst),
        s.missed_cycles
    );
    assert!(s.missed_cycles >= 1, "the cut should have cost a cycle: {s:?}");
    assert!(
        s.bytes_replicated < allocated * 3 / 2,
        "resumed from zero? {} B sent for {allocated} B",
        s.bytes_replicated
    );
    assert!(proxied.load(Ordering::SeqCst) < allocated * 3 / 2 + 4 * MIB);
    env.assert_images_equal();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn damaged_log_is_repaired_by_resync() {
    let env = Env::new(32 * MIB, &[(0, 8 * MIB), (20 * MIB, 4 * MIB)]).await;
    let (h, mut st) = env.start(env.params(&env.replica_addr, false), env.primary.clone());
    st.wait("replicating", |s| s.state() == v1::SenderState::Replicating && s.last_point.is_some()).await;
    h.stop().await;

    // Three 64 KiB blocks change in a log that gets damaged before it is shipped.
    let block = 64 << 10;
    for (i, b) in [3u64, 100, 400].iter().enumerate() {
        write(&env.disk, 900 + i as u64, b * block, block as usize);
    }
    let sealed = env.disk.seal().expect("seal").expect("a log");
    write(&env.disk, 999, 0, 512); // the damaged log is not the highest (that one is open)
    let log = env.disk.sealed_logs().into_iter().find(|l| l.seq == sealed).expect("sealed log");
    let f = std::fs::OpenOptions::new().write(true).open(&log.path).expect("log");
    f.write_all_at(&[0x5a; 16], 4096).expect("damage");
    drop(f);
    // Reopen the disk (an agent restart): the tracker reports the damaged log.
    env.disk.stop().expect("stop");
    let disk = Arc::new(TrackedDisk::open(&env.image, DiskId::new("disk0").expect("id"), true).expect("reopen"));
    assert_eq!(disk.corrupt_logs().len(), 1);
    *env.vm.0.lock().expect("lock") = Some(vec![(DiskId::new("disk0").expect("id"), disk.clone())]);

    let (h, mut st) = env.start(env.params(&env.replica_addr, false), env.primary.clone());
    let s = st.wait("resync done", |s| s.state() == v1::SenderState::Replicating && s.resync_blocks_compared > 0).await;
    eprintln!(
        "resync: compared {} blocks, sent {} sub-blocks, {} wire bytes (changed: 3 blocks = {} B + a 512 B write)",
        s.resync_blocks_compared,
        s.resync_blocks_sent,
        s.resync_wire_bytes,
        3 * block
    );
    assert_eq!(s.resync_blocks_compared, 32 * MIB / block);
    // Sent: the 4 KiB sub-blocks that differ (16 per changed 64 KiB block, plus the one
    // under the 512 B write), not whole 64 KiB blocks around the 512 B write.
    let sub = 4096;
    assert!((3 * block / sub..=3 * block / sub + 1).contains(&s.resync_blocks_sent), "{s:?}");
    assert!(s.resync_wire_bytes <= 3 * block + sub, "resync sent {} bytes", s.resync_wire_bytes);
    write(&disk, 1000, 7 * MIB, 10_000);
    st.wait_point_after_now().await;
    env.assert_images_equal();
    assert!(disk.corrupt_logs().iter().all(|c| !c.path.exists()), "damaged log left behind");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_host_is_refused() {
    let env = Env::new(4 * MIB, &[(0, MIB)]).await;
    let intruder = host_files(&env.ca, &env.root, "host-c", "127.0.0.1:1");
    let (h, mut st) = env.start(env.params(&env.replica_addr, false), intruder);
    let s = st.wait("a non-recoverable error", |s| s.state() == v1::SenderState::Error).await;
    assert!(!s.error_recoverable, "{s:?}");
    assert!(s.error.contains("PermissionDenied") || s.error.to_lowercase().contains("permission"), "{}", s.error);
    assert_eq!(env.replicas.get(&vm()).expect("replica").copy_progress()[0].acked_offset, 0);
    h.stop().await;
}
