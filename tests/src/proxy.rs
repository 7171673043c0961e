//! [`FaultProxy`]: a loopback TCP proxy that a test puts between two processes (the
//! primary agent and the replica agent's peer port, or an agent and the provider) to
//! inject network faults: [`FaultProxy::cut`] closes every connection and refuses new
//! ones, [`FaultProxy::stall`] stops forwarding bytes (connections stay open),
//! [`FaultProxy::throttle`] limits the rate, [`FaultProxy::reset`] ends the open
//! connections with a TCP RST (new ones are accepted), and [`FaultProxy::heal`] goes
//! back to forwarding everything.
//!
//! Plain threads: one accepting, two per connection (one per direction). Every loop
//! checks the proxy's stop flag; dropping the proxy stops and joins the acceptor, and
//! the forwarding threads end within a read timeout.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};

/// How long a forwarding thread blocks in `read` before it looks at the controls again.
const TICK: Duration = Duration::from_millis(50);
/// Largest read per forwarded chunk.
const CHUNK: usize = 64 << 10;

/// What the proxy does with traffic now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything (at the throttle rate, if one is set).
    Pass,
    /// Forward nothing; connections stay open, new ones are accepted and stall too.
    Stall,
    /// Every connection closed; new ones are closed as soon as accepted.
    Cut,
}

struct Shared {
    mode: Mutex<Mode>,
    /// Bytes per second; 0 = unlimited.
    rate: AtomicU64,
    stop: AtomicBool,
    /// Open connections (both sides), to close or reset them.
    conns: Mutex<Vec<(TcpStream, TcpStream)>>,
    /// Bumped by [`FaultProxy::reset`] / [`FaultProxy::cut`]: a forwarding thread of an
    /// older epoch ends.
    epoch: AtomicU64,
    forwarded: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl Shared {
    fn mode(&self) -> Mode {
        self.mode.lock().map(|m| *m).unwrap_or(Mode::Pass)
    }
}

/// A proxy from `listen` to `target` on loopback; see the module documentation.
pub struct FaultProxy {
    pub listen: u16,
    pub target: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Binds `127.0.0.1:listen` and forwards every connection to `127.0.0.1:target`.
    pub fn start(listen: u16, target: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", listen))
            .unwrap_or_else(|e| panic!("proxy cannot bind 127.0.0.1:{listen}: {e}"));
        listener.set_nonblocking(true).expect("non-blocking listener");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            rate: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            epoch: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let s = shared.clone();
        let acceptor = std::thread::spawn(move || accept_loop(listener, target, s));
        Self { listen, target, shared, acceptor: Some(acceptor) }
    }

    /// Closes every connection and refuses new ones until [`Self::heal`].
    pub fn cut(&self) {
        self.set_mode(Mode::Cut);
        self.close_all(false);
    }

    /// Stops forwarding bytes (connections stay open) until [`Self::heal`].
    pub fn stall(&self) {
        self.set_mode(Mode::Stall);
    }

    /// Limits forwarding to `bytes_per_sec` in each direction of each connection (0:
    /// unlimited).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Ends every open connection with a TCP RST; new connections are accepted.
    pub fn reset(&self) {
        self.close_all(true);
    }

    /// Forwards everything again, unthrottled.
    pub fn heal(&self) {
        self.throttle(0);
        self.set_mode(Mode::Pass);
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Bytes forwarded so far (both directions).
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Connections accepted and forwarded, and connections refused while cut.
    pub fn connections(&self) -> (u64, u64) {
        (self.shared.accepted.load(Ordering::SeqCst), self.shared.refused.load(Ordering::SeqCst))
    }

    fn set_mode(&self, m: Mode) {
        if let Ok(mut g) = self.shared.mode.lock() {
            *g = m;
        }
    }

    fn close_all(&self, rst: bool) {
        self.shared.epoch.fetch_add(1, Ordering::SeqCst);
        let conns = self.shared.conns.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default();
        for (a, b) in conns {
            for s in [a, b] {
                if rst {
                    // Linger 0: close() sends RST instead of FIN.
                    let _ = setsockopt(&s, sockopt::Linger, &nix::libc::linger { l_onoff: 1, l_linger: 0 });
                    drop(s);
                } else {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.close_all(false);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: u16, s: Arc<Shared>) {
    while !s.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Polling the non-blocking listener (it must notice the stop flag).
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => continue,
        };
        if s.mode() == Mode::Cut {
            s.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let _ = client.set_nonblocking(false);
        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        s.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let epoch = s.epoch.load(Ordering::SeqCst);
        let pairs = [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())];
        if let Ok(mut conns) = s.conns.lock() {
            conns.push((client, server));
        }
        for (from, to) in pairs {
            let (Ok(from), Ok(to)) = (from, to) else { continue };
            let s = s.clone();
            std::thread::spawn(move || pump(from, to, epoch, &s));
        }
    }
}

/// Copies `from` to `to` until either side closes, the proxy stops, or a cut/reset of a
/// later epoch ends this connection.
fn pump(mut from: TcpStream, mut to: TcpStream, epoch: u64, s: &Shared) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; CHUNK];
    let alive = || !s.stop.load(Ordering::SeqCst) && s.epoch.load(Ordering::SeqCst) == epoch;
    while alive() {
        if s.mode() != Mode::Pass {
            // Stalled: hold the bytes in the kernel buffers (a pacing delay).
            std::thread::sleep(TICK);
            continue;
        }
        let rate = s.rate.load(Ordering::SeqCst);
        let want = if rate == 0 { CHUNK } else { (rate / 20).clamp(1, CHUNK as u64) as usize };
        let n = match from.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue;
            }
            Err(_) => break,
        };
        if !alive() || to.write_all(&buf[..n]).is_err() {
            break;
        }
        s.forwarded.fetch_add(n as u64, Ordering::SeqCst);
        if let Some(us) = (n as u64 * 1_000_000).checked_div(rate) {
            // Throttling: the time these bytes take at `rate`.
            std::thread::sleep(Duration::from_micros(us));
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
