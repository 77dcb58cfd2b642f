//! Validation of the plain [`VmConfig`] before anything is created.

use std::fs::File;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;

use vmpod_runtime::hypervisor::VmConfig;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel {path}: {source}")]
    KernelOpen {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {0} is not an uncompressed ELF vmlinux")]
    KernelNotElf(String),
    #[error("initrd {path}: {source}")]
    Initrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("memory {0} MiB out of range ({MIN_MEMORY_MIB}..={max} MiB)", max = MAX_MEMORY_MIB)]
    Memory(u32),
    #[error("vCPU count {got} out of range (1..={max})")]
    Vcpus { got: u8, max: usize },
    #[error("guest CID {0} is reserved (must be >= 3)")]
    Cid(u32),
    #[error("vsock socket {0} is in use by a running process")]
    VsockInUse(String),
    #[error("vsock socket {path}: {reason}")]
    VsockPath { path: String, reason: String },
    #[error("disk {path}: {source}")]
    Disk {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TAP name {0:?} is invalid (1-15 bytes, no '/' or whitespace)")]
    TapName(String),
    #[error("MAC address {0:?} is invalid (want xx:xx:xx:xx:xx:xx, unicast)")]
    Mac(String),
    #[error("{0} virtio devices do not fit (max {max})", max = MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    #[error("shared directories (virtio-fs) are not supported by the built-in VMM")]
    SharedDirs,
}

pub const MIN_MEMORY_MIB: u32 = 32;
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// virtio-mmio devices get IRQs 5..24 (IOAPIC pins).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Check `config` against what we can run; `max_vcpus` comes from KVM.
pub fn validate(config: &VmConfig, max_vcpus: usize) -> Result<(), Error> {
    check_kernel(&config.kernel)?;
    if let Some(initrd) = &config.initrd {
        std::fs::metadata(initrd)
            .and_then(|m| {
                if m.is_file() {
                    Ok(())
                } else {
                    Err(std::io::Error::other("not a regular file"))
                }
            })
            .map_err(|source| Error::Initrd {
                path: initrd.display().to_string(),
                source,
            })?;
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&config.memory_mib) {
        return Err(Error::Memory(config.memory_mib));
    }
    let max = max_vcpus.clamp(1, 254);
    if config.vcpus == 0 || usize::from(config.vcpus) > max {
        return Err(Error::Vcpus {
            got: config.vcpus,
            max,
        });
    }
    if config.guest_cid < 3 {
        return Err(Error::Cid(config.guest_cid));
    }
    check_vsock_path(&config.vsock_uds)?;
    for d in &config.disks {
        std::fs::OpenOptions::new()
            .read(true)
            .write(!d.read_only)
            .open(&d.path)
            .map_err(|source| Error::Disk {
                path: d.path.display().to_string(),
                source,
            })?;
    }
    for n in &config.nets {
        if n.tap.is_empty()
            || n.tap.len() > 15
            || n.tap.contains('/')
            || n.tap.chars().any(char::is_whitespace)
        {
            return Err(Error::TapName(n.tap.clone()));
        }
        parse_mac(&n.mac)?;
    }
    if !config.shared_dirs.is_empty() {
        return Err(Error::SharedDirs);
    }
    // vsock is always present.
    let devices = 1 + config.disks.len() + config.nets.len() + usize::from(config.rng);
    if devices > MAX_VIRTIO_DEVICES {
        return Err(Error::TooManyDevices(devices));
    }
    Ok(())
}

fn check_kernel(path: &Path) -> Result<(), Error> {
    let mut f = File::open(path).map_err(|source| Error::KernelOpen {
        path: path.display().to_string(),
        source,
    })?;
    let mut magic = [0u8; 4];
    if f.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
        return Err(Error::KernelNotElf(path.display().to_string()));
    }
    Ok(())
}

/// The socket must not be served by someone else; a stale file left by a
/// dead VMM is removed.
fn check_vsock_path(path: &Path) -> Result<(), Error> {
    let shown = path.display().to_string();
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(p) = parent {
        if !p.is_dir() {
            return Err(Error::VsockPath {
                path: shown,
                reason: format!("directory {} does not exist", p.display()),
            });
        }
    }
    if path.as_os_str().len() >= 108 {
        return Err(Error::VsockPath {
            path: shown,
            reason: "path longer than a unix socket address allows (107 bytes)".into(),
        });
    }
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) => {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(Error::VsockPath {
                    path: shown,
                    reason: "exists and is not a socket".into(),
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(Error::VsockInUse(shown));
            }
            std::fs::remove_file(path).map_err(|e| Error::VsockPath {
                path: shown,
                reason: format!("cannot remove stale socket: {e}"),
            })
        }
    }
}

/// Parse `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], Error> {
    let bad = || Error::Mac(s.to_string());
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 == 1 {
        return Err(bad());
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use vmpod_runtime::hypervisor::{DiskConfig, NetConfig};

    fn base(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF\x02\x01\x01rest").unwrap();
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

    #[test]
    fn good_config_passes() {
        let d = tempfile::tempdir().unwrap();
        validate(&base(d.path()), 2).unwrap();
    }

    #[test]
    fn kernel_problems() {
        let d = tempfile::tempdir().unwrap();
        let mut c = base(d.path());
        c.kernel = PathBuf::from("/nonexistent/vmlinux");
        assert!(matches!(validate(&c, 2), Err(Error::KernelOpen { .. })));
        std::fs::write(d.path().join("bz"), b"MZ\0\0").unwrap();
        c.kernel = d.path().join("bz");
        let e = validate(&c, 2).unwrap_err();
        assert!(e.to_string().contains("not an uncompressed ELF"), "{e}");
    }

    #[test]
    fn ranges() {
        let d = tempfile::tempdir().unwrap();
        let mut c = base(d.path());
        c.memory_mib = 8;
        assert!(matches!(validate(&c, 2), Err(Error::Memory(8))));
        c.memory_mib = 10_000_000;
        assert!(matches!(validate(&c, 2), Err(Error::Memory(_))));
        c.memory_mib = 128;
        c.vcpus = 0;
        assert!(matches!(validate(&c, 2), Err(Error::Vcpus { .. })));
        c.vcpus = 3;
        assert!(matches!(
            validate(&c, 2),
            Err(Error::Vcpus { got: 3, max: 2 })
        ));
        c.vcpus = 1;
        c.guest_cid = 2;
        assert!(matches!(validate(&c, 2), Err(Error::Cid(2))));
    }

    #[test]
    fn vsock_socket_in_use_or_stale() {
        let d = tempfile::tempdir().unwrap();
        let c = base(d.path());
        let l = std::os::unix::net::UnixListener::bind(&c.vsock_uds).unwrap();
        assert!(matches!(validate(&c, 2), Err(Error::VsockInUse(_))));
        drop(l);
        // The file stays behind, nobody listens: stale, removed.
        assert!(c.vsock_uds.exists());
        validate(&c, 2).unwrap();
        assert!(!c.vsock_uds.exists());
        std::fs::write(&c.vsock_uds, b"x").unwrap();
        assert!(matches!(validate(&c, 2), Err(Error::VsockPath { .. })));
        let mut c2 = base(d.path());
        c2.vsock_uds = PathBuf::from("/nonexistent-dir/v.sock");
        assert!(matches!(validate(&c2, 2), Err(Error::VsockPath { .. })));
    }

    #[test]
    fn devices() {
        let d = tempfile::tempdir().unwrap();
        let mut c = base(d.path());
        c.disks.push(DiskConfig {
            path: d.path().join("missing.img"),
            read_only: true,
        });
        assert!(matches!(validate(&c, 2), Err(Error::Disk { .. })));
        c.disks.clear();
        c.nets.push(NetConfig {
            tap: "tap-with-a-very-long-name".into(),
            mac: "02:00:00:00:00:01".into(),
        });
        assert!(matches!(validate(&c, 2), Err(Error::TapName(_))));
        c.nets[0].tap = "tap0".into();
        c.nets[0].mac = "03:00:00:00:00:01".into();
        assert!(matches!(validate(&c, 2), Err(Error::Mac(_))));
        c.nets[0].mac = "02:00:00:00:00:01".into();
        validate(&c, 2).unwrap();
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:ab:CD:00:11:ff").unwrap(),
            [2, 0xab, 0xcd, 0, 0x11, 0xff]
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:0g",
            "002:00:00:00:00:00",
            "01:00:00:00:00:00",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
