//! A small synchronous QMP client (QEMU Machine Protocol: JSON lines on a unix socket).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("not QMP: {0}")]
    Protocol(String),
    #[error("QMP {command} failed: {error}")]
    Command { command: String, error: String },
}

/// One QMP connection, capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(QmpError::Connect)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut q = Qmp { reader: BufReader::new(stream), writer };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("greeting {greeting}")));
        }
        q.execute("qmp_capabilities")?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(line.trim()).map_err(|e| QmpError::Protocol(format!("{e}: {line:?}")))
    }

    /// Runs a command without arguments and returns its `return` value (events read
    /// meanwhile are skipped).
    pub fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command }).to_string();
        msg.push('\n');
        self.writer.write_all(msg.as_bytes())?;
        // Bounded: every read waits at most the socket timeout; a QEMU sending events
        // forever would be cut by the command's deadline.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let m = self.read_message()?;
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command { command: command.into(), error: e.to_string() });
            }
        }
        Err(QmpError::Protocol(format!("no answer to {command}")))
    }

    /// Waits until QEMU closes the connection (it exited) or `timeout` passes; true
    /// when it closed.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if self.reader.get_ref().set_read_timeout(Some(left.min(Duration::from_secs(1)))).is_err() {
                return false;
            }
            match self.read_message() {
                Err(QmpError::Closed) => return true,
                Err(QmpError::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(QmpError::Io(_)) => return true,
                _ => {}
            }
        }
    }
}
