//! The processes a test starts: where the workspace's binaries are, free loopback
//! ports, and [`Proc`], a child process stopped by its PID (SIGTERM, then SIGKILL after
//! a deadline) when dropped. Nothing here stops a process the test did not start.
//!
//! The binaries are the ones `cargo build --workspace --bins` puts beside the test
//! executable's `deps/` folder; the tests never invoke cargo themselves.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::wait::wait_until_every;

/// How long a process gets to exit after SIGTERM.
pub const TERM_DEADLINE: Duration = Duration::from_secs(15);

/// The directory holding the workspace's binaries: the test executable is
/// `target/<profile>/deps/<test>-<hash>`, the binaries are in `target/<profile>/`.
pub fn bin_dir() -> PathBuf {
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

/// A process started by a test; stopped by PID when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Wraps a child the test spawned, its output going to `log`.
    pub fn new(name: &str, log: PathBuf, child: Child) -> Self {
        Self { name: name.to_owned(), log, child, status: None }
    }

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
        wait_until_every(timeout, Duration::from_millis(20), || self.try_wait().is_some());
        self.try_wait()
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
