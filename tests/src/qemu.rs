//! The real QEMU clients against the agents' NBD exports: `qemu-io` runs of write and
//! `read -P` commands (strict: a pattern that does not verify is a failure even when
//! qemu-io exits 0), and `qemu-img compare` of two images.

use std::process::{Command, Output};

use crate::lab::Lab;
use crate::output::{assert_ok, stderr, stdout};

impl Lab {
    /// `qemu-io ARGS`.
    pub fn qemu_io(&self, args: &[&str]) -> Output {
        self.run(Command::new("qemu-io").args(args))
    }

    /// `qemu-img ARGS`.
    pub fn qemu_img(&self, args: &[&str]) -> Output {
        self.run(Command::new("qemu-img").args(args))
    }

    /// `qemu-io -f raw [-r] -c CMD... URI`.
    pub fn qio<S: AsRef<str>>(&self, uri: &str, cmds: &[S], read_only: bool) -> Output {
        let mut args: Vec<&str> = vec!["-f", "raw"];
        if read_only {
            args.push("-r");
        }
        for c in cmds {
            args.extend(["-c", c.as_ref()]);
        }
        args.push(uri);
        self.qemu_io(&args)
    }

    /// True when every command succeeded: exit 0 and no "failed" (a failed write, or a
    /// pattern that does not verify; some qemu-io versions exit 0 on those).
    pub fn qio_passes<S: AsRef<str>>(&self, uri: &str, cmds: &[S], read_only: bool) -> bool {
        let o = self.qio(uri, cmds, read_only);
        o.status.success() && !stdout(&o).contains("failed") && !stderr(&o).contains("failed")
    }

    /// Runs the commands (read-write open) and panics unless every one succeeds.
    #[track_caller]
    pub fn qio_ok<S: AsRef<str>>(&self, uri: &str, cmds: &[S]) {
        let o = self.qio(uri, cmds, false);
        let cmds: Vec<&str> = cmds.iter().map(AsRef::as_ref).collect();
        assert_ok(&o, &format!("qemu-io {cmds:?} {uri}"));
        let text = format!("{}{}", stdout(&o), stderr(&o));
        assert!(!text.contains("failed"), "qemu-io {cmds:?} {uri}: {text}");
    }

    /// True when every `read -P` verifies (read-only open).
    pub fn reads<S: AsRef<str>>(&self, uri: &str, cmds: &[S]) -> bool {
        self.qio_passes(uri, cmds, true)
    }

    /// `qemu-img compare -f raw -F raw A B`: true identical, false different; panics otherwise.
    #[track_caller]
    pub fn same_image(&self, a: &str, b: &str) -> bool {
        let o = self.qemu_img(&["compare", "-f", "raw", "-F", "raw", a, b]);
        match o.status.code() {
            Some(0) => true,
            Some(1) => false,
            _ => panic!("qemu-img compare {a} {b} failed: {} {}", stdout(&o), stderr(&o)),
        }
    }

    /// Exports `point` of `vm` and asserts each disk is byte-identical to the VM's disk
    /// where it runs; unexports again.
    #[track_caller]
    pub fn assert_point_matches_primary(&self, vm: &str, point: &str) {
        let exported = self.export(vm, point);
        let primary = self.uris(vm);
        assert_eq!(exported.len(), primary.len(), "one export per disk: {exported:?} vs {primary:?}");
        for (i, (e, p)) in exported.iter().zip(&primary).enumerate() {
            assert!(self.same_image(e, p), "disk {i}: point {point} ({e}) differs from the primary ({p})");
        }
        assert_ok(&self.cli(&["point", "unexport", vm]), "point unexport");
    }
}
