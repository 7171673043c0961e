//! Transmission: the reader, the operations on the blocking pool and the reply writer
//! of one connection, with its slot and byte budget (see the module doc of `nbd`).

use super::*;

/// Slots and bytes held by one request until its reply is written.
pub(super) struct Budget {
    pub(super) _slot: OwnedSemaphorePermit,
    pub(super) _bytes: Option<OwnedSemaphorePermit>,
}

pub(super) struct Budgets {
    pub(super) slots: Arc<Semaphore>,
    pub(super) bytes: Arc<Semaphore>,
}

/// One reply on its way to the writer.
pub(super) struct Reply {
    pub(super) cookie: u64,
    /// NBD errno; 0 for success.
    pub(super) error: u32,
    /// Read data on success; goes back to the pool once written.
    pub(super) data: Option<Vec<u8>>,
    /// `Some(offset)` for a read on a connection with structured replies.
    pub(super) structured_read: Option<u64>,
    pub(super) _budget: Budget,
}

/// Payload buffers of one connection, reused so steady-state I/O does not allocate.
#[derive(Default)]
pub(super) struct BufPool {
    pub(super) bufs: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// A buffer of exactly `len` bytes (contents unspecified: callers overwrite it).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self.bufs.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        } else {
            buf.truncate(len);
        }
        buf
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() > POOL_MAX_BUFFER {
            return;
        }
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        if bufs.len() < POOL_BUFFERS {
            bufs.push(buf);
        }
    }
}

/// The transmission phase: the reader runs here, the writer in its own task.
pub(super) async fn transmission<R, W>(
    mut reader: BufReader<R>,
    writer: W,
    session: Session,
    shutdown: CancellationToken,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Cancelled by the shutdown tree, or by the writer when the client stops taking
    // replies, so the reader stops too.
    let stop = shutdown.child_token();
    let pool = Arc::new(BufPool::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(writer, rx, pool.clone(), stop.clone()));
    let limits = Budgets {
        slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        bytes: Arc::new(Semaphore::new(session.request_bytes / BUDGET_UNIT)),
    };
    let result = read_requests(&mut reader, &tx, &session, &pool, &limits, &stop).await;
    drop(tx);
    let written = writer.await;
    result?;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(join) => Err(io::Error::other(join).into()),
    }
}

/// Waits for a budget, or `None` when the connection is stopping.
pub(super) async fn acquire(limits: &Budgets, bytes: Option<u32>, stop: &CancellationToken) -> Option<Budget> {
    let slot = tokio::select! {
        _ = stop.cancelled() => return None,
        p = limits.slots.clone().acquire_owned() => p.ok()?,
    };
    let bytes = match bytes {
        Some(n) => {
            let units = (n as usize).div_ceil(BUDGET_UNIT).max(1) as u32;
            tokio::select! {
                _ = stop.cancelled() => return None,
                p = limits.bytes.clone().acquire_many_owned(units) => Some(p.ok()?),
            }
        }
        None => None,
    };
    Some(Budget { _slot: slot, _bytes: bytes })
}

/// Runs a device call, turning a panic in the device into `NBD_EIO` so the client
/// still gets a reply for its cookie.
/// Counted in the export's [`super::stats`] (`bytes` of payload, the device call's time).
pub(super) fn run_op(
    export: &Export,
    kind: Op,
    bytes: u64,
    op: impl FnOnce(&dyn BlockDevice) -> Result<(), DiskError>,
) -> u32 {
    let started = std::time::Instant::now();
    let error = run_device(export, !matches!(kind, Op::Read | Op::Trim), op);
    export.stats.record(kind, bytes, started.elapsed(), error != 0);
    error
}

fn run_device(export: &Export, write: bool, op: impl FnOnce(&dyn BlockDevice) -> Result<(), DiskError>) -> u32 {
    // Re-checked here: the export may have been removed while the request queued.
    if export.is_closed() {
        return ESHUTDOWN;
    }
    let dev = &*export.dev;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(dev))) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            if matches!(e, DiskError::Io(_) | DiskError::NoSpace(_)) {
                tracing::warn!("nbd: device error: {e:#}");
            }
            errno_of(&e, write)
        }
        Err(_) => {
            tracing::error!("nbd: device operation panicked");
            EIO
        }
    }
}

pub(super) async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    tx: &mpsc::UnboundedSender<Reply>,
    session: &Session,
    pool: &Arc<BufPool>,
    limits: &Budgets,
    stop: &CancellationToken,
) -> Result<(), NbdError> {
    let mut header = [0u8; REQUEST_LEN];
    let size = session.export.dev.size();
    let read_only = session.export.dev.read_only();
    loop {
        let got = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            r = reader.read_exact(&mut header) => r,
        };
        match got {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = parse_request(&header)?;
        let structured_read = (session.structured && req.cmd == CMD_READ).then_some(req.offset);
        let plan = plan(&req, size, read_only, session.export.is_closed());
        let reply = move |error: u32, budget: Budget| Reply {
            cookie: req.cookie,
            error,
            data: None,
            structured_read,
            _budget: budget,
        };

        let (budget, payload_bytes) = match plan {
            Plan::Disconnect => return Ok(()),
            Plan::Read { len, .. } | Plan::Write { len, .. } => {
                let Some(b) = acquire(limits, Some(len), stop).await else {
                    return Ok(());
                };
                (b, len)
            }
            _ => {
                let Some(b) = acquire(limits, None, stop).await else {
                    return Ok(());
                };
                (b, 0)
            }
        };
        let export = session.export.clone();
        let tx2 = tx.clone();
        match plan {
            Plan::Disconnect => return Ok(()),
            Plan::Reject { errno, discard: n } => {
                if n > 0 {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        r = discard(reader, u64::from(n)) => r?,
                    }
                }
                let _ = tx.send(reply(errno, budget));
            }
            Plan::RejectAndClose { errno } => {
                let _ = tx.send(reply(errno, budget));
                return Err(NbdError::PayloadTooLarge(req.len));
            }
            Plan::Read { offset, .. } => {
                let mut buf = pool.take(payload_bytes as usize);
                let pool = pool.clone();
                tokio::task::spawn_blocking(move || {
                    let error = run_op(&export, Op::Read, u64::from(payload_bytes), |d| d.read_at(&mut buf, offset));
                    let data = if error == 0 {
                        Some(buf)
                    } else {
                        pool.put(buf);
                        None
                    };
                    let _ = tx2.send(Reply { cookie: req.cookie, error, data, structured_read, _budget: budget });
                });
            }
            Plan::Write { offset, fua, .. } => {
                let mut buf = pool.take(payload_bytes as usize);
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    r = reader.read_exact(&mut buf) => { r?; }
                }
                let pool = pool.clone();
                tokio::task::spawn_blocking(move || {
                    let error = run_op(&export, Op::Write, u64::from(payload_bytes), |d| d.write_at(&buf, offset, fua));
                    pool.put(buf);
                    let _ = tx2.send(reply(error, budget));
                });
            }
            Plan::Flush => {
                tokio::task::spawn_blocking(move || {
                    let error = run_op(&export, Op::Flush, 0, |d| d.flush());
                    let _ = tx2.send(reply(error, budget));
                });
            }
            Plan::Trim { offset, len, fua } => {
                tokio::task::spawn_blocking(move || {
                    let error = run_op(&export, Op::Trim, u64::from(len), |d| {
                        d.trim(offset, u64::from(len))?;
                        if fua { d.flush() } else { Ok(()) }
                    });
                    let _ = tx2.send(reply(error, budget));
                });
            }
            Plan::Zeroes { offset, len, fua, no_hole } => {
                tokio::task::spawn_blocking(move || {
                    let error = run_op(&export, Op::WriteZeroes, u64::from(len), |d| {
                        d.write_zeroes(offset, u64::from(len), fua, no_hole)
                    });
                    let _ = tx2.send(reply(error, budget));
                });
            }
        }
    }
}

/// Appends the header of `reply` to `out`; returns the payload to send after it.
pub(super) fn encode_reply<'a>(out: &mut Vec<u8>, reply: &'a Reply) -> &'a [u8] {
    let payload: &[u8] = match (&reply.data, reply.error) {
        (Some(data), 0) => data,
        _ => &[],
    };
    match reply.structured_read {
        None => {
            out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&reply.error.to_be_bytes());
            out.extend_from_slice(&reply.cookie.to_be_bytes());
            payload
        }
        Some(offset) => {
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
            if reply.error != 0 {
                out.extend_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
                out.extend_from_slice(&reply.cookie.to_be_bytes());
                out.extend_from_slice(&6u32.to_be_bytes());
                out.extend_from_slice(&reply.error.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes()); // no message
                &[]
            } else if payload.is_empty() {
                // OFFSET_DATA chunks must carry data; a zero-length read just ends.
                out.extend_from_slice(&REPLY_TYPE_NONE.to_be_bytes());
                out.extend_from_slice(&reply.cookie.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes());
                &[]
            } else {
                out.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
                out.extend_from_slice(&reply.cookie.to_be_bytes());
                out.extend_from_slice(&(8 + payload.len() as u32).to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                payload
            }
        }
    }
}

/// Writes `a` then `b` with vectored writes, without copying `b`.
pub(super) async fn write_all_2<W: AsyncWrite + Unpin>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b).await?
        } else {
            w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n >= a.len() {
            b = b.get(n - a.len()..).unwrap_or_default();
            a = &[];
        } else {
            a = a.get(n..).unwrap_or_default();
        }
    }
    Ok(())
}

/// The writer: encodes replies in completion order, flushes when none is waiting.
/// On a write error or `stop` it stops writing but keeps receiving until every
/// in-flight operation has finished, so none outlives the connection.
pub(super) async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    pool: Arc<BufPool>,
    stop: CancellationToken,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(WRITE_BUF + COPY_PAYLOAD_BELOW + 64);
    let mut result = Ok(());
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = stop.cancelled() => break,
        };
        let Some(first) = first else { break };
        let batch = async {
            let mut next = Some(first);
            while let Some(mut reply) = next {
                let payload = encode_reply(&mut out, &reply);
                if payload.len() < COPY_PAYLOAD_BELOW {
                    out.extend_from_slice(payload);
                } else {
                    write_all_2(&mut w, &out, payload).await?;
                    out.clear();
                }
                if out.len() >= WRITE_BUF {
                    w.write_all(&out).await?;
                    out.clear();
                }
                if let Some(data) = reply.data.take() {
                    pool.put(data);
                }
                // Dropping the reply releases its budget: the reader may go on.
                drop(reply);
                next = rx.try_recv().ok();
            }
            if !out.is_empty() {
                w.write_all(&out).await?;
                out.clear();
            }
            w.flush().await
        };
        let written = tokio::select! {
            r = batch => r,
            _ = stop.cancelled() => break,
        };
        if let Err(e) = written {
            result = Err(e);
            stop.cancel();
            break;
        }
    }
    // Wait for the reader to stop and for operations still running on the device.
    while rx.recv().await.is_some() {}
    let _ = w.shutdown().await;
    result
}
