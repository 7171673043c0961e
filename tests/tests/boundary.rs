//! Wire-boundary tests with real processes and the real `grpcurl`: a hostile value in
//! a name or id field of a message from the wire is refused with `InvalidArgument`
//! (grpcurl exits 64 + 3 = 67) and creates and removes nothing on disk.
//!
//! Three boundaries: the operator's `Inventory` and `Protection` RPCs (operator
//! certificate), the control channel `Control/Session` (a host certificate: Hello, then
//! a report naming a hostile VM, disk, relationship or point), and an agent's `Peer`
//! service (the relationship's primary host's certificate, a hostile relationship or
//! disk id).
//!
//! The cases are data: a table of RPCs, each with a valid request and the fields that
//! carry names or ids (a JSON pointer and the kind of value), times the hostile values
//! of each kind. Every case sets one field of the valid request to one hostile value;
//! the expected exit is 67, and the lab's files (provider, agents, operator certs; not
//! the logs) are the same before and after. Each valid request is also sent as a
//! control, which must not be refused as invalid (so a 67 above is the field's doing).
//! Every case runs even when one fails; the whole table is printed, then the failures.
//!
//! Naming rule (names: host, site, cloud, VM, disk, network, plan, policy): ASCII
//! letters, digits, `-`, `_`, `.`, starting with a letter or digit, 1–63 chars, never
//! `.`/`..`. Ids: relationship `r-` + 8 lowercase hex, job `j-` + digits, point
//! `p<seq>` (selectors also `latest`, `latest-app-consistent`).
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test boundary`.

use serde_json::{Value, json};
use siterecovery_tests::*;

/// What every hostile value gets: gRPC InvalidArgument.
const INVALID: i32 = grpc_exit(3);
/// Bound of every call (seconds), streams included: a stream the server does not end
/// ends here (DeadlineExceeded), not at the harness's command timeout.
const MAX_TIME: &str = "15";

// ---------------------------------------------------------------------------------
// The data: kinds of fields and their hostile values; RPCs and their fields.

/// What a field holds, and so which values are hostile to it.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A required name (host, site, cloud, VM, disk, network, plan, policy).
    Name,
    /// A name where empty means "none" (a filter, "not a test VM"): every hostile name
    /// but the empty one.
    OptName,
    /// A host, by name or by id (ids are up to 80 chars: 64 is not hostile, 81 is).
    Host,
    /// A host filter where empty means "every host".
    OptHost,
    /// A relationship id: `r-` + 8 lowercase hex.
    Rel,
    /// A job id: `j-` + digits.
    Job,
    /// A point selector where empty means `latest`: `p<seq>`, `latest`,
    /// `latest-app-consistent`.
    Point,
    /// A point selector that is required.
    PointRequired,
}

/// The hostile values of `kind`: (what is wrong with it, the value).
fn hostile(kind: Kind) -> Vec<(&'static str, String)> {
    let v = |what: &'static str, value: &str| (what, value.to_owned());
    let anywhere = [v("traversal", "../../etc/x"), v("dot-dot", ".."), v("NUL", "a\0b"), v("non-ASCII", "vm\u{e9}")];
    let mut out: Vec<(&'static str, String)> = anywhere.to_vec();
    match kind {
        Kind::Name | Kind::OptName | Kind::Host | Kind::OptHost => {
            let long = if matches!(kind, Kind::Host | Kind::OptHost) { 81 } else { 64 };
            out.extend([
                v("slash", "a/b"),
                v("dot", "."),
                ("too long", "a".repeat(long)),
                v("leading dash", "-lead"),
                v("leading dot", ".hidden"),
                v("space", "a b"),
            ]);
            if matches!(kind, Kind::Name | Kind::Host) {
                out.push(v("empty", ""));
            }
        }
        Kind::Rel => out.extend([
            v("empty", ""),
            v("slash", "r-0000/abc"),
            v("7 hex", "r-1234567"),
            v("9 hex", "r-123456789"),
            v("upper hex", "r-ABCDEF12"),
            v("not hex", "r-1234567g"),
            v("no prefix", "12345678"),
            v("NUL inside", "r-1234\u{0}567"),
        ]),
        Kind::Job => out.extend([
            v("empty", ""),
            v("slash", "j-1/2"),
            v("no digits", "j-"),
            v("not digits", "j-12a"),
            v("upper prefix", "J-1"),
            v("no prefix", "1"),
            v("unicode digit", "j-\u{661}"),
            ("overflow", format!("j-{}", "9".repeat(30))),
        ]),
        Kind::Point | Kind::PointRequired => {
            out.extend([
                v("slash", "p1/x"),
                v("no digits", "p"),
                v("trailing junk", "p1x"),
                v("upper prefix", "P1"),
                v("dash", "p-1"),
                v("selector traversal", "latest/../x"),
                v("unicode digit", "p\u{661}"),
                ("overflow", format!("p{}", "9".repeat(30))),
            ]);
            if matches!(kind, Kind::PointRequired) {
                out.push(v("empty", ""));
            }
        }
    }
    out
}

/// An RPC, a valid request, and the fields carrying names or ids.
struct Rpc {
    /// Method name within the service (`CreateVm`).
    method: &'static str,
    /// Client-streaming or bidi: `base` is the array of messages sent.
    stream: bool,
    /// A valid request (or, for a stream, its messages).
    base: Value,
    /// Each field the table makes hostile: JSON pointer into `base`, and its kind.
    fields: Vec<(&'static str, Kind)>,
    /// For a request that creates something: the pointer of the name it creates, made
    /// unique per case, so a case a bug lets through does not make the next ones fail
    /// as "already exists" instead of showing what they do.
    creates: Option<&'static str>,
}

fn unary(method: &'static str, base: Value, fields: &[(&'static str, Kind)]) -> Rpc {
    Rpc { method, stream: false, base, fields: fields.to_vec(), creates: None }
}

fn stream(method: &'static str, messages: Value, fields: &[(&'static str, Kind)]) -> Rpc {
    Rpc { method, stream: true, base: messages, fields: fields.to_vec(), creates: None }
}

impl Rpc {
    /// See [`Rpc::creates`].
    fn creating(mut self, name: &'static str) -> Self {
        self.creates = Some(name);
        self
    }

    /// The base request with `field` set to `value` (and the created name made unique
    /// with `n`).
    fn with(&self, field: &str, value: &str, n: usize) -> Value {
        let mut request = self.base.clone();
        if let Some(created) = self.creates.filter(|c| *c != field)
            && let Some(Value::String(name)) = request.pointer_mut(created)
        {
            name.push_str(&format!("-{n}"));
        }
        let slot = request.pointer_mut(field).unwrap_or_else(|| panic!("{} has no field {field}", self.method));
        *slot = Value::String(value.to_owned());
        request
    }
}

use Kind::{Host, Job, Name, OptHost, OptName, Point, PointRequired, Rel};

/// The Inventory RPCs that carry a name. Deleting, starting and stopping come before
/// creating, so a create that a bug let through is never deleted by a later case.
fn inventory_rpcs() -> Vec<Rpc> {
    vec![
        unary("ListVms", json!({"host": "hv-a"}), &[("/host", OptHost)]),
        unary("GetVm", json!({"name": "nosuch"}), &[("/name", Name)]),
        unary("DeleteVm", json!({"name": "nosuch"}), &[("/name", Name)]),
        unary("StartVm", json!({"name": "nosuch"}), &[("/name", Name)]),
        unary("StopVm", json!({"name": "nosuch"}), &[("/name", Name)]),
        unary(
            "CreateVm",
            json!({"host": "hv-a", "name": "bvm", "disks": [{"size_bytes": 1048576}],
                   "nics": [{"network": "corp", "dhcp": true}], "start": false}),
            &[("/host", Host), ("/name", Name), ("/nics/0/network", Name)],
        )
        .creating("/name"),
    ]
}

/// The Protection RPCs that carry a name or an id. `import_dir`: an operator path (not
/// a name) for ImportInitial.
fn protection_rpcs(import_dir: &str) -> Vec<Rpc> {
    let vm = |method| unary(method, json!({"vm": "nosuch"}), &[("/vm", Name)]);
    vec![
        unary("DeletePolicy", json!({"name": "nosuch"}), &[("/name", Name)]),
        unary("UnpairClouds", json!({"source_cloud": "nosuch"}), &[("/source_cloud", Name)]),
        unary("Protect", json!({"vm": "nosuch", "export_dir": ""}), &[("/vm", Name)]),
        unary("ImportInitial", json!({"vm": "nosuch", "dir": import_dir}), &[("/vm", Name)]),
        vm("Unprotect"),
        vm("Resync"),
        vm("ListPoints"),
        unary("ExportPoint", json!({"vm": "nosuch", "point": "latest"}), &[("/vm", Name), ("/point", Point)]),
        vm("UnexportPoint"),
        unary(
            "Failover",
            json!({"vm": "nosuch", "type": "FAILOVER_KIND_TEST", "point": "latest"}),
            &[("/vm", Name), ("/point", Point)],
        ),
        vm("CommitFailover"),
        vm("CleanupTestFailover"),
        unary("ChangePoint", json!({"vm": "nosuch", "point": "p1"}), &[("/vm", Name), ("/point", PointRequired)]),
        vm("Reprotect"),
        unary("PlanFailover", json!({"plan": "nosuch", "type": "FAILOVER_KIND_TEST"}), &[("/plan", Name)]),
        unary("ConfirmPlanAction", json!({"job_id": "j-999999"}), &[("/job_id", Job)]),
        unary("GetJob", json!({"id": "j-999999"}), &[("/id", Job)]),
        unary("WatchJob", json!({"id": "j-999999"}), &[("/id", Job)]),
        unary(
            "CreatePolicy",
            json!({"name": "bpol", "interval_ms": 1000, "retention_ms": 3_600_000}),
            &[("/name", Name)],
        )
        .creating("/name"),
        unary(
            "PairClouds",
            json!({"source_cloud": "gold-a", "target_cloud": "gold-b", "policy": "fast"}),
            &[("/source_cloud", Name), ("/target_cloud", Name), ("/policy", Name)],
        ),
        unary(
            "CreateNetwork",
            json!({"site": "primary", "name": "bnet", "subnet": "10.1.0.0/24", "pools": ["10.1.0.10-10.1.0.20"],
                   "gateway": "10.1.0.1", "dns": ["10.1.0.2"]}),
            &[("/site", Name), ("/name", Name)],
        )
        .creating("/name"),
        unary("MapNetwork", json!({"source": "corp", "target": "dr"}), &[("/source", Name), ("/target", Name)]),
        unary(
            "CreatePlan",
            json!({"name": "bplan", "groups": [{"order": 1, "vms": ["base"]}]}),
            &[("/name", Name), ("/groups/0/vms/0", Name)],
        )
        .creating("/name"),
    ]
}

/// The control channel: Hello, then one report. The VM, disk and network of an
/// inventory report, the failover record of a VM the agent failed over itself, and a
/// replication status.
fn control_rpcs() -> Vec<Rpc> {
    let hello = json!({"hello": {"agent_version": "boundary", "listen_address": "127.0.0.1:1"}});
    let disk = json!({"id": "disk0", "size_bytes": 1048576});
    vec![
        stream(
            "Session",
            json!([hello, {"inventory": {"free_bytes": 1, "vms": [
                {"name": "xvm", "disks": [disk], "nics": [{"network": "corp", "dhcp": true}]}]}}]),
            &[
                ("/1/inventory/vms/0/name", Name),
                ("/1/inventory/vms/0/disks/0/id", Name),
                ("/1/inventory/vms/0/nics/0/network", OptName),
            ],
        ),
        stream(
            "Session",
            json!([hello, {"inventory": {"free_bytes": 1, "vms": [{"name": "xvm", "disks": [disk],
                "failover": {"relationship_id": "r-0000abcd", "point_id": "p1", "kind": "FAILOVER_KIND_LOCAL", "test_of": ""}}]}}]),
            &[
                ("/1/inventory/vms/0/failover/relationship_id", Rel),
                ("/1/inventory/vms/0/failover/point_id", Point),
                ("/1/inventory/vms/0/failover/test_of", OptName),
            ],
        ),
        stream(
            "Session",
            json!([hello, {"replication": {"relationship_id": "r-0000abcd", "vm": "xvm", "state": "SENDER_STATE_REPLICATING",
                "last_point": {"id": "p1", "seq": 1}}}]),
            &[
                ("/1/replication/relationship_id", Rel),
                ("/1/replication/vm", Name),
                ("/1/replication/last_point/id", Point),
            ],
        ),
    ]
}

/// The replica's peer service, called by the relationship's primary: `rel` is the real
/// relationship, `disk_size` the size of its disk0.
fn peer_rpcs(rel: &str, disk_size: u64) -> Vec<Rpc> {
    vec![
        unary("CopyProgress", json!({"relationship_id": rel}), &[("/relationship_id", Rel)]),
        unary(
            "BlockHashes",
            json!({"relationship_id": rel, "disk_id": "disk0", "block_size": 65536}),
            &[("/relationship_id", Rel), ("/disk_id", Name)],
        ),
        // The copy is complete: a last, empty chunk at the end of the disk changes nothing.
        stream(
            "InitialCopy",
            json!([{"relationship_id": rel, "disk_id": "disk0", "offset": disk_size, "done": true}]),
            &[("/0/relationship_id", Rel), ("/0/disk_id", Name)],
        ),
        // Never committed: discarded by the replica.
        stream(
            "ShipPoint",
            json!([{"relationship_id": rel, "seq": 1_000_000, "commit": false,
                    "extents": [{"disk_id": "disk0", "offset": 0, "kind": "EXTENT_KIND_ZEROES", "length": 4096}]}]),
            &[("/0/relationship_id", Rel), ("/0/extents/0/disk_id", Name)],
        ),
    ]
}

// ---------------------------------------------------------------------------------
// Running the table.

/// Where the calls go, and as whom.
struct Target {
    /// `siterecovery.v1.Inventory`.
    service: &'static str,
    proto: &'static str,
    addr: String,
    /// TLS flags of the caller's certificate.
    tls: Vec<String>,
}

/// One row of the result table.
struct Row {
    method: &'static str,
    /// The JSON pointer of the hostile field; empty for a control.
    field: &'static str,
    what: &'static str,
    value: String,
    exit: Option<i32>,
    /// What changed in the lab's files.
    diff: Vec<String>,
}

impl Row {
    fn control(&self) -> bool {
        self.field.is_empty()
    }

    fn passed(&self) -> bool {
        if self.control() {
            self.exit.is_some() && self.exit != Some(INVALID)
        } else {
            self.exit == Some(INVALID) && self.diff.is_empty()
        }
    }

    fn line(&self) -> String {
        let verdict = if self.passed() { "ok  " } else { "FAIL" };
        let want = if self.control() { format!("not {INVALID}") } else { INVALID.to_string() };
        let diff =
            if self.diff.is_empty() { String::new() } else { format!("; files changed: {}", self.diff.join(", ")) };
        format!(
            "{verdict} {:<20} {:<44} {:<18} {:<24} exit {:?} (want {want}){diff}",
            self.method,
            if self.control() { "(control: the valid request)" } else { self.field },
            self.what,
            format!("{:?}", self.value),
            self.exit
        )
    }
}

/// The lab's files: every entry below its root but logs and temp files of atomic writes.
fn files(lab: &Lab) -> Tree {
    snapshot(&lab.root, |name| !name.ends_with(".log") && !name.contains(".tmp"))
}

/// Sends `request` (an object, or for a stream the array of messages).
fn send(lab: &Lab, t: &Target, rpc: &Rpc, request: &Value) -> std::process::Output {
    let mut flags = t.tls.clone();
    flags.extend(strings(&["-max-time", MAX_TIME]));
    let method = format!("{}/{}", t.service, rpc.method);
    if rpc.stream {
        let messages: Vec<String> =
            request.as_array().expect("a stream's messages").iter().map(Value::to_string).collect();
        lab.grpcurl_stream(&flags, t.proto, &messages, &t.addr, &method)
    } else {
        lab.grpcurl_call(&flags, t.proto, &request.to_string(), &t.addr, &method)
    }
}

/// Every case of `rpcs` (one hostile value in one field), then every valid request as
/// a control.
fn run(lab: &Lab, t: &Target, rpcs: &[Rpc]) -> Vec<Row> {
    let mut rows = Vec::new();
    for rpc in rpcs {
        for &(field, kind) in &rpc.fields {
            for (what, value) in hostile(kind) {
                let request = rpc.with(field, &value, rows.len());
                let before = files(lab);
                let o = send(lab, t, rpc, &request);
                let diff = tree_diff(&before, &files(lab));
                rows.push(Row { method: rpc.method, field, what, value, exit: o.status.code(), diff });
            }
        }
    }
    for rpc in rpcs {
        let o = send(lab, t, rpc, &rpc.base);
        if o.status.code() == Some(INVALID) {
            eprintln!("[boundary] control {} refused as invalid: {}", rpc.method, describe(&o));
        }
        rows.push(Row {
            method: rpc.method,
            field: "",
            what: "",
            value: String::new(),
            exit: o.status.code(),
            diff: vec![],
        });
    }
    rows
}

/// Prints the table; panics listing the rows that failed.
#[track_caller]
fn report(lab: &Lab, title: &str, rows: &[Row]) {
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.passed()).collect();
    eprintln!("[boundary] {title}: {} of {} rows pass", rows.len() - failed.len(), rows.len());
    for r in rows {
        eprintln!("[boundary] {}", r.line());
    }
    if !failed.is_empty() {
        lab.dump_logs();
        let lines: Vec<String> = failed.iter().map(|r| r.line()).collect();
        panic!("{title}: {} of {} rows fail:\n{}", failed.len(), rows.len(), lines.join("\n"));
    }
}

// ---------------------------------------------------------------------------------
// The tests.

/// Two connected sites paired under `fast`, networks `corp` (primary) and `dr`
/// (secondary), and an unprotected VM `base` on hv-a: what the valid requests name.
fn operator_world(test: &str) -> World {
    let w = World::new(test);
    let net = |site, name, subnet, pool| {
        w.cli_json(&["network", "create", "--site", site, "--name", name, "--subnet", subnet, "--pool", pool]);
    };
    net("primary", "corp", "10.0.0.0/24", "10.0.0.10-10.0.0.50");
    net("secondary", "dr", "10.0.0.0/24", "10.0.0.20-10.0.0.60");
    w.vm("base", &["1M"], &[]);
    w
}

fn operator(lab: &Lab, service: &'static str, proto: &'static str) -> Target {
    Target { service, proto, addr: lab.addr(), tls: lab.op_tls() }
}

#[test]
fn inventory_rpcs_refuse_hostile_names_and_create_nothing() {
    let w = operator_world("boundary_inventory");
    let t = operator(&w, "siterecovery.v1.Inventory", "inventory.proto");
    let rows = run(&w, &t, &inventory_rpcs());
    report(&w, "Inventory", &rows);
}

#[test]
fn protection_rpcs_refuse_hostile_names_and_ids_and_create_nothing() {
    let w = operator_world("boundary_protection");
    let t = operator(&w, "siterecovery.v1.Protection", "protection.proto");
    let import_dir = w.root.join("import").display().to_string();
    let rows = run(&w, &t, &protection_rpcs(&import_dir));
    report(&w, "Protection", &rows);
}

#[test]
fn control_session_ends_on_a_hostile_report_and_creates_nothing() {
    let (lab, _provider, _agent) = Lab::with_host("boundary_control");
    // A host of the vault whose agent does not run: the test's sessions are its only ones.
    lab.register_agent("hv-x", "primary", "gold-a");
    let t = Target {
        service: "siterecovery.v1.Control",
        proto: "control.proto",
        addr: lab.addr(),
        tls: lab.host_tls("hv-x"),
    };
    let rows = run(&lab, &t, &control_rpcs());
    report(&lab, "Control/Session", &rows);
}

#[test]
fn peer_rpcs_refuse_hostile_relationship_and_disk_ids_and_create_nothing() {
    // A policy interval of an hour: after the initial copy nothing replicates while the
    // cases run, so the replica's files hold still.
    let w = World::unpaired("boundary_peer", &[], &[]);
    w.pair_every("slow", "1h", &[]);
    w.vm("vm1", &["8M"], &[]);
    w.protect("vm1");
    let rel = w.show("vm1")["replication"]["relationship_id"].as_str().expect("relationship id").to_owned();
    let t = Target {
        service: "siterecovery.v1.Peer",
        proto: "peer.proto",
        addr: format!("127.0.0.1:{}", w.host_slot("hv-b").listen_port),
        tls: w.host_tls("hv-a"),
    };
    let rows = run(&w, &t, &peer_rpcs(&rel, 8 << 20));
    report(&w, "Peer", &rows);
}
