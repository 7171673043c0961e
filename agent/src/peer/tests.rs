//! Wire-boundary tests of the Peer RPCs: a hostile value in every name/id field of
//! every request is refused with InvalidArgument naming the field, and nothing on disk
//! changes (the replica store lives in a temp dir, snapshotted around each request).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use siterecovery_certs::{PeerIdentity, Role, VaultId};
use siterecovery_proto::v1;
use tonic::{Code, Status};

use super::Receiver;
use super::wire;
use crate::replica::{ReplicaDisk, ReplicaSet, ReplicaSpec};

const REL: &str = "r-0000abcd";
const HOSTILE: &[&str] = &["../../etc/passwd", "../vm1", "a/b", "/abs", "..", ".", "-x", "a\0b", "é", "disk0/../x"];
const HOSTILE_REL: &[&str] = &["../r-0000abcd", "rel-1", "r-ABCDEF12", "/", ".."];

struct Env {
    root: tempfile::TempDir,
    receiver: Receiver,
    caller: PeerIdentity,
}

fn env() -> Env {
    let root = tempfile::tempdir().expect("tmp");
    let replicas = Arc::new(ReplicaSet::open(&root.path().join("replicas")).expect("replicas"));
    replicas
        .prepare(ReplicaSpec {
            machine: Default::default(),
            relationship_id: REL.into(),
            vm: "vm1".into(),
            primary_host_id: "host-a".into(),
            disks: vec![ReplicaDisk { id: "disk0".into(), size_bytes: 1 << 20 }],
            retention_ms: 3_600_000,
            bucket_ms: 3_600_000,
        })
        .expect("prepare");
    let caller = PeerIdentity::new(VaultId::generate(), Role::Host, "host-a").expect("identity");
    Env { root, receiver: Receiver::new(replicas), caller }
}

/// Every file under `dir` with its contents.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p.clone());
                out.insert(p, Vec::new());
            } else {
                let data = std::fs::read(&p).expect("read");
                out.insert(p, data);
            }
        }
    }
    out
}

/// `r` refused as the service answers it: InvalidArgument naming `field`.
fn invalid<T, E: Into<Status>>(r: Result<T, E>, field: &str) {
    let Err(status) = r.map_err(Into::into) else { panic!("{field}: accepted") };
    assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
    assert!(status.message().contains(field), "{field}: {}", status.message());
}

fn chunk(rel: &str, disk: &str) -> v1::CopyChunk {
    v1::CopyChunk { relationship_id: rel.into(), disk_id: disk.into(), data: vec![9; 4096], ..Default::default() }
}

fn point(rel: &str, disk: &str, seq: u64) -> v1::PointChunk {
    v1::PointChunk {
        relationship_id: rel.into(),
        seq,
        extents: vec![v1::Extent {
            disk_id: disk.into(),
            kind: v1::ExtentKind::Data as i32,
            length: 4096,
            data: vec![7; 4096],
            ..Default::default()
        }],
        commit: true,
        ..Default::default()
    }
}

fn hashes(rel: &str, disk: &str) -> v1::BlockHashesRequest {
    v1::BlockHashesRequest {
        relationship_id: rel.into(),
        disk_id: disk.into(),
        block_size: 65536,
        ..Default::default()
    }
}

fn stream<T: Send + 'static>(items: Vec<T>) -> futures::stream::Iter<std::vec::IntoIter<Result<T, Status>>> {
    futures::stream::iter(items.into_iter().map(Ok).collect::<Vec<_>>())
}

/// Runs every Peer RPC with `copy`, `point` and `hashes` (and `rel` for CopyProgress),
/// expecting each refused naming its field.
async fn refuse_all(e: &Env, bad: &str, rel_field: bool) {
    let (rel, disk) = if rel_field { (bad, "disk0") } else { (REL, bad) };
    if rel_field {
        let r = wire::CopyProgress::try_from(&v1::CopyProgressRequest { relationship_id: bad.into() })
            .map_err(Status::from);
        invalid(r, "copy_progress.relationship_id");
    }
    let field = if rel_field { "copy_chunk.relationship_id" } else { "copy_chunk.disk_id" };
    invalid(e.receiver.initial_copy(&e.caller, stream(vec![chunk(rel, disk)])).await.map(|_| ()), field);
    let field = if rel_field { "point_chunk.relationship_id" } else { "point_chunk.extents[0].disk_id" };
    invalid(e.receiver.ship_point(&e.caller, stream(vec![point(rel, disk, 1)])).await, field);
    let field = if rel_field { "block_hashes.relationship_id" } else { "block_hashes.disk_id" };
    let r = match wire::BlockHashes::try_from(hashes(rel, disk)) {
        Ok(h) => e.receiver.block_hashes(&e.caller, h).await.map(|_| ()).map_err(Status::from),
        Err(w) => Err(Status::from(w)),
    };
    invalid(r, field);
}

#[tokio::test]
async fn hostile_ids_are_refused_and_touch_nothing() {
    let e = env();
    let before = snapshot(e.root.path());
    for &bad in HOSTILE {
        refuse_all(&e, bad, false).await;
        refuse_all(&e, bad, true).await;
    }
    for &bad in HOSTILE_REL {
        refuse_all(&e, bad, true).await;
    }
    assert_eq!(snapshot(e.root.path()), before, "a refused request changed the replica store");
}

#[tokio::test]
async fn a_hostile_later_message_ends_the_stream_and_touches_nothing() {
    let e = env();
    let before = snapshot(e.root.path());
    for &bad in HOSTILE {
        // A first chunk with no data writes nothing; the second is refused.
        let first = v1::CopyChunk { data: Vec::new(), ..chunk(REL, "disk0") };
        let mut acks =
            e.receiver.initial_copy(&e.caller, stream(vec![first, chunk(REL, bad)])).await.expect("first chunk valid");
        let mut refused = false;
        while let Some(m) = acks.next().await {
            if let Err(s) = m {
                assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
                assert!(s.message().contains("copy_chunk.disk_id"), "{}", s.message());
                refused = true;
            }
        }
        assert!(refused, "{bad:?} accepted in a later copy chunk");
        let first = v1::PointChunk { extents: Vec::new(), commit: false, ..point(REL, "disk0", 1) };
        let r = e.receiver.ship_point(&e.caller, stream(vec![first, point(REL, bad, 1)])).await;
        invalid(r, "point_chunk.extents[0].disk_id");
    }
    assert_eq!(snapshot(e.root.path()), before, "a refused stream changed the replica store");
}

#[tokio::test]
async fn valid_requests_still_reach_the_store() {
    let e = env();
    let p = e
        .receiver
        .copy_progress(&e.caller, wire::CopyProgress { relationship: REL.parse().expect("rel") })
        .await
        .expect("progress");
    assert_eq!(p.disks.len(), 1);
    let done = v1::CopyChunk { done: true, ..chunk(REL, "disk0") };
    let acks: Vec<_> = e.receiver.initial_copy(&e.caller, stream(vec![done])).await.expect("copy").collect().await;
    assert!(acks.last().is_some_and(|a| a.as_ref().is_ok_and(|a| a.complete)), "{acks:?}");
    let ack = e.receiver.ship_point(&e.caller, stream(vec![point(REL, "disk0", 1)])).await.expect("point");
    assert_eq!(ack.seq, 1);
    let other = PeerIdentity::new(VaultId::generate(), Role::Host, "host-c").expect("identity");
    let r = e.receiver.ship_point(&other, stream(vec![point(REL, "disk0", 2)])).await;
    assert_eq!(r.map(|_| ()).map_err(|e| Status::from(e).code()), Err(Code::PermissionDenied));
    let h = wire::BlockHashes::try_from(hashes(REL, "disk9")).expect("valid id");
    let r = e.receiver.block_hashes(&e.caller, h).await;
    assert_eq!(r.map(|_| ()).map_err(|e| Status::from(e).code()), Err(Code::InvalidArgument), "unknown disk");
}
