//! How the agent makes its files and directories, in one place.
//!
//! * Data files (VM images, overlays, HRL logs, replica images, spools, undo records,
//!   state files through `persist`) are created **0600** and never through a
//!   symlink (`O_NOFOLLOW`; new files with `O_EXCL`). An existing data file opened for
//!   writing with a wider mode (an older agent's) is narrowed to 0600.
//! * Data directories are **0700**, forced at start even when they already exist
//!   ([`private_dir`]).
//! * The NBD sockets: a VM's `nbd.sock` is **0660**, in the hypervisor's group when the
//!   agent runs with `--nbd-group GROUP` ([`SocketAccess`]); the directories that lead
//!   to it (the data dir, `vms/`, `vms/<vm>/`) are then **0710** in that group: the
//!   group may traverse them to reach the socket, not list or read them.
//! * Offline exports ([`create_export`], [`link_new`]) never overwrite anything and never
//!   follow a symlink.
//!
//! No file is 0640: QEMU reaches a disk only through the agent's NBD export (every
//! write must pass the tracker), never by opening an image, a log or a state file, so
//! the group needs the sockets and the way to them, nothing else.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every data file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every data directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of a directory on the way to the NBD sockets when a group may reach them.
pub const SOCKET_DIR_MODE: u32 = 0o710;
/// Mode of an NBD unix socket.
pub const SOCKET_MODE: u32 = 0o660;

fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE).custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC);
    o
}

/// Creates a new data file for reading and writing (0600); fails when anything, a
/// symlink included, is at `path`.
pub fn create_new(path: &Path) -> io::Result<File> {
    let f = options().read(true).write(true).create_new(true).open(path)?;
    exact_mode(&f, FILE_MODE)?;
    Ok(f)
}

/// Creates or truncates a data file for writing (0600), never through a symlink.
pub fn create_or_truncate(path: &Path) -> io::Result<File> {
    let f = options().write(true).create(true).truncate(true).open(path)?;
    exact_mode(&f, FILE_MODE)?;
    Ok(f)
}

/// Opens a data file for reading and writing, creating it (0600) when missing, never
/// through a symlink.
pub fn open_or_create(path: &Path) -> io::Result<File> {
    let f = options().read(true).write(true).create(true).truncate(false).open(path)?;
    narrow(&f, path);
    Ok(f)
}

/// Opens an existing data file (for writing too when `write`), never through a
/// symlink; a writable one with a mode wider than 0600 is narrowed.
pub fn open_existing(path: &Path, write: bool) -> io::Result<File> {
    let f = options().read(true).write(write).open(path)?;
    if write {
        narrow(&f, path);
    }
    Ok(f)
}

/// Sets the mode exactly (the umask may have narrowed it, an old file widened it).
fn exact_mode(f: &File, mode: u32) -> io::Result<()> {
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Takes group and other bits off a data file of an older agent; a failure (a file
/// of another owner) is logged, not fatal: the data dir's own mode still guards it.
fn narrow(f: &File, path: &Path) {
    match f.metadata() {
        Ok(m) if m.mode() & 0o077 != 0 => {
            if let Err(e) = exact_mode(f, FILE_MODE) {
                tracing::warn!(file = %path.display(), "cannot narrow the mode to 0600: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(file = %path.display(), "cannot read the mode: {e}"),
    }
}

/// Creates `path` (and missing parents, 0700) and forces it to 0700 even when it
/// existed. A symlink at `path` is refused.
pub fn private_dir(path: &Path) -> io::Result<()> {
    dir_with(path, DIR_MODE, None)
}

fn dir_with(path: &Path, mode: u32, group: Option<u32>) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path)?;
    // Opened without following a symlink, then changed through the descriptor: what
    // is changed is what was checked.
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC)
        .open(path)?;
    if let Some(gid) = group {
        std::os::unix::fs::fchown(&d, None, Some(gid))?;
    }
    exact_mode(&d, mode)
}

/// Who besides the agent's user may reach the VMs' NBD sockets: nobody, or the members
/// of one group (`agent serve --nbd-group`, the hypervisor's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// The group's name (for messages) and id.
    pub group: Option<(String, u32)>,
}

/// `--nbd-group` names no group on this machine, or it cannot be looked up.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("--nbd-group {0:?}: no such group on this machine")]
    Unknown(String),
    #[error("--nbd-group {name:?}: cannot look the group up: {source}")]
    Lookup { name: String, source: nix::Error },
}

impl SocketAccess {
    /// The group `name`, resolved through the system's group database.
    pub fn for_group(name: &str) -> Result<Self, GroupError> {
        match nix::unistd::Group::from_name(name) {
            Ok(Some(g)) => Ok(Self { group: Some((name.to_owned(), g.gid.as_raw())) }),
            Ok(None) => Err(GroupError::Unknown(name.to_owned())),
            Err(source) => Err(GroupError::Lookup { name: name.to_owned(), source }),
        }
    }

    fn gid(&self) -> Option<u32> {
        self.group.as_ref().map(|(_, g)| *g)
    }

    /// A directory on the way to the sockets: 0700 without a group, else 0710 in the
    /// group (traverse only). Forced even when it existed; a symlink is refused.
    pub fn socket_dir(&self, path: &Path) -> io::Result<()> {
        match self.gid() {
            None => dir_with(path, DIR_MODE, None),
            Some(g) => dir_with(path, SOCKET_DIR_MODE, Some(g)),
        }
        .map_err(|e| self.explain(path, e))
    }

    /// A freshly bound NBD socket: 0660, in the group when there is one. (Until this
    /// runs the socket has the umask's mode, but its directory lets nobody else in.)
    pub fn socket(&self, path: &Path) -> io::Result<()> {
        if let Some(g) = self.gid() {
            std::os::unix::fs::lchown(path, None, Some(g)).map_err(|e| self.explain(path, e))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
    }

    fn explain(&self, path: &Path, e: io::Error) -> io::Error {
        match (&self.group, e.kind()) {
            (Some((name, _)), io::ErrorKind::PermissionDenied) => io::Error::new(
                e.kind(),
                format!("cannot give {} to group {name} (is the agent's user a member of it?): {e}", path.display()),
            ),
            _ => e,
        }
    }
}

/// Creates a file of an offline export (0600): refuses to overwrite anything or to
/// follow a symlink at `path`.
pub fn create_export(path: &Path) -> io::Result<File> {
    let f = options().write(true).create_new(true).open(path)?;
    exact_mode(&f, FILE_MODE)?;
    Ok(f)
}

/// Puts the finished temporary `tmp` in place at `target` without ever replacing an
/// existing `target` (a hard link fails when the name exists), then removes `tmp`.
pub fn link_new(tmp: &Path, target: &Path) -> io::Result<()> {
    let linked = std::fs::hard_link(tmp, target);
    let _ = std::fs::remove_file(tmp);
    linked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).expect("stat").mode() & 0o7777
    }

    #[test]
    fn files_are_0600_and_never_through_a_symlink() {
        let t = tempfile::tempdir().expect("tmp");
        let a = t.path().join("a");
        create_new(&a).expect("create");
        assert_eq!(mode(&a), 0o600);
        assert!(create_new(&a).is_err(), "an existing file is not created again");
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"keep").expect("victim");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).expect("symlink");
        assert!(create_new(&link).is_err());
        assert!(create_or_truncate(&link).is_err());
        assert!(open_or_create(&link).is_err());
        assert!(open_existing(&link, true).is_err());
        assert!(create_export(&link).is_err());
        assert_eq!(std::fs::read(&victim).expect("read"), b"keep", "nothing written through the link");
        // An older agent's 0644 file is narrowed when opened for writing.
        let old = t.path().join("old");
        std::fs::write(&old, b"x").expect("old");
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        open_existing(&old, true).expect("open");
        assert_eq!(mode(&old), 0o600);
        let u = t.path().join("undo");
        std::fs::write(&u, b"x").expect("u");
        std::fs::set_permissions(&u, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        create_or_truncate(&u).expect("truncate");
        assert_eq!(mode(&u), 0o600);
    }

    #[test]
    fn dirs_are_forced_to_0700_and_symlinks_refused() {
        let t = tempfile::tempdir().expect("tmp");
        let d = t.path().join("d");
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&d).expect("private");
        assert_eq!(mode(&d), 0o700, "an existing dir is narrowed");
        private_dir(&d.join("x/y")).expect("nested");
        assert_eq!(mode(&d.join("x")), 0o700);
        assert_eq!(mode(&d.join("x/y")), 0o700);
        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&elsewhere, &link).expect("symlink");
        assert!(private_dir(&link).is_err(), "a symlinked data dir is refused");
        assert_eq!(mode(&elsewhere), 0o755, "its target is left alone");
    }

    #[test]
    fn socket_dirs_let_the_group_traverse_only() {
        let t = tempfile::tempdir().expect("tmp");
        let gid = std::fs::metadata(t.path()).expect("stat").gid();
        let access = SocketAccess { group: Some(("g".into(), gid)) };
        let d = t.path().join("vms");
        access.socket_dir(&d).expect("dir");
        assert_eq!(mode(&d), 0o710);
        assert_eq!(std::fs::metadata(&d).expect("stat").gid(), gid);
        SocketAccess::default().socket_dir(&d).expect("without a group");
        assert_eq!(mode(&d), 0o700);
        let sock = d.join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        access.socket(&sock).expect("socket");
        assert_eq!(mode(&sock), 0o660);
    }

    #[test]
    fn unknown_groups_are_a_clear_error() {
        let e = SocketAccess::for_group("no-such-group-sr9").expect_err("unknown");
        assert!(e.to_string().contains("no such group"), "{e}");
        let root = SocketAccess::for_group("root").expect("root exists");
        assert_eq!(root.group, Some(("root".into(), 0)));
    }

    #[test]
    fn exports_never_overwrite() {
        let t = tempfile::tempdir().expect("tmp");
        let target = t.path().join("manifest.json");
        let tmp = t.path().join(".manifest.tmp");
        std::fs::write(&tmp, b"new").expect("tmp");
        link_new(&tmp, &target).expect("first");
        assert!(!tmp.exists());
        std::fs::write(&tmp, b"newer").expect("tmp");
        assert!(link_new(&tmp, &target).is_err(), "an existing manifest is not replaced");
        assert_eq!(std::fs::read(&target).expect("read"), b"new");
        assert!(create_export(&target).is_err());
    }
}
