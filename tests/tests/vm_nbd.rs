//! Issue "VM disks served over NBD": the product path through the real binaries — the
//! operator creates a VM with the CLI, the agent serves its disks over NBD (unix socket
//! and loopback TCP), and the real QEMU clients (`qemu-io`, `qemu-img`) use them.
//!
//! Run: `cargo build --workspace --bins && cargo test -p siterecovery-tests --test vm_nbd`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use siterecovery_tests::*;

const MIB: usize = 1 << 20;

/// (unix URI, tcp URI) of disk `i` of a VM as the CLI shows it.
fn uris(vm: &Value, i: usize) -> (String, String) {
    let d = &vm["disks"][i];
    let u = d["nbd_unix_uri"].as_str().unwrap_or_default().to_owned();
    let t = d["nbd_tcp_uri"].as_str().unwrap_or_default().to_owned();
    assert!(!u.is_empty() && !t.is_empty(), "disk {i} has no export URIs: {vm}");
    (u, t)
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Creates `name` on hv1 with the given disks, started; returns `vm show --json`.
fn create_vm(lab: &Lab, name: &str, disks: &[&str], extra: &[&str]) -> Value {
    let mut args = vec!["vm", "create", "--host", "hv1", "--name", name];
    for d in disks {
        args.extend(["--disk", d]);
    }
    args.extend_from_slice(extra);
    lab.cli_json(&args)
}

#[test]
fn disks_are_served_over_unix_and_tcp_nbd() {
    let (lab, _provider, _agent) = Lab::with_host("nbd_serve");
    let created = create_vm(&lab, "vm1", &["64M", "32M"], &["--nic", "prod=10.0.0.5"]);
    assert_eq!(created["power_state"], "running", "{created}");
    let vm = lab.show("vm1");
    assert_eq!(vm["host"], "hv1", "{vm}");
    assert_eq!(vm["power_state"], "running", "{vm}");
    let disks = vm["disks"].as_array().expect("disks");
    assert_eq!(disks.len(), 2, "{vm}");
    assert_eq!(disks[0]["size_bytes"], 64 * MIB, "{vm}");
    assert_eq!(disks[1]["size_bytes"], 32 * MIB, "{vm}");
    let nics = vm["nics"].as_array().expect("nics");
    assert_eq!(nics.len(), 1, "{vm}");
    assert_eq!(nics[0]["network"], "prod");
    assert_eq!(nics[0]["ip"], "10.0.0.5");
    assert!(nics[0]["mac"].as_str().is_some_and(|m| m.len() == 17), "{vm}");
    let (unix0, tcp0) = uris(&vm, 0);
    let (unix1, tcp1) = uris(&vm, 1);
    assert_ne!(unix0, unix1);
    assert_ne!(tcp0, tcp1);
    let sock = unix0.split_once("socket=").map(|(_, s)| s).expect("socket= in the unix URI");
    assert!(Path::new(sock).exists(), "NBD socket {sock} missing");
    assert!(
        tcp0.starts_with(&format!("nbd://127.0.0.1:{}/", lab.host_slot("hv1").nbd_port)),
        "TCP URI {tcp0} is not on the agent's NBD port"
    );

    // Write through one transport, read back through the other.
    lab.qio_ok(&unix0, &["write -P 0xab 0 1M"]);
    lab.qio_ok(&tcp0, &["write -P 0xcd 1M 1M"]);
    lab.qio_ok(&tcp0, &["read -P 0xab 0 1M"]);
    lab.qio_ok(&unix0, &["read -P 0xcd 1M 1M"]);
    // A wrong pattern fails: the reads above do verify.
    assert_fails(&lab.qio(&tcp0, &["read -P 0xcd 0 1M"], false), "read -P with the wrong pattern");
    assert_fails(&lab.qio(&unix0, &["read -P 0x00 1M 1M"], false), "read -P with the wrong pattern");
    // The other disk is separate and still zero.
    lab.qio_ok(&unix1, &["read -P 0 0 2M"]);

    // The whole disk against a file built here.
    let mut expected = vec![0u8; 64 * MIB];
    expected[..MIB].fill(0xab);
    expected[MIB..2 * MIB].fill(0xcd);
    let exp = lab.root.join("expected.img");
    write_file(&exp, &expected);
    for uri in [&unix0, &tcp0] {
        let o = lab.qemu_img(&["compare", "-f", "raw", "-F", "raw", uri, &exp.display().to_string()]);
        assert_exit(&o, 0, &format!("qemu-img compare {uri} expected.img"));
    }
    let mut wrong = expected.clone();
    wrong[5 * MIB + 7] = 1;
    let wrong_path = lab.root.join("wrong.img");
    write_file(&wrong_path, &wrong);
    let o = lab.qemu_img(&["compare", "-f", "raw", "-F", "raw", &tcp0, &wrong_path.display().to_string()]);
    assert_exit(&o, 1, "qemu-img compare against a file that differs in one byte");

    // Convert (a full read) and compare the copy.
    let out = lab.root.join("out.img");
    assert_ok(
        &lab.qemu_img(&["convert", "-f", "raw", "-O", "raw", &unix0, &out.display().to_string()]),
        "qemu-img convert",
    );
    let o =
        lab.qemu_img(&["compare", "-f", "raw", "-F", "raw", &out.display().to_string(), &exp.display().to_string()]);
    assert_exit(&o, 0, "qemu-img compare out.img expected.img");
    assert!(std::fs::read(&out).expect("read out.img") == expected, "out.img differs from expected");
    // The agent wrote the image file itself (the disk is a raw image in the VM folder).
    let image = vm["disks"][0]["image_path"].as_str().expect("image_path");
    assert!(std::fs::read(image).expect("read image") == expected, "{image} differs from expected");
    let zeros = lab.root.join("zero32.img");
    write_file(&zeros, &vec![0u8; 32 * MIB]);
    assert_exit(
        &lab.qemu_img(&["compare", "-f", "raw", "-F", "raw", &tcp1, &zeros.display().to_string()]),
        0,
        "disk1 zero",
    );

    // Throughput smoke: reads and writes at queue depth 16, both transports.
    for uri in [&unix0, &tcp1] {
        for write in [false, true] {
            let mut args = vec!["bench", "-f", "raw", "-t", "none", "-s", "64k", "-c", "500", "-d", "16"];
            if write {
                args.push("-w");
            }
            args.push(uri);
            let o = lab.qemu_img(&args);
            assert_ok(&o, &format!("qemu-img {}", args.join(" ")));
            eprintln!("bench {uri} write={write}: {}", stdout(&o).lines().last().unwrap_or_default());
        }
    }
}

#[test]
fn agent_restart_keeps_the_vm_running_and_its_data() {
    let (lab, _provider, mut agent) = Lab::with_host("nbd_restart");
    let vm = create_vm(&lab, "vm1", &["16M"], &[]);
    let (unix0, _) = uris(&vm, 0);
    lab.qio_ok(&unix0, &["write -P 0x5a 4M 2M"]);

    agent.stop_gracefully();
    assert_fails(&lab.qio(&unix0, &["read -P 0x5a 4M 2M"], false), "read while the agent is down");
    let since = unix_now_ms();
    let _agent = lab.start_agent("hv1");
    lab.wait_host_heartbeat_since("hv1", since);

    let mut vm = Value::Null;
    let served = wait_until(Duration::from_secs(20), || {
        vm = lab.show("vm1");
        vm["power_state"] == "running" && vm["disks"][0]["nbd_unix_uri"].as_str().is_some_and(|u| !u.is_empty())
    });
    assert!(served, "vm1 not running with exports after the agent restart: {vm}");
    let list = lab.cli_json(&["vm", "list"]);
    let row = list.as_array().and_then(|a| a.iter().find(|v| v["name"] == "vm1")).cloned().unwrap_or_default();
    assert_eq!(row["power_state"], "running", "vm list: {list}");
    let (unix0, tcp0) = uris(&vm, 0);
    lab.qio_ok(&unix0, &["read -P 0x5a 4M 2M"]);
    lab.qio_ok(&tcp0, &["read -P 0x5a 4M 2M"]);
    lab.qio_ok(&tcp0, &["read -P 0 0 4M"]);
    assert_fails(&lab.qio(&tcp0, &["read -P 0x5b 4M 2M"], false), "wrong pattern after restart");
}

#[test]
fn stop_start_delete_and_bad_requests() {
    let (lab, _provider, _agent) = Lab::with_host("nbd_lifecycle");
    let vm = create_vm(&lab, "vm1", &["8M", "8M"], &[]);
    let folder = vm["folder"].as_str().expect("folder").to_owned();
    assert!(Path::new(&folder).join("vm.json").is_file(), "no vm.json in {folder}");
    let (unix0, tcp0) = uris(&vm, 0);
    let (unix1, _) = uris(&vm, 1);
    lab.qio_ok(&unix0, &["write -P 0x11 0 1M"]);
    lab.qio_ok(&unix1, &["write -P 0x22 0 1M"]);

    // Stop: powered off, exports gone, NBD refused.
    let stopped = lab.cli_json(&["vm", "stop", "vm1"]);
    assert_eq!(stopped["power_state"], "off", "{stopped}");
    assert!(stopped["disks"][0]["nbd_unix_uri"].as_str().is_some_and(str::is_empty), "{stopped}");
    assert_eq!(lab.show("vm1")["power_state"], "off");
    assert_fails(&lab.qio(&unix0, &["read -P 0x11 0 1M"], false), "NBD (unix) of a stopped VM");
    assert_fails(&lab.qio(&tcp0, &["read -P 0x11 0 1M"], false), "NBD (tcp) of a stopped VM");
    assert_fails(&lab.qio(&tcp0, &["write -P 0x33 0 1M"], false), "NBD write to a stopped VM");

    // Start: served again, data intact.
    let started = lab.cli_json(&["vm", "start", "vm1"]);
    assert_eq!(started["power_state"], "running", "{started}");
    let (unix0, tcp0) = uris(&started, 0);
    let (_, tcp1) = uris(&started, 1);
    lab.qio_ok(&unix0, &["read -P 0x11 0 1M"]);
    lab.qio_ok(&tcp0, &["read -P 0x11 0 1M"]);
    lab.qio_ok(&tcp1, &["read -P 0x22 0 1M"]);

    // Delete: folder removed, gone from the inventory.
    let o = lab.cli(&["vm", "delete", "vm1"]);
    assert_ok(&o, "vm delete");
    assert!(!Path::new(&folder).exists(), "{folder} still exists after vm delete");
    assert_fails_saying(&lab.cli(&["vm", "show", "vm1"]), &["no vm"], "vm show of a deleted VM");
    let list = lab.cli_json(&["vm", "list"]);
    assert!(list.as_array().is_some_and(|a| a.iter().all(|v| v["name"] != "vm1")), "{list}");
    assert_fails(&lab.qio(&tcp0, &["read -P 0x11 0 1M"], false), "NBD of a deleted VM");

    // Bad requests fail clearly and create nothing.
    let vms_dir = lab.host_slot("hv1").dir.join("vms");
    let o = lab.cli(&["vm", "create", "--host", "hv1", "--name", "bad", "--disk", "1000"]);
    assert_fails_saying(&o, &["multiple of 512"], "disk size not a multiple of 512");
    let o = lab.cli(&["vm", "create", "--host", "hv1", "--name", "bad", "--disk", "10X"]);
    assert_fails_saying(&o, &["size"], "unparsable disk size");
    let o = lab.cli(&["vm", "create", "--host", "nohost", "--name", "bad", "--disk", "1M"]);
    assert_fails_saying(&o, &["no host", "nohost"], "unknown host");
    assert!(!vms_dir.join("bad").exists(), "a refused create left a folder");
    create_vm(&lab, "vm2", &["1M"], &["--stopped"]);
    let o = lab.cli(&["vm", "create", "--host", "hv1", "--name", "vm2", "--disk", "1M"]);
    assert_fails_saying(&o, &["already exists"], "duplicate VM name");
    assert_eq!(lab.show("vm2")["power_state"], "off", "--stopped VM");
}

/// Offsets and patterns of the kill -9 test: 4 KiB writes at distinct offsets.
const BLOCK: usize = 4096;
fn pattern(i: usize) -> u8 {
    (i % 251) as u8 + 1
}

#[test]
fn kill9_of_the_agent_keeps_every_acknowledged_write() {
    let (lab, _provider, mut agent) = Lab::with_host("nbd_kill9");
    let size = 64 * MIB;
    let vm = create_vm(&lab, "vm1", &["64M"], &[]);
    let (unix0, _) = uris(&vm, 0);

    // One qemu-io doing N serial writes (each issued after the previous one completed);
    // line-buffered, so each "wrote" line is visible as soon as the write is acknowledged.
    let n = size / BLOCK;
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "qemu-io", "-f", "raw"]);
    for i in 0..n {
        cmd.arg("-c").arg(format!("write -P {} {} {BLOCK}", pattern(i), i * BLOCK));
    }
    cmd.arg(&unix0);
    let mut writer = lab.spawn("qemu-io-writer", &mut cmd);
    let log = writer.log.clone();
    let acked = |log: &Path| -> Vec<usize> {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("wrote {BLOCK}/{BLOCK} bytes at offset ")))
            .filter_map(|o| o.trim().parse::<usize>().ok())
            .collect()
    };
    let enough = 500;
    let reached = wait_until_every(Duration::from_secs(30), Duration::from_millis(5), || {
        acked(&log).len() >= enough || !writer.is_running()
    });
    assert!(
        reached && writer.is_running(),
        "qemu-io did not reach {enough} writes while running (log {})",
        log.display()
    );
    agent.kill9();
    assert!(writer.wait_exit(Duration::from_secs(30)).is_some(), "qemu-io did not exit after the agent died");
    let done = acked(&log);
    eprintln!("{} of {n} writes acknowledged before kill -9", done.len());
    assert!(done.len() >= enough && done.len() < n, "the kill did not land mid-run ({} of {n} done)", done.len());
    // Acknowledged in order, each once.
    for (i, off) in done.iter().enumerate() {
        assert_eq!(*off, i * BLOCK, "acknowledgements out of order");
    }

    let since = unix_now_ms();
    let _agent = lab.start_agent("hv1");
    lab.wait_host_heartbeat_since("hv1", since);
    let mut vm = Value::Null;
    assert!(
        wait_until(Duration::from_secs(20), || {
            vm = lab.show("vm1");
            vm["disks"][0]["nbd_unix_uri"].as_str().is_some_and(|u| !u.is_empty())
        }),
        "vm1 not served after the restart: {vm}"
    );
    let (unix0, _) = uris(&vm, 0);
    let copy = lab.root.join("after.img");
    assert_ok(&lab.qemu_img(&["convert", "-f", "raw", "-O", "raw", &unix0, &copy.display().to_string()]), "convert");
    let data = std::fs::read(&copy).expect("read copy");
    assert_eq!(data.len(), size);
    let mut lost = Vec::new();
    for i in 0..done.len() {
        let block = &data[i * BLOCK..(i + 1) * BLOCK];
        if block.iter().any(|&b| b != pattern(i)) {
            lost.push(i * BLOCK);
        }
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost or damaged, first offsets {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    // Writes never issued (after the one in flight at the kill) left the disk zero.
    let never = (done.len() + 1) * BLOCK;
    assert!(data[never..].iter().all(|&b| b == 0), "data beyond the last issued write");
}
