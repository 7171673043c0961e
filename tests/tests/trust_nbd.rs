//! NBD exports not open to local users, end to end with the real agent and the real
//! `qemu-io`: the TCP export requires TLS with a client certificate of the vault
//! (`provider nbd-client-cert`, QEMU's `tls-creds-x509`), plain clients and other
//! vaults' certificates are refused, connection caps hold under a flood while another
//! VM's I/O goes on, and every file the agent makes has its mode (read with `stat`).
//!
//! A second real TLS client, Python's `ssl` module, speaks the NBD prelude by hand: it
//! can present a certificate QEMU itself would refuse to load (another vault's under
//! our CA, an operator's), so the agent's own checks are what is tested.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test trust_nbd`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use siterecovery_tests::*;

/// The NBD client of last resort: the prelude in plaintext, `NBD_OPT_STARTTLS`, TLS
/// with the given CA, certificate and key, then `NBD_OPT_GO`. Exit 0 when the export
/// opened, 2 when refused (prints why), anything else is a broken test.
const PY_CLIENT: &str = r#"
import socket, ssl, struct, sys
host, port, ca, cert, key, export = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
def recvn(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("closed")
        b += c
    return b
def option(s, opt, data=b""):
    s.sendall(struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data)
def reply(s):
    _, opt, rep, n = struct.unpack(">QIII", recvn(s, 20))
    return opt, rep, recvn(s, n)
s = socket.create_connection((host, port), timeout=10)
recvn(s, 18)
s.sendall(struct.pack(">I", 3))
option(s, 5)
_, rep, _ = reply(s)
if rep != 1:
    print("starttls refused %#x" % rep); sys.exit(2)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
try:
    t = ctx.wrap_socket(s, server_hostname=host)
    name = export.encode()
    option(t, 7, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        _, rep, data = reply(t)
        if rep == 3:
            continue
        if rep == 1:
            print("accepted"); sys.exit(0)
        print("refused %#x %s" % (rep, data.decode(errors="replace"))); sys.exit(2)
except (ssl.SSLError, OSError, EOFError) as e:
    print("refused tls: %s" % e); sys.exit(2)
"#;

/// A group the NBD sockets are given: as root one that is not root's own (so the
/// group ownership really changes), else the user's primary group. (name, gid)
fn nbd_group() -> (String, u32) {
    let groups = std::fs::read_to_string("/etc/group").expect("/etc/group");
    let gid_of = |name: &str| {
        groups.lines().find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name)).then(|| f.nth(1).and_then(|g| g.parse::<u32>().ok())).flatten()
        })
    };
    let id = |flag: &str| {
        let o = Command::new("id").arg(flag).output().expect("id");
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    if id("-u") == "0" {
        for name in ["users", "nogroup", "daemon"] {
            if let Some(g) = gid_of(name) {
                return (name.to_owned(), g);
            }
        }
    }
    let name = id("-gn");
    let gid = id("-g").parse().expect("gid");
    (name, gid)
}

/// `provider nbd-client-cert` from `vault_dir` into `out`.
fn nbd_cert(lab: &Lab, vault_dir: &Path, out: &Path) {
    let o = lab.provider(&[
        "nbd-client-cert",
        "--data-dir",
        vault_dir.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--name",
        "hv1-qemu",
    ]);
    assert_ok(&o, "nbd-client-cert");
}

/// qemu-io over the TCP export of `export` with TLS credentials from `creds`.
fn qio_tls(lab: &Lab, creds: &Path, port: u16, export: &str, cmds: &[&str]) -> Output {
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", creds.display());
    let image =
        format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export},tls-creds=tls0");
    let mut args = vec!["--object".to_owned(), object, "--image-opts".into(), image];
    for c in cmds {
        args.extend(["-c".to_owned(), (*c).to_owned()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.qemu_io(&args)
}

fn qio_tls_passes(lab: &Lab, creds: &Path, port: u16, export: &str, cmds: &[&str]) -> bool {
    let o = qio_tls(lab, creds, port, export, cmds);
    o.status.success() && !stdout(&o).contains("failed") && !stderr(&o).contains("failed")
}

/// The Python client with `ca`, `cert`, `key`: (exit code, what it printed).
fn py_client(lab: &Lab, port: u16, ca: &Path, cert: &Path, key: &Path, export: &str) -> (i32, String) {
    let script = lab.root.join("nbd_tls_client.py");
    if !script.exists() {
        std::fs::write(&script, PY_CLIENT).expect("script");
    }
    let o = lab.run(
        Command::new("python3").arg(&script).args(["127.0.0.1", &port.to_string()]).args([ca, cert, key]).arg(export),
    );
    (o.status.code().unwrap_or(-1), format!("{}{}", stdout(&o), stderr(&o)))
}

/// A lab with hv1 registered and served with TLS and `extra` flags.
fn lab_with_tls_host(test: &str, extra: &[&str]) -> (Lab, Proc, Proc) {
    let lab = Lab::new(test);
    lab.create_vault();
    let provider = lab.start_provider();
    lab.operator_cert();
    lab.register_agent("hv1", "primary", "gold-a");
    let slot = lab.host_slot("hv1");
    // Modes from before: the agent narrows them at start.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&slot.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::create_dir_all(slot.dir.join("vms")).expect("vms");
    std::fs::set_permissions(slot.dir.join("vms"), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let agent = lab.start_agent_tls("hv1", &slot.dir, extra);
    lab.wait_host_connected("hv1");
    (lab, provider, agent)
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display())).mode() & 0o7777
}

#[test]
fn the_tcp_export_requires_tls_with_an_nbd_certificate_of_the_vault() {
    let (group, gid) = nbd_group();
    let (lab, _provider, mut agent) = lab_with_tls_host("tcp_tls", &["--nbd-group", &group]);
    let port = lab.host_slot("hv1").nbd_port;
    lab.cli_json(&["vm", "create", "--host", "hv1", "--name", "vm1", "--disk", "64M"]);
    let unix = lab.uris("vm1")[0].clone();

    // The certificate, as QEMU's tls-creds-x509 reads it.
    let creds = lab.root.join("nbd-creds");
    nbd_cert(&lab, &lab.provider_dir, &creds);
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        assert!(creds.join(f).is_file(), "nbd-client-cert wrote no {f}");
    }
    assert_eq!(mode(&creds.join("client-key.pem")), 0o600);

    // Written and read back over TLS by the real qemu-io; the data is the disk's (read
    // through the VM's own socket too).
    let o = qio_tls(&lab, &creds, port, "vm1-disk0", &["write -P 0x5c 1M 1M", "read -P 0x5c 1M 1M"]);
    assert_ok(&o, "qemu-io over TLS");
    assert!(!stdout(&o).contains("failed"), "{}", stdout(&o));
    assert!(lab.reads(&unix, &["read -P 0x5c 1M 1M"]), "the TLS write is not on the disk");

    // Plain NBD on the same port: refused, and qemu-io says TLS is required.
    let plain = format!("nbd://127.0.0.1:{port}/vm1-disk0");
    let o = lab.qio(&plain, &["read -P 0x5c 1M 1M"], true);
    assert_fails_saying(&o, &["TLS"], "qemu-io without TLS");

    // Another vault's certificate (and CA): refused.
    let other = lab.root.join("p2");
    assert_ok(&lab.create_vault_at(&other, "127.0.0.1:1", &lab.root.join("v2.key"), &[]), "second vault");
    let other_creds = lab.root.join("nbd-creds-other");
    nbd_cert(&lab, &other, &other_creds);
    assert!(
        !qio_tls_passes(&lab, &other_creds, port, "vm1-disk0", &["read -P 0x5c 1M 1M"]),
        "another vault's certificate read the disk"
    );

    // The agent's own checks, with a client that presents what QEMU would not load:
    // our CA, but another vault's certificate, or an operator's.
    let ca = creds.join("ca-cert.pem");
    let (code, said) =
        py_client(&lab, port, &ca, &creds.join("client-cert.pem"), &creds.join("client-key.pem"), "vm1-disk0");
    assert_eq!(code, 0, "control: our nbd certificate through the Python client: {said}");
    let (code, said) = py_client(
        &lab,
        port,
        &ca,
        &other_creds.join("client-cert.pem"),
        &other_creds.join("client-key.pem"),
        "vm1-disk0",
    );
    assert_eq!(code, 2, "another vault's certificate under our CA: {said}");
    let (code, said) = py_client(&lab, port, &ca, &lab.opdir.join("op.pem"), &lab.opdir.join("op.key"), "vm1-disk0");
    assert_eq!(code, 2, "an operator certificate: {said}");
    assert!(said.contains("role operator"), "the refusal names the role: {said}");

    // The unix socket: 0660 in the NBD group; the way to it traversable by the group
    // only (0710), narrowed at start from the 0755/0777 set before.
    let dir = lab.host_slot("hv1").dir;
    let sock = dir.join("vms/vm1/nbd.sock");
    assert_eq!(mode(&sock), 0o660);
    assert_eq!(std::fs::metadata(&sock).expect("stat").gid(), gid, "socket group {group}");
    for d in [dir.clone(), dir.join("vms"), dir.join("vms/vm1")] {
        assert_eq!(mode(&d), 0o710, "{}", d.display());
        assert_eq!(std::fs::metadata(&d).expect("stat").gid(), gid, "{}", d.display());
    }
    assert_eq!(mode(&dir.join("replicas")), 0o700);

    // Refused at start: plain TCP off loopback, an unknown group.
    let serve = |extra: &[&str]| {
        lab.run_timeout(
            Command::new(bin("agent"))
                .arg("--data-dir")
                .arg(&dir)
                .args(["serve", "--peer-listen", "127.0.0.1:0"])
                .args(extra),
            Duration::from_secs(30),
        )
    };
    let o = serve(&["--nbd-insecure-tcp", "--nbd-listen", "0.0.0.0:0", "--nbd-group", &group]);
    assert_fails_saying(&o, &["--nbd-insecure-tcp", "loopback"], "insecure TCP on 0.0.0.0");
    let o = serve(&["--nbd-group", "no-such-group-sr9"]);
    assert_fails_saying(&o, &["no-such-group-sr9", "no such group"], "an unknown --nbd-group");
    assert!(agent.is_running(), "the running agent is unaffected");
}

/// An NBD session opened by hand on a unix socket (greeting, flags, `NBD_OPT_GO`) and
/// held; `Err` with what the agent replied when `GO` is refused.
fn hold_export(sock: &Path, export: &str) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).map_err(|e| e.to_string())?;
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut go = Vec::new();
    go.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&go).expect("go");
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).map_err(|e| e.to_string())?;
        let rep = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data).map_err(|e| e.to_string())?;
        match rep {
            3 => continue,
            1 => return Ok(s),
            _ => return Err(format!("{rep:#x} {}", String::from_utf8_lossy(&data))),
        }
    }
}

#[test]
fn a_connection_flood_is_capped_while_another_vm_goes_on() {
    const CAP: usize = 8;
    let cap = CAP.to_string();
    let (lab, _provider, agent) =
        lab_with_tls_host("nbd_flood", &["--nbd-max-connections", &cap, "--nbd-max-export-connections", "2"]);
    let port = lab.host_slot("hv1").nbd_port;
    lab.cli_json(&["vm", "create", "--host", "hv1", "--name", "vm1", "--disk", "64M"]);
    lab.cli_json(&["vm", "create", "--host", "hv1", "--name", "vm2", "--disk", "64M"]);
    let vm2 = lab.uris("vm2")[0].clone();
    let creds = lab.root.join("nbd-creds");
    nbd_cert(&lab, &lab.provider_dir, &creds);

    // A flood: CAP connections held open in the plaintext prelude get their greeting;
    // every further one is closed at once, unanswered.
    let mut held = Vec::new();
    for i in 0..CAP {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap_or_else(|e| panic!("held connection {i} got no greeting: {e}"));
        held.push(s);
    }
    for i in 0..3 * CAP {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut b = [0u8; 18];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("connection {i} over the cap was not closed at once: {other:?}"),
        }
    }
    // Meanwhile another VM's I/O, through its own socket, goes on.
    lab.qio_ok(&vm2, &["write -P 0x3e 0 4M", "read -P 0x3e 0 4M"]);
    // The TCP listener itself is full, for TLS clients too.
    assert!(!qio_tls_passes(&lab, &creds, port, "vm1-disk0", &["read 0 4k"]), "a client past the cap was served");
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(log.contains("at its connection cap"), "no log line of the refusals");
    assert!(log.matches("at its connection cap").count() < 3, "refusals are not rate-limited in the log");

    // The flood gone, the TCP export serves again.
    drop(held);
    let ok = wait_until(Duration::from_secs(20), || {
        qio_tls_passes(&lab, &creds, port, "vm1-disk0", &["write -P 0x11 0 1M", "read -P 0x11 0 1M"])
    });
    assert!(ok, "the TCP export does not serve again after the flood");

    // The per-export cap (2), counted across listeners: one session over TCP (qemu-io
    // holds none now), two on vm1's socket; a third is refused with a reason while vm2
    // is served.
    let sock = lab.host_slot("hv1").dir.join("vms/vm1/nbd.sock");
    let _a = hold_export(&sock, "vm1-disk0").expect("first session");
    let _b = hold_export(&sock, "vm1-disk0").expect("second session");
    let refused = hold_export(&sock, "vm1-disk0").map(|_| ()).expect_err("a third session to a disk capped at 2");
    assert!(refused.contains("cap of 2"), "{refused}");
    assert!(!qio_tls_passes(&lab, &creds, port, "vm1-disk0", &["read 0 4k"]), "TCP got past the export's cap");
    assert!(lab.reads(&vm2, &["read -P 0x3e 0 4M"]), "vm2 is not served while vm1 is at its cap");
}

/// Every entry under `root`, not following links.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())).flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn every_file_of_a_protected_and_replicated_vm_has_its_mode() {
    let (group, gid) = nbd_group();
    let flags = ["--nbd-group", group.as_str()];
    let w = World::unpaired("nbd_modes", &flags, &flags);
    w.pair("fast", &[]);
    w.vm("vm1", &["64M", "32M"], &[]);
    let uri = w.uris("vm1")[0].clone();
    w.qio_ok(&uri, &["write -P 0x21 0 2M"]);
    w.protect_with_point("vm1");
    // Several points after the first: undo records on the replica.
    for i in 0..3u64 {
        let t = unix_now_ms();
        w.qio_ok(&uri, &[format!("write -P 0x{:x} {}M 1M", 0x30 + i, 4 + i)]);
        w.wait_point_after("vm1", t, "a point after a write");
    }

    let mut seen: Vec<String> = Vec::new();
    for host in ["hv-a", "hv-b"] {
        let dir = w.dir(host);
        for p in std::iter::once(dir.clone()).chain(walk(&dir)) {
            let rel = p.strip_prefix(&dir).unwrap_or(&p).display().to_string();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            // A temporary of an atomic save may go between the listing and the stat.
            let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
            let ft = meta.file_type();
            let m = meta.mode() & 0o7777;
            let want = if ft.is_dir() {
                // The way to the VMs' sockets is the group's to traverse; replicas are not.
                if rel.is_empty() || rel == "vms" || (rel.starts_with("vms/") && !rel[4..].contains('/')) {
                    assert_eq!(meta.gid(), gid, "{host}:{rel} group");
                    0o710
                } else {
                    0o700
                }
            } else if name == "nbd.sock" {
                assert_eq!(meta.gid(), gid, "{host}:{rel} group");
                0o660
            } else if name == "ca.pem" || name == "host.pem" {
                // Certificates are public; their keys are not.
                0o644
            } else {
                assert!(!ft.is_symlink(), "{host}:{rel} is a symlink");
                0o600
            };
            assert_eq!(m, want, "{host}:{rel} has mode {m:o}, not {want:o}");
            seen.push(format!("{host}:{}", kind(&rel, &name)));
        }
    }
    for k in [
        "hv-a:vm image",
        "hv-a:hrl log",
        "hv-a:vm.json",
        "hv-a:protection.json",
        "hv-a:replication.json",
        "hv-a:host.key",
        "hv-a:agent.json",
        "hv-b:replica image",
        "hv-b:replica.json",
        "hv-b:undo",
    ] {
        assert!(seen.iter().any(|s| s == k), "no {k} was checked; saw {seen:?}");
    }
}

/// What kind of file `rel` is, for the coverage check.
fn kind(rel: &str, name: &str) -> String {
    let under = |d: &str| rel.starts_with(d);
    match () {
        _ if name.ends_with(".img") && under("vms/") => "vm image".into(),
        _ if name.ends_with(".img") && under("replicas/") => "replica image".into(),
        _ if name.ends_with(".hrl") => "hrl log".into(),
        _ if name.ends_with(".undo") => "undo".into(),
        _ if name.ends_with(".pt") => "spool".into(),
        _ => name.to_owned(),
    }
}
