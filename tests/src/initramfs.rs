//! Small test initramfs images: busybox-static, a shell `/init` and, where
//! vsock is exercised, the static C helper `/bin/vsock_probe`, packed with
//! `cpio -H newc` (uncompressed; the kernel takes it as it is).
//!
//! Needs busybox-static (`/bin/busybox`), cpio and, for the vsock helper,
//! gcc with a static libc.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::run_ok;

/// Source of `/bin/vsock_probe` (see the comment at its top for the modes).
pub const VSOCK_PROBE_C: &str = include_str!("guest/vsock_probe.c");

/// What every busybox `/init` of the tests starts with (see
/// [`Initramfs::busybox_init`]).
pub const BUSYBOX_INIT_PREAMBLE: &str = "#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
";

/// An initramfs tree being put together in a directory of its own.
pub struct Initramfs {
    root: PathBuf,
}

impl Initramfs {
    /// Start an empty tree at `root` (removed first if it exists).
    pub fn new(root: &Path) -> Initramfs {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root)
            .unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
        Initramfs {
            root: root.to_path_buf(),
        }
    }

    /// Empty directories (mount points such as `proc`, `sys`, `dev`).
    pub fn dirs(self, dirs: &[&str]) -> Initramfs {
        for d in dirs {
            std::fs::create_dir_all(self.root.join(d)).unwrap();
        }
        self
    }

    /// `/bin/busybox` from Debian's busybox-static (the `/init` scripts run
    /// `/bin/busybox --install -s /bin` or call it by path).
    pub fn busybox(self) -> Initramfs {
        std::fs::create_dir_all(self.root.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", self.root.join("bin/busybox"))
            .expect("/bin/busybox (Debian busybox-static) is needed");
        self
    }

    /// `/bin/vsock_probe`, compiled static from [`VSOCK_PROBE_C`].
    pub fn vsock_probe(self) -> Initramfs {
        std::fs::create_dir_all(self.root.join("bin")).unwrap();
        let src = self.root.with_extension("vsock_probe.c");
        std::fs::write(&src, VSOCK_PROBE_C).unwrap();
        run_ok(
            Command::new("gcc")
                .args(["-static", "-O2", "-o"])
                .arg(self.root.join("bin/vsock_probe"))
                .arg(&src),
        );
        self
    }

    /// `/init` (mode 0755) with the given script.
    pub fn init(self, script: &str) -> Initramfs {
        let init = self.root.join("init");
        std::fs::write(&init, script).unwrap();
        std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
        self
    }

    /// busybox-static plus a shell `/init` that installs the applets into
    /// `/bin`, mounts proc, sysfs and devtmpfs, then runs `body`.
    pub fn busybox_init(self, body: &str) -> Initramfs {
        self.dirs(&["proc", "sys", "dev"])
            .busybox()
            .init(&format!("{BUSYBOX_INIT_PREAMBLE}{body}"))
    }

    /// Pack the tree (owned by root, sorted) into the newc archive `out`.
    pub fn cpio(self, out: &Path) -> PathBuf {
        run_ok(
            Command::new("sh")
                .current_dir(&self.root)
                .arg("-c")
                .arg(format!(
                    "find . | sort | cpio --quiet -o -H newc -R 0:0 > {}",
                    out.display()
                )),
        );
        out.to_path_buf()
    }
}
