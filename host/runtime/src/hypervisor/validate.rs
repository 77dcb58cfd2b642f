//! [`VmConfig::validate`]: every check a backend relies on, each failing with
//! a one-line message that names the problem.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use super::{host, HypervisorError, Result, VmConfig};

/// Smallest guest RAM we accept.
pub const MIN_MEMORY_MIB: u32 = 64;
/// Longest virtio-fs tag (the device's config field is 36 bytes).
pub const VIRTIO_FS_TAG_MAX: usize = 36;
/// x86 `COMMAND_LINE_SIZE` (including the NUL).
const CMDLINE_MAX: usize = 2048;
/// Linux `IFNAMSIZ` minus the NUL.
const IFNAME_MAX: usize = 15;
/// `sun_path` minus the NUL.
const UNIX_PATH_MAX: usize = 107;

const EM_X86_64: u16 = 62;

fn invalid(msg: String) -> HypervisorError {
    HypervisorError::InvalidConfig(msg)
}

impl VmConfig {
    /// Check everything a backend needs before it creates anything.
    ///
    /// Side effect: a *stale* vsock socket file (nobody listening) is removed;
    /// a live one is an error. The console log is created (or appended to) to
    /// prove it is writable.
    pub fn validate(&self) -> Result<()> {
        self.validate_with_limits(host::cpus(), host::memory_mib())
    }

    pub(crate) fn validate_with_limits(&self, max_vcpus: usize, host_mib: u64) -> Result<()> {
        check_kernel(&self.kernel)?;
        if let Some(initrd) = &self.initrd {
            check_readable_file(initrd, "initrd")?;
        }
        if self.cmdline.len() >= CMDLINE_MAX {
            return Err(invalid(format!(
                "kernel command line is {} bytes, the limit is {}",
                self.cmdline.len(),
                CMDLINE_MAX - 1
            )));
        }
        if self.cmdline.contains('\0') || self.cmdline.contains('\n') {
            return Err(invalid(
                "kernel command line contains a NUL or newline".into(),
            ));
        }
        if let Some(why) = super::cmdline::hides_console_events(&self.cmdline) {
            return Err(invalid(why));
        }
        if self.vcpus == 0 || usize::from(self.vcpus) > max_vcpus {
            return Err(invalid(format!(
                "vcpus must be between 1 and {max_vcpus} (host CPUs), got {}",
                self.vcpus
            )));
        }
        let max_mib = host_mib.min(u64::from(u32::MAX));
        if self.memory_mib < MIN_MEMORY_MIB || u64::from(self.memory_mib) > max_mib {
            return Err(invalid(format!(
                "memory must be between {MIN_MEMORY_MIB} and {max_mib} MiB (host RAM), got {} MiB",
                self.memory_mib
            )));
        }
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(invalid(format!(
                "guest CID must be >= 3 (0-2 are reserved), got {}",
                self.guest_cid
            )));
        }
        check_vsock_socket(&self.vsock_uds)?;
        check_console_log(&self.console_log)?;
        for disk in &self.disks {
            check_readable_file(&disk.path, "disk")?;
            if !disk.read_only {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&disk.path)
                    .map_err(|e| {
                        invalid(format!(
                            "disk {} is not writable ({e}); add ,ro for a read-only disk",
                            disk.path.display()
                        ))
                    })?;
            }
        }
        for (i, net) in self.nets.iter().enumerate() {
            // Letters, digits, `_ . -` only: a valid Linux interface name
            // that also needs no quoting on QEMU's `-netdev tap,ifname=`.
            let name_ok = net
                .tap
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if net.tap.is_empty()
                || net.tap.len() > IFNAME_MAX
                || !name_ok
                || net.tap == "."
                || net.tap == ".."
            {
                return Err(invalid(format!(
                    "TAP name {:?} is not a valid interface name (1-{IFNAME_MAX} of A-Z a-z 0-9 _ . -)",
                    net.tap
                )));
            }
            if parse_mac(&net.mac).is_none() {
                return Err(invalid(format!(
                    "MAC address {:?} of net {i} is not a unicast address of the form 02:00:00:00:00:01",
                    net.mac
                )));
            }
        }
        let mut tags = Vec::new();
        for share in &self.shared_dirs {
            if share.tag.is_empty()
                || share.tag.len() > VIRTIO_FS_TAG_MAX
                || share.tag.contains(char::is_whitespace)
                || share.tag.contains(',')
            {
                return Err(invalid(format!(
                    "virtio-fs tag {:?} must be 1-{VIRTIO_FS_TAG_MAX} bytes without spaces or commas",
                    share.tag
                )));
            }
            if tags.contains(&&share.tag) {
                return Err(invalid(format!(
                    "virtio-fs tag {:?} is used twice",
                    share.tag
                )));
            }
            tags.push(&share.tag);
            if !share.path.is_dir() {
                return Err(invalid(format!(
                    "shared directory {} does not exist or is not a directory",
                    share.path.display()
                )));
            }
        }
        Ok(())
    }
}

fn check_readable_file(path: &Path, what: &str) -> Result<File> {
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid(format!("{what} {} not found ({e})", path.display())))?;
    if !meta.is_file() {
        return Err(invalid(format!(
            "{what} {} is not a regular file",
            path.display()
        )));
    }
    File::open(path).map_err(|e| invalid(format!("{what} {} unreadable ({e})", path.display())))
}

/// The kernel must be an ELF64 little-endian x86-64 file (the uncompressed
/// `vmlinux`, not a bzImage).
fn check_kernel(path: &Path) -> Result<()> {
    let mut file = check_readable_file(path, "kernel")?;
    let mut ident = [0u8; 20];
    let n = read_up_to(&mut file, &mut ident)
        .map_err(|e| invalid(format!("kernel {} unreadable ({e})", path.display())))?;
    if n < ident.len() || &ident[..4] != b"\x7fELF" {
        return Err(invalid(format!(
            "kernel {} is not an ELF file (give the uncompressed vmlinux, not a bzImage)",
            path.display()
        )));
    }
    let machine = u16::from_le_bytes([ident[18], ident[19]]);
    if ident[4] != 2 || ident[5] != 1 || machine != EM_X86_64 {
        return Err(invalid(format!(
            "kernel {} is an ELF file but not ELF64 little-endian x86-64 (class {}, data {}, machine {machine})",
            path.display(),
            ident[4],
            ident[5]
        )));
    }
    Ok(())
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// The vsock socket path must be free: a live listener is an error, a stale
/// socket file is removed, any other file is an error.
fn check_vsock_socket(path: &Path) -> Result<()> {
    if path.as_os_str().len() > UNIX_PATH_MAX {
        return Err(invalid(format!(
            "vsock socket path {} is longer than {UNIX_PATH_MAX} bytes",
            path.display()
        )));
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            return Err(invalid(format!(
                "vsock socket directory {} does not exist",
                dir.display()
            )));
        }
        _ => {}
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(invalid(format!(
                "vsock socket {} cannot be inspected ({e})",
                path.display()
            )))
        }
    };
    if !meta.file_type().is_socket() {
        return Err(invalid(format!(
            "vsock socket path {} exists and is not a socket",
            path.display()
        )));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(invalid(format!(
            "vsock socket {} is in use (something is listening on it)",
            path.display()
        ))),
        Err(_) => std::fs::remove_file(path).map_err(|e| {
            invalid(format!(
                "stale vsock socket {} cannot be removed ({e})",
                path.display()
            ))
        }),
    }
}

fn check_console_log(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            return Err(invalid(format!(
                "console log directory {} does not exist",
                dir.display()
            )));
        }
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(|_| ())
        .map_err(|e| {
            invalid(format!(
                "console log {} is not writable ({e})",
                path.display()
            ))
        })
}

/// `aa:bb:cc:dd:ee:ff` as bytes; `None` unless six two-digit hex groups
/// forming a unicast address (a multicast source MAC is invalid on Ethernet).
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        let p = parts.next()?;
        if p.len() != 2 || !p.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    if parts.next().is_some() || out[0] & 1 == 1 {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::{DiskConfig, NetConfig, SharedDirConfig};
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    fn elf_header(class: u8, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, elf_header(2, EM_X86_64)).unwrap();
        VmConfig {
            kernel,
            initrd: None,
            cmdline: "console=ttyS0".into(),
            vcpus: 1,
            memory_mib: 128,
            vsock_uds: dir.join("vm.vsock"),
            guest_cid: 3,
            console_log: dir.join("console.log"),
            disks: vec![],
            nets: vec![],
            shared_dirs: vec![],
            rng: true,
            vsock_backend: Default::default(),
        }
    }

    fn err(c: &VmConfig) -> String {
        let e = c.validate_with_limits(2, 4096).unwrap_err().to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    #[test]
    fn good_config_passes() {
        let dir = tempfile::tempdir().unwrap();
        config(dir.path()).validate_with_limits(2, 4096).unwrap();
    }

    #[test]
    fn kernel_checks() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.kernel = dir.path().join("missing");
        assert!(err(&c).contains("not found"));
        std::fs::write(dir.path().join("bz"), b"MZ\x00\x00 not an elf at all....").unwrap();
        c.kernel = dir.path().join("bz");
        assert!(err(&c).contains("not an ELF"));
        std::fs::write(dir.path().join("arm"), elf_header(2, 183)).unwrap();
        c.kernel = dir.path().join("arm");
        assert!(err(&c).contains("x86-64"));
        std::fs::write(dir.path().join("e32"), elf_header(1, EM_X86_64)).unwrap();
        c.kernel = dir.path().join("e32");
        assert!(err(&c).contains("ELF64"));
        c.kernel = dir.path().to_path_buf();
        assert!(err(&c).contains("not a regular file"));
    }

    #[test]
    fn sizes_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.vcpus = 0;
        assert!(err(&c).contains("vcpus"));
        c.vcpus = 3;
        assert!(err(&c).contains("between 1 and 2"));
        c.vcpus = 1;
        c.memory_mib = 16;
        assert!(err(&c).contains("memory"));
        c.memory_mib = 8192;
        assert!(err(&c).contains("4096"));
        c.memory_mib = 128;
        c.guest_cid = 2;
        assert!(err(&c).contains("CID"));
        c.guest_cid = 3;
        c.initrd = Some(PathBuf::from("/nonexistent/initrd"));
        assert!(err(&c).contains("initrd"));
        c.initrd = None;
        c.cmdline = "x".repeat(3000);
        assert!(err(&c).contains("command line"));
        c.cmdline = "quiet loglevel=0".into();
        assert!(err(&c).contains("loglevel=0"));
    }

    #[test]
    fn vsock_socket_live_stale_and_wrong_type() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let listener = UnixListener::bind(&c.vsock_uds).unwrap();
        assert!(err(&c).contains("in use"));
        drop(listener); // socket file stays behind: stale
        assert!(c.vsock_uds.exists());
        c.validate_with_limits(2, 4096).unwrap();
        assert!(!c.vsock_uds.exists(), "stale socket removed");
        std::fs::write(&c.vsock_uds, b"").unwrap();
        assert!(err(&c).contains("not a socket"));
        let mut c2 = config(dir.path());
        c2.vsock_uds = dir.path().join("nodir/vm.vsock");
        assert!(err(&c2).contains("does not exist"));
    }

    #[test]
    fn devices() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.disks.push(DiskConfig {
            path: dir.path().join("nodisk"),
            read_only: true,
        });
        assert!(err(&c).contains("disk"));
        c.disks.clear();
        c.nets.push(NetConfig {
            tap: "tap-with-a-very-long-name".into(),
            mac: "02:00:00:00:00:01".into(),
        });
        assert!(err(&c).contains("TAP"));
        for bad in ["tap0,script=/x", "a b", "..", "t/0", ""] {
            c.nets[0].tap = bad.into();
            assert!(err(&c).contains("TAP"), "{bad:?}");
        }
        c.nets[0].tap = "tap0".into();
        for bad in [
            "zz",
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:0g",
            "002:00:00:00:00:00",
            "02:00:00:00:00:00:00",
            "01:00:00:00:00:00",
        ] {
            c.nets[0].mac = bad.into();
            assert!(err(&c).contains("MAC"), "{bad:?}");
        }
        c.nets[0].mac = "02:ab:CD:00:11:ff".into();
        assert_eq!(
            parse_mac(&c.nets[0].mac),
            Some([2, 0xab, 0xcd, 0, 0x11, 0xff])
        );
        c.validate_with_limits(2, 4096).unwrap();
        c.nets.clear();
        c.shared_dirs.push(SharedDirConfig {
            tag: "rootfs".into(),
            path: dir.path().join("nope"),
        });
        assert!(err(&c).contains("shared directory"));
        c.shared_dirs[0].path = dir.path().to_path_buf();
        c.shared_dirs.push(c.shared_dirs[0].clone());
        assert!(err(&c).contains("twice"));
        c.console_log = dir.path().join("no/console.log");
        c.shared_dirs.clear();
        assert!(err(&c).contains("console log"));
    }
}
