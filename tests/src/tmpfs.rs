//! [`Tmpfs`]: a size-limited file system a test mounts itself (it runs as root), to fill
//! a host's data dir for real: `mount -t tmpfs -o size=N tmpfs DIR`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted on a directory; lazily unmounted when dropped (so also while a
/// process still has files open on it, and whatever the drop order of the test's parts).
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"64m"`) on `dir` (created if missing). Panics,
    /// failing the test, when it cannot: the scenario needs a real full file system.
    #[track_caller]
    pub fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mount point");
        let opts = format!("size={size},mode=0700");
        let o = Command::new("mount").args(["-t", "tmpfs", "-o", &opts, "tmpfs"]).arg(dir).output();
        match o {
            Ok(o) if o.status.success() => Tmpfs { dir: dir.to_owned() },
            Ok(o) => panic!(
                "cannot mount a {size} tmpfs on {} (the test must run as root): {}",
                dir.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("cannot run mount for a {size} tmpfs on {}: {e}", dir.display()),
        }
    }

    /// Bytes free on the file system.
    pub fn free(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.dir).map_or(0, |s| s.blocks_available() * s.fragment_size())
    }

    /// Fills the file system with `path` (on it) until at most `leave` bytes stay free.
    #[track_caller]
    pub fn fill(&self, path: &Path, leave: u64) {
        let have = std::fs::metadata(path).map_or(0, |m| m.len());
        let add = self.free().saturating_sub(leave);
        let f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("filler file");
        let chunk = vec![0xeeu8; 1 << 20];
        let mut left = add;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            std::io::Write::write_all(&mut &f, &chunk[..n]).expect("fill");
            left -= n as u64;
        }
        f.sync_all().expect("sync filler");
        assert!(std::fs::metadata(path).map_or(0, |m| m.len()) >= have);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}
