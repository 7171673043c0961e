//! The decision on one transmission request, before any I/O: a pure function so every
//! rule (range, size, flags, read-only, closed) is unit- and property-tested.

use super::*;

/// What to do with one request, decided before any I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u32,
        fua: bool,
        /// `NO_HOLE`: the range must stay allocated (no hole punched).
        no_hole: bool,
    },
    Disconnect,
    /// Reply with `errno` after draining `discard` payload bytes.
    Reject {
        errno: u32,
        discard: u32,
    },
    /// Reply with `errno`, then close: the payload cannot be trusted or afforded.
    RejectAndClose {
        errno: u32,
    },
}

/// Validates a request against the export; a pure function so every rule is unit- and
/// property-tested without sockets.
pub(super) fn plan(req: &Request, size: u64, read_only: bool, closed: bool) -> Plan {
    let payload = if req.cmd == CMD_WRITE { req.len } else { 0 };
    if payload > MAX_PAYLOAD {
        return Plan::RejectAndClose { errno: EINVAL };
    }
    let reject = |errno| Plan::Reject { errno, discard: payload };
    let known_flags = match req.cmd {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_FLUSH | CMD_DISC => 0,
        _ => return reject(EINVAL),
    };
    if req.flags & !known_flags != 0 {
        return reject(EINVAL);
    }
    if req.cmd == CMD_DISC {
        return Plan::Disconnect;
    }
    if closed {
        return reject(ESHUTDOWN);
    }
    let in_range = req.offset.checked_add(u64::from(req.len)).is_some_and(|end| end <= size);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.len);
    match req.cmd {
        CMD_READ if len > MAX_PAYLOAD || !in_range => reject(EINVAL),
        CMD_READ => Plan::Read { offset, len },
        CMD_FLUSH => Plan::Flush,
        _ if read_only => reject(EPERM),
        CMD_WRITE if !in_range => reject(ENOSPC),
        CMD_WRITE => Plan::Write { offset, len, fua },
        CMD_TRIM if !in_range => reject(EINVAL),
        CMD_TRIM => Plan::Trim { offset, len, fua },
        CMD_WRITE_ZEROES if !in_range => reject(ENOSPC),
        _ => Plan::Zeroes { offset, len, fua, no_hole: req.flags & CMD_FLAG_NO_HOLE != 0 },
    }
}

/// The NBD errno for a device error; `write` selects `ENOSPC` for an out-of-range
/// write as the protocol asks.
pub(super) fn errno_of(e: &DiskError, write: bool) -> u32 {
    match e {
        DiskError::OutOfRange { .. } if write => ENOSPC,
        DiskError::OutOfRange { .. } => EINVAL,
        DiskError::ReadOnly => EPERM,
        DiskError::Stopped => ESHUTDOWN,
        DiskError::NoSpace(_) => ENOSPC,
        DiskError::Io(_) => EIO,
    }
}
