//! [`Lab`]: one test's world. A short temp dir under `/tmp` (unix socket paths stay well
//! below 108 bytes), its own loopback ports, the provider's data dir, vault key and
//! operator certs, a data dir and fixed ports per host, and a log file for every
//! process it starts. Commands run to completion with a deadline, their output
//! captured through files (no pipe deadlocks) and recorded in a transcript; when a test
//! panics, dropping its `Lab` prints the tail of every log and of the transcript, so a
//! CI failure can be read from its output.
//!
//! This module starts things (vault, provider, agents) and runs commands; what the
//! tests ask through the operator CLI, grpcurl and the QEMU clients is in the modules
//! above it (`cli`, `grpcurl`, `qemu`), which add methods to `Lab`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::output::{assert_ok, stderr};
use crate::proc::{Proc, bin, free_port};
use crate::wait::{unix_now_ms, wait_until};

/// Longest any single command (CLI, grpcurl, qemu-*) may run before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Agents heartbeat this often in tests, so state changes show quickly.
pub const HEARTBEAT: &str = "1s";
/// Lines of each log printed when a test fails.
const TAIL_LINES: usize = 80;

/// Where a host's agent keeps its files and which ports it uses (fixed per lab, so
/// restarts keep the same addresses and NBD URIs).
#[derive(Debug, Clone)]
pub struct HostSlot {
    pub dir: PathBuf,
    pub listen_port: u16,
    pub nbd_port: u16,
    /// `agent serve --metrics-listen 127.0.0.1:PORT`.
    pub metrics_port: u16,
}

/// `--metrics-listen 127.0.0.1:PORT` unless the test's own flags name one.
fn metrics_flag(extra: &[&str], port: u16) -> Vec<String> {
    if extra.contains(&"--metrics-listen") {
        return Vec::new();
    }
    vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")]
}

/// One test's world: temp dir, ports, the provider's data dir, vault key, operator certs.
pub struct Lab {
    tmp: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub provider_dir: PathBuf,
    pub provider_port: u16,
    /// `provider serve --metrics-listen 127.0.0.1:PORT`.
    pub provider_metrics_port: u16,
    pub vault_key: PathBuf,
    pub opdir: PathBuf,
    /// The provider's `--scripts-dir` (recovery-plan scripts are named in it).
    pub scripts_dir: PathBuf,
    hosts: Mutex<HashMap<String, HostSlot>>,
    seq: AtomicUsize,
    logs: Mutex<Vec<PathBuf>>,
    transcript: PathBuf,
}

impl Lab {
    /// A fresh lab (nothing started yet).
    pub fn new(test: &str) -> Self {
        // Fail early and clearly when the binaries are missing.
        bin("provider");
        bin("agent");
        let tmp = tempfile::Builder::new().prefix("sr").tempdir_in("/tmp").expect("temp dir");
        let root = tmp.path().to_path_buf();
        let transcript = root.join("commands.log");
        let lab = Self {
            provider_dir: root.join("p"),
            provider_port: free_port(),
            provider_metrics_port: free_port(),
            vault_key: root.join("vault.key"),
            opdir: root.join("op"),
            scripts_dir: root.join("scripts"),
            root,
            tmp: Some(tmp),
            hosts: Mutex::new(HashMap::new()),
            seq: AtomicUsize::new(0),
            logs: Mutex::new(Vec::new()),
            transcript,
        };
        std::fs::create_dir_all(&lab.scripts_dir).expect("scripts dir");
        eprintln!("[lab] {test}: {}", lab.root.display());
        lab
    }

    /// A lab with a vault, a running provider, operator certs, and host `hv1`
    /// (site primary, cloud gold-a) registered, running and connected.
    pub fn with_host(test: &str) -> (Self, Proc, Proc) {
        let lab = Self::new(test);
        lab.create_vault();
        let provider = lab.start_provider();
        lab.operator_cert();
        lab.register_agent("hv1", "primary", "gold-a");
        let agent = lab.start_agent("hv1");
        lab.wait_host_connected("hv1");
        (lab, provider, agent)
    }

    /// `127.0.0.1:PORT` of the provider.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.provider_port)
    }

    fn next(&self) -> usize {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn note(&self, text: &str) {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&self.transcript) {
            let _ = writeln!(f, "{text}");
        }
    }

    /// Runs a command to completion (killed after `timeout`), stdout/stderr captured via
    /// files (no pipe deadlocks), and records it in the transcript.
    pub fn run_timeout(&self, cmd: &mut Command, timeout: Duration) -> Output {
        self.run_fed(cmd, None, timeout)
    }

    /// Runs with [`COMMAND_TIMEOUT`].
    pub fn run(&self, cmd: &mut Command) -> Output {
        self.run_timeout(cmd, COMMAND_TIMEOUT)
    }

    /// [`Self::run`] with `input` on its stdin (from a file, so it never blocks the test).
    pub fn run_with_stdin(&self, cmd: &mut Command, input: &[u8]) -> Output {
        self.run_fed(cmd, Some(input), COMMAND_TIMEOUT)
    }

    fn run_fed(&self, cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Output {
        let n = self.next();
        let out_path = self.root.join(format!("cmd{n}.out"));
        let err_path = self.root.join(format!("cmd{n}.err"));
        let in_path = self.root.join(format!("cmd{n}.in"));
        let line = format!("{cmd:?}");
        let out_f = File::create(&out_path).expect("create stdout file");
        let err_f = File::create(&err_path).expect("create stderr file");
        let stdin = match input {
            Some(bytes) => {
                std::fs::write(&in_path, bytes).expect("write stdin file");
                Stdio::from(File::open(&in_path).expect("open stdin file"))
            }
            None => Stdio::null(),
        };
        cmd.stdin(stdin).stdout(out_f).stderr(err_f);
        cmd.env_remove("SITERECOVERY_CONNECT").env_remove("SITERECOVERY_CERTS");
        // A test's failpoints reach only the process it armed ([`Self::start_agent_armed`]).
        if !cmd.get_envs().any(|(k, _)| k == "FAILPOINTS") {
            cmd.env_remove("FAILPOINTS");
        }
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {line}: {e}"));
        let deadline = started + timeout;
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.note(&format!("$ {line}\n  KILLED after {timeout:?}"));
                self.dump_logs();
                panic!("command did not finish within {timeout:?}: {line}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let out = Output {
            status,
            stdout: std::fs::read(&out_path).unwrap_or_default(),
            stderr: std::fs::read(&err_path).unwrap_or_default(),
        };
        for p in [&out_path, &err_path, &in_path] {
            let _ = std::fs::remove_file(p);
        }
        let err = stderr(&out);
        let err_tail: Vec<&str> = err.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
        self.note(&format!(
            "$ {line}\n  -> {status} in {:?}{}",
            started.elapsed(),
            if err_tail.is_empty() { String::new() } else { format!("\n  stderr: {}", err_tail.join("\n          ")) }
        ));
        out
    }

    /// Starts a long-running process with stdout and stderr appended to `<root>/<name>.log`.
    pub fn spawn(&self, name: &str, cmd: &mut Command) -> Proc {
        let log = self.root.join(format!("{name}.log"));
        let mut f = OpenOptions::new().create(true).append(true).open(&log).expect("open log");
        let _ = writeln!(f, "===== [lab] start at {} ms: {cmd:?}", unix_now_ms());
        let f2 = f.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        cmd.env_remove("SITERECOVERY_CONNECT").env_remove("SITERECOVERY_CERTS");
        // A test's failpoints reach only the process it armed ([`Self::start_agent_armed`]).
        if !cmd.get_envs().any(|(k, _)| k == "FAILPOINTS") {
            cmd.env_remove("FAILPOINTS");
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        if let Ok(mut logs) = self.logs.lock()
            && !logs.contains(&log)
        {
            logs.push(log.clone());
        }
        self.note(&format!("& [{name} pid {}] {cmd:?}", child.id()));
        Proc::new(name, log, child)
    }

    /// Runs the `provider` binary with `args`.
    pub fn provider(&self, args: &[&str]) -> Output {
        self.run(Command::new(bin("provider")).args(args))
    }

    /// Runs the `agent` binary with `args`.
    pub fn agent(&self, args: &[&str]) -> Output {
        self.run(Command::new(bin("agent")).args(args))
    }

    /// `provider vault create` into the lab's provider dir and vault key (5 day secret).
    pub fn create_vault(&self) {
        let o = self.create_vault_at(&self.provider_dir, &self.addr(), &self.vault_key, &[]);
        assert_ok(&o, "vault create");
    }

    /// `provider vault create` with any dir, address, key file and extra flags.
    pub fn create_vault_at(&self, dir: &Path, address: &str, key: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "vault".to_owned(),
            "create".into(),
            "--name".into(),
            "contoso".into(),
            "--data-dir".into(),
            dir.display().to_string(),
            "--address".into(),
            address.into(),
            "--out".into(),
            key.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.run(Command::new(bin("provider")).args(&args))
    }

    /// `provider serve` on the lab's port; returns once the port accepts connections.
    pub fn start_provider(&self) -> Proc {
        self.start_provider_with(&[])
    }

    /// [`Self::start_provider`] with extra `serve` flags (e.g. `--test-intervals`).
    /// Plan scripts run from [`Self::scripts_dir`].
    pub fn start_provider_with(&self, extra: &[&str]) -> Proc {
        let mut p = self.spawn(
            "provider",
            Command::new(bin("provider"))
                .args(["serve", "--data-dir"])
                .arg(&self.provider_dir)
                .args(["--listen", &self.addr(), "--grace", "5s"])
                .arg("--scripts-dir")
                .arg(&self.scripts_dir)
                .args(metrics_flag(extra, self.provider_metrics_port))
                .args(extra),
        );
        let addr = self.addr();
        let up = wait_until(Duration::from_secs(20), || {
            p.try_wait().is_some() || std::net::TcpStream::connect(&addr).is_ok()
        });
        if let Some(s) = p.try_wait() {
            self.dump_logs();
            panic!("provider exited at start with {s}");
        }
        if !up {
            self.dump_logs();
            panic!("provider does not listen on {addr} after 20 s");
        }
        p
    }

    /// `provider operator-cert` into the lab's operator dir.
    pub fn operator_cert(&self) {
        let o = self.operator_cert_at(&self.provider_dir, &self.opdir, &[]);
        assert_ok(&o, "operator-cert");
        for f in ["ca.pem", "op.pem", "op.key"] {
            assert!(self.opdir.join(f).is_file(), "operator-cert wrote no {f}");
        }
    }

    /// `provider operator-cert` from any vault dir into any dir, with extra flags.
    pub fn operator_cert_at(&self, vault_dir: &Path, out: &Path, extra: &[&str]) -> Output {
        self.run(
            Command::new(bin("provider"))
                .arg("operator-cert")
                .arg("--data-dir")
                .arg(vault_dir)
                .arg("--out")
                .arg(out)
                .args(extra),
        )
    }

    /// The data dir and ports of host `name` (allocated on first use).
    pub fn host_slot(&self, name: &str) -> HostSlot {
        let mut hosts = self.hosts.lock().expect("hosts lock");
        hosts
            .entry(name.to_owned())
            .or_insert_with(|| HostSlot {
                dir: self.root.join(name),
                listen_port: free_port(),
                nbd_port: free_port(),
                metrics_port: free_port(),
            })
            .clone()
    }

    /// `agent register` of host `name` from `dir` with `key`, plus extra flags.
    pub fn register_at(&self, name: &str, dir: &Path, key: &Path, site: &str, cloud: &str, extra: &[&str]) -> Output {
        let slot = self.host_slot(name);
        let listen = format!("127.0.0.1:{}", slot.listen_port);
        self.run(
            Command::new(bin("agent"))
                .arg("--data-dir")
                .arg(dir)
                .arg("register")
                .arg("--vault-key")
                .arg(key)
                .args(["--host", name, "--site", site, "--cloud", cloud, "--listen", &listen])
                .args(extra),
        )
    }

    /// Registers host `name` with the lab's vault key; panics unless it succeeds.
    pub fn register_agent(&self, name: &str, site: &str, cloud: &str) {
        let slot = self.host_slot(name);
        let o = self.register_at(name, &slot.dir, &self.vault_key, site, cloud, &[]);
        assert_ok(&o, &format!("agent register {name}"));
        for f in ["agent.json", "host.pem", "host.key", "ca.pem"] {
            assert!(slot.dir.join(f).is_file(), "agent register wrote no {f}");
        }
    }

    /// `agent serve` for host `name` (heartbeat [`HEARTBEAT`], NBD on the host's fixed port).
    pub fn start_agent(&self, name: &str) -> Proc {
        let slot = self.host_slot(name);
        self.start_agent_in(name, &slot.dir)
    }

    /// `agent serve` from any data dir (log `agent-<name>.log`).
    pub fn start_agent_in(&self, name: &str, dir: &Path) -> Proc {
        self.start_agent_with(name, dir, &[])
    }

    /// [`Self::start_agent_in`] with extra `serve` flags (e.g. `--peer-listen ADDR`).
    /// The TCP NBD export is plain (`--nbd-insecure-tcp`, loopback), so the tests can
    /// read point exports with plain `qemu-img`; [`Self::start_agent_tls`] keeps TLS.
    pub fn start_agent_with(&self, name: &str, dir: &Path, extra: &[&str]) -> Proc {
        let mut args = vec!["--nbd-insecure-tcp"];
        args.extend_from_slice(extra);
        self.start_agent_tls(name, dir, &args)
    }

    /// `agent serve` as it runs in production: TLS required on the TCP NBD export.
    pub fn start_agent_tls(&self, name: &str, dir: &Path, extra: &[&str]) -> Proc {
        let mut cmd = self.agent_serve(name, dir, extra);
        self.spawn(&format!("agent-{name}"), &mut cmd)
    }

    /// [`Self::start_agent_with`] with failpoints armed (`FAILPOINTS`, the `fail` crate's
    /// syntax; names in `siterecovery_agent::faults::ALL`), e.g.
    /// `"commit.images.moved=1*return(crash)"`.
    pub fn start_agent_armed(&self, name: &str, dir: &Path, failpoints: &str, extra: &[&str]) -> Proc {
        let mut args = vec!["--nbd-insecure-tcp"];
        args.extend_from_slice(extra);
        let mut cmd = self.agent_serve(name, dir, &args);
        cmd.env("FAILPOINTS", failpoints);
        self.spawn(&format!("agent-{name}"), &mut cmd)
    }

    /// [`Self::start_agent_with`] with extra environment variables (e.g. the hidden
    /// test clock offset of the bandwidth windows).
    pub fn start_agent_env(&self, name: &str, dir: &Path, env: &[(&str, &str)], extra: &[&str]) -> Proc {
        let mut args = vec!["--nbd-insecure-tcp"];
        args.extend_from_slice(extra);
        let mut cmd = self.agent_serve(name, dir, &args);
        cmd.envs(env.iter().copied());
        self.spawn(&format!("agent-{name}"), &mut cmd)
    }

    fn agent_serve(&self, name: &str, dir: &Path, extra: &[&str]) -> Command {
        let slot = self.host_slot(name);
        let nbd = format!("127.0.0.1:{}", slot.nbd_port);
        let mut cmd = Command::new(bin("agent"));
        cmd.arg("--data-dir").arg(dir).args(["serve", "--heartbeat", HEARTBEAT, "--nbd-listen", &nbd]);
        cmd.args(metrics_flag(extra, slot.metrics_port)).args(extra);
        cmd
    }

    /// Prints the tail of every process log and of the command transcript to stderr.
    pub fn dump_logs(&self) {
        let mut files = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        files.push(self.transcript.clone());
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_else(|e| format!("(cannot read: {e})"));
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(TAIL_LINES);
            eprintln!("----- tail of {} ({} of {} lines) -----", f.display(), lines.len() - from, lines.len());
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
        eprintln!("----- end of logs -----");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if std::env::var_os("SR_KEEP_TMP").is_some()
            && let Some(t) = self.tmp.take()
        {
            eprintln!("[lab] kept {}", t.keep().display());
        }
    }
}
