//! The initramfs format: a `newc` cpio archive (what the kernel unpacks), with the
//! directories every file needs.

use std::collections::{BTreeMap, BTreeSet};

fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let namesize = name.len() + 1;
    let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, namesize as u32, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// An archive of regular files (path without leading '/' → (permission bits, content)).
pub fn newc(files: &BTreeMap<String, (u32, Vec<u8>)>) -> Vec<u8> {
    let mut dirs = BTreeSet::new();
    for path in files.keys() {
        let mut p = path.as_str();
        while let Some((parent, _)) = p.rsplit_once('/') {
            dirs.insert(parent.to_owned());
            p = parent;
        }
    }
    let mut out = Vec::new();
    let mut ino = 1;
    for d in &dirs {
        entry(&mut out, ino, d, 0o040755, &[]);
        ino += 1;
    }
    for (path, (perm, data)) in files {
        entry(&mut out, ino, path, 0o100000 | perm, data);
        ino += 1;
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}
