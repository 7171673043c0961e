//! Files the tests make or look for: executable scripts for the hooks and plans, files
//! by suffix, and a snapshot of a whole tree (to show that a refused request created,
//! changed or removed nothing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every file under `dir` (recursively) whose name ends with `suffix`.
pub fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p);
            } else if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(suffix)) {
                out.push(p);
            }
        }
    }
    out
}

/// Writes an executable (0755) script.
pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// What a tree holds, entry by entry: path relative to the root → `dir`, `link` or
/// `file`. Entries, not contents: a refused request must not create or remove
/// anything, while the running processes rewrite their state files in place.
pub type Tree = BTreeMap<String, String>;

/// Snapshot of every entry under `root` whose name `keep` accepts (a missing root is
/// an empty tree). Entries are not followed through links.
pub fn snapshot(root: &Path, keep: impl Fn(&str) -> bool) -> Tree {
    let mut out = Tree::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep(&name) {
                continue;
            }
            let rel = p.strip_prefix(root).unwrap_or(&p).display().to_string();
            let Ok(t) = e.file_type() else { continue };
            let what = if t.is_dir() {
                todo.push(p);
                "dir".to_owned()
            } else if t.is_symlink() {
                "link".to_owned()
            } else {
                "file".to_owned()
            };
            out.insert(rel, what);
        }
    }
    out
}

/// The differences between two snapshots, one line each (`+ path what`, `- path what`,
/// `~ path before -> after`); empty when they are the same.
pub fn tree_diff(before: &Tree, after: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (p, a) in after {
        match before.get(p) {
            None => out.push(format!("+ {p} {a}")),
            Some(b) if b != a => out.push(format!("~ {p} {b} -> {a}")),
            Some(_) => {}
        }
    }
    for (p, b) in before {
        if !after.contains_key(p) {
            out.push(format!("- {p} {b}"));
        }
    }
    out
}
