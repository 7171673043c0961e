//! Harness for the end-to-end tests: real `provider` and `agent` processes on loopback,
//! real certificates, and the real clients operators use (`grpcurl`, `qemu-io`, `qemu-img`).
//!
//! Every test makes its own [`Lab`]: a short temp dir under `/tmp` (unix socket paths
//! stay well below 108 bytes), its own loopback ports, and log files for every process
//! it starts. Processes ([`Proc`]) are stopped by PID when dropped (SIGTERM, then
//! SIGKILL after a deadline). When a test panics, dropping its `Lab` prints the tail of
//! every log and of the command transcript, so a CI failure can be read from its output.
//!
//! The binaries are the ones `cargo build --workspace --bins` puts beside the test
//! executable's `deps/` folder; the tests never invoke cargo themselves.
//!
//! No bare sleeps synchronise anything: waits poll a condition with a bounded deadline
//! ([`wait_until`]).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Poll period of [`wait_until`].
pub const POLL: Duration = Duration::from_millis(100);
/// Longest any single command (CLI, grpcurl, qemu-*) may run before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process gets to exit after SIGTERM.
pub const TERM_DEADLINE: Duration = Duration::from_secs(15);
/// Agents heartbeat this often in tests, so state changes show quickly.
pub const HEARTBEAT: &str = "1s";
/// Lines of each log printed when a test fails.
const TAIL_LINES: usize = 80;

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Milliseconds since the epoch.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Polls `f` every [`POLL`] until it returns true (→ true) or `timeout` passes (→ false).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    wait_until_every(timeout, POLL, &mut f)
}

/// [`wait_until`] with another poll period (for races against a fast process).
pub fn wait_until_every(timeout: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// The directory holding the workspace's binaries: the test executable is
/// `target/<profile>/deps/<test>-<hash>`, the binaries are in `target/<profile>/`.
fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let deps = exe.parent().expect("test executable has a parent dir");
        let dir = if deps.file_name().is_some_and(|n| n == "deps") { deps.parent().unwrap_or(deps) } else { deps };
        dir.to_path_buf()
    })
    .clone()
}

/// Path of a workspace binary (`provider`, `agent`); panics with what to do when missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (the end-to-end tests use the built binaries)",
        p.display()
    );
    p
}

/// A free loopback port: bind 127.0.0.1:0, take the port, drop the socket. Ports handed
/// out in this process are never handed out twice.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().expect("local_addr").port();
        drop(l);
        if given.lock().map(|mut g| g.insert(port)).unwrap_or(true) {
            return port;
        }
    }
    panic!("no free loopback port");
}

/// Stdout of a command as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Stderr of a command as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn describe(o: &Output) -> String {
    format!("exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}", o.status.code(), stdout(o), stderr(o))
}

/// Panics (with the output) unless the command succeeded.
#[track_caller]
pub fn assert_ok(o: &Output, what: &str) {
    assert!(o.status.success(), "{what}: expected success, got {}", describe(o));
}

/// Panics (with the output) unless the command failed.
#[track_caller]
pub fn assert_fails(o: &Output, what: &str) {
    assert!(!o.status.success(), "{what}: expected a failure, got {}", describe(o));
}

/// Panics unless the command exited with `code`.
#[track_caller]
pub fn assert_exit(o: &Output, code: i32, what: &str) {
    assert_eq!(o.status.code(), Some(code), "{what}: expected exit {code}, got {}", describe(o));
}

/// Panics unless the command failed and its stderr mentions one of `words` (case-insensitive).
#[track_caller]
pub fn assert_fails_saying(o: &Output, words: &[&str], what: &str) {
    assert_fails(o, what);
    let err = stderr(o).to_lowercase();
    assert!(
        words.iter().any(|w| err.contains(&w.to_lowercase())),
        "{what}: stderr should mention one of {words:?}; got {}",
        describe(o)
    );
}

/// A process started by a test; stopped by PID when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    pub fn signal(&mut self, sig: Signal) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), sig);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait up to `timeout`; `None` when it did not exit (it is then SIGKILLed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.signal(Signal::SIGTERM);
        let s = self.wait_exit(timeout);
        if s.is_none() {
            self.kill9();
        }
        s
    }

    /// SIGTERM, and panic unless it exits with status 0 within [`TERM_DEADLINE`].
    #[track_caller]
    pub fn stop_gracefully(&mut self) {
        let started = Instant::now();
        match self.terminate(TERM_DEADLINE) {
            Some(s) => assert!(s.success(), "{} exited with {s} after SIGTERM (log {})", self.name, self.log.display()),
            None => {
                panic!("{} did not exit within {TERM_DEADLINE:?} of SIGTERM (log {})", self.name, self.log.display())
            }
        }
        eprintln!("[lab] {} stopped gracefully in {:?}", self.name, started.elapsed());
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(10));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() && self.terminate(Duration::from_secs(5)).is_none() {
            eprintln!("[lab] {} needed SIGKILL at cleanup", self.name);
        }
    }
}

/// Where a host's agent keeps its files and which ports it uses (fixed per lab, so
/// restarts keep the same addresses and NBD URIs).
#[derive(Debug, Clone)]
pub struct HostSlot {
    pub dir: PathBuf,
    pub listen_port: u16,
    pub nbd_port: u16,
}

/// One test's world: temp dir, ports, the provider's data dir, vault key, operator certs.
pub struct Lab {
    tmp: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub provider_dir: PathBuf,
    pub provider_port: u16,
    pub vault_key: PathBuf,
    pub opdir: PathBuf,
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
            vault_key: root.join("vault.key"),
            opdir: root.join("op"),
            root,
            tmp: Some(tmp),
            hosts: Mutex::new(HashMap::new()),
            seq: AtomicUsize::new(0),
            logs: Mutex::new(Vec::new()),
            transcript,
        };
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
        let n = self.next();
        let out_path = self.root.join(format!("cmd{n}.out"));
        let err_path = self.root.join(format!("cmd{n}.err"));
        let line = format!("{cmd:?}");
        let out_f = File::create(&out_path).expect("create stdout file");
        let err_f = File::create(&err_path).expect("create stderr file");
        cmd.stdin(Stdio::null()).stdout(out_f).stderr(err_f);
        cmd.env_remove("SITERECOVERY_CONNECT").env_remove("SITERECOVERY_CERTS");
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
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        let err = stderr(&out);
        let err_tail: Vec<&str> = err.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
        self.note(&format!(
            "$ {line}\n  -> {status} in {:?}{}",
            started.elapsed(),
            if err_tail.is_empty() { String::new() } else { format!("\n  stderr: {}", err_tail.join("\n          ")) }
        ));
        out
    }

    /// Runs with [`COMMAND_TIMEOUT`].
    pub fn run(&self, cmd: &mut Command) -> Output {
        self.run_timeout(cmd, COMMAND_TIMEOUT)
    }

    /// Starts a long-running process with stdout and stderr appended to `<root>/<name>.log`.
    pub fn spawn(&self, name: &str, cmd: &mut Command) -> Proc {
        let log = self.root.join(format!("{name}.log"));
        let mut f = OpenOptions::new().create(true).append(true).open(&log).expect("open log");
        let _ = writeln!(f, "===== [lab] start at {} ms: {cmd:?}", unix_now_ms());
        let f2 = f.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(f).stderr(f2);
        cmd.env_remove("SITERECOVERY_CONNECT").env_remove("SITERECOVERY_CERTS");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        if let Ok(mut logs) = self.logs.lock()
            && !logs.contains(&log)
        {
            logs.push(log.clone());
        }
        self.note(&format!("& [{name} pid {}] {cmd:?}", child.id()));
        Proc { name: name.to_owned(), log, child, status: None }
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
    pub fn start_provider_with(&self, extra: &[&str]) -> Proc {
        let mut p = self.spawn(
            "provider",
            Command::new(bin("provider"))
                .args(["serve", "--data-dir"])
                .arg(&self.provider_dir)
                .args(["--listen", &self.addr(), "--grace", "5s"])
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
            .or_insert_with(|| HostSlot { dir: self.root.join(name), listen_port: free_port(), nbd_port: free_port() })
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
    pub fn start_agent_with(&self, name: &str, dir: &Path, extra: &[&str]) -> Proc {
        let slot = self.host_slot(name);
        let nbd = format!("127.0.0.1:{}", slot.nbd_port);
        self.spawn(
            &format!("agent-{name}"),
            Command::new(bin("agent"))
                .arg("--data-dir")
                .arg(dir)
                .args(["serve", "--heartbeat", HEARTBEAT, "--nbd-listen", &nbd])
                .args(extra),
        )
    }

    /// Operator CLI: `provider --connect ADDR --certs OPDIR ARGS`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.addr(), &self.opdir, args)
    }

    /// Operator CLI against any address with any certs dir.
    pub fn cli_as(&self, addr: &str, certs: &Path, args: &[&str]) -> Output {
        self.run(Command::new(bin("provider")).args(["--connect", addr]).arg("--certs").arg(certs).args(args))
    }

    /// Operator CLI with `--json`; panics unless it succeeds and prints JSON.
    #[track_caller]
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.cli(&a);
        assert_ok(&o, &format!("provider {}", args.join(" ")));
        serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("provider {} printed no JSON ({e}): {}", args.join(" "), describe(&o)))
    }

    /// `host list --json` as an array (empty when the CLI fails, e.g. while restarting).
    pub fn hosts(&self) -> Vec<Value> {
        let o = self.cli(&["--json", "host", "list"]);
        if !o.status.success() {
            return Vec::new();
        }
        serde_json::from_slice::<Value>(&o.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
    }

    /// Host `name` from `host list --json`.
    pub fn host(&self, name: &str) -> Option<Value> {
        self.hosts().into_iter().find(|h| h["name"] == name)
    }

    /// Waits until `pred` holds for host `name` in `host list --json`; panics after `timeout`.
    #[track_caller]
    pub fn wait_host(&self, name: &str, what: &str, timeout: Duration, mut pred: impl FnMut(&Value) -> bool) -> Value {
        let mut last = None;
        let ok = wait_until(timeout, || {
            last = self.host(name);
            last.as_ref().is_some_and(&mut pred)
        });
        if !ok {
            self.dump_logs();
            panic!("host {name}: {what} not seen within {timeout:?}; last seen: {last:?}");
        }
        last.unwrap_or_default()
    }

    /// Waits until host `name` shows as connected.
    #[track_caller]
    pub fn wait_host_connected(&self, name: &str) -> Value {
        self.wait_host(name, "connected", Duration::from_secs(30), |h| h["connected"] == true)
    }

    /// Waits until host `name` is connected with a heartbeat at or after `since_ms`.
    #[track_caller]
    pub fn wait_host_heartbeat_since(&self, name: &str, since_ms: i64) -> Value {
        self.wait_host(name, &format!("connected with a heartbeat after {since_ms}"), Duration::from_secs(30), |h| {
            h["connected"] == true && h["last_heartbeat_unix_ms"].as_i64().is_some_and(|t| t >= since_ms)
        })
    }

    /// `--cacert/--cert/--key` of the lab's operator certs, for grpcurl.
    pub fn op_tls(&self) -> Vec<String> {
        tls_args(&self.opdir.join("ca.pem"), Some((&self.opdir.join("op.pem"), &self.opdir.join("op.key"))))
    }

    /// `grpcurl -connect-timeout 2 ARGS` (the real grpcurl, from PATH).
    pub fn grpcurl(&self, args: &[String]) -> Output {
        self.run(Command::new("grpcurl").args(["-connect-timeout", "2"]).args(args))
    }

    /// `qemu-io ARGS`.
    pub fn qemu_io(&self, args: &[&str]) -> Output {
        self.run(Command::new("qemu-io").args(args))
    }

    /// `qemu-img ARGS`.
    pub fn qemu_img(&self, args: &[&str]) -> Output {
        self.run(Command::new("qemu-img").args(args))
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

/// grpcurl TLS flags: `-cacert CA [-cert C -key K]`.
pub fn tls_args(ca: &Path, client: Option<(&Path, &Path)>) -> Vec<String> {
    let mut v = vec!["-cacert".to_owned(), ca.display().to_string()];
    if let Some((c, k)) = client {
        v.extend(["-cert".to_owned(), c.display().to_string(), "-key".to_owned(), k.display().to_string()]);
    }
    v
}

/// Strings from `&str`s (for grpcurl argument lists).
pub fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}
