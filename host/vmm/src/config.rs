//! Validation of the plain [`VmConfig`] before anything is created: the
//! checks every backend shares ([`VmConfig::validate`] in the runtime crate:
//! ELF kernel, initrd, 1..=host CPUs, 64 MiB..=host RAM, CID, vsock socket,
//! console log, disks, TAP names, MACs, command line) plus what only the
//! built-in VMM limits: KVM's vCPU count, the virtio-mmio slots, and no
//! virtio-fs.

use vmpod_runtime::hypervisor::{HypervisorError, VmConfig};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A shared check failed (the message names the problem).
    #[error("{0}")]
    Invalid(String),
    #[error("vCPU count {got} out of range (1..={max}, KVM's limit)")]
    Vcpus { got: u8, max: usize },
    #[error("{0} virtio devices do not fit (max {max})", max = MAX_VIRTIO_DEVICES)]
    TooManyDevices(usize),
    #[error("shared directories (virtio-fs) are not supported by the built-in VMM")]
    SharedDirs,
}

/// virtio-mmio devices get IRQs 5..24 (IOAPIC pins).
pub const MAX_VIRTIO_DEVICES: usize = 19;

/// Check `config` against what we can run; `max_vcpus` comes from KVM.
pub fn validate(config: &VmConfig, max_vcpus: usize) -> Result<(), Error> {
    config.validate().map_err(|e| match e {
        HypervisorError::InvalidConfig(msg) => Error::Invalid(msg),
        other => Error::Invalid(other.to_string()),
    })?;
    let max = max_vcpus.clamp(1, 254);
    if usize::from(config.vcpus) > max {
        return Err(Error::Vcpus {
            got: config.vcpus,
            max,
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use vmpod_runtime::hypervisor::{DiskConfig, SharedDirConfig};

    fn base(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELF64
        elf[5] = 1; // little-endian
        elf[18] = 62; // x86-64
        std::fs::write(&kernel, elf).unwrap();
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

    /// The shared checks run (one example each; the runtime tests them all)
    /// and keep their one-line message without a second prefix.
    #[test]
    fn shared_checks_apply() {
        let d = tempfile::tempdir().unwrap();
        let mut c = base(d.path());
        c.memory_mib = 32;
        let e = validate(&c, 2).unwrap_err().to_string();
        assert!(e.starts_with("memory must be between 64"), "{e}");
        c.memory_mib = 128;
        std::fs::write(&c.kernel, b"MZ\0\0").unwrap();
        let e = validate(&c, 2).unwrap_err().to_string();
        assert!(e.contains("not an ELF"), "{e}");
        let mut c = base(d.path());
        c.vcpus = 0;
        assert!(matches!(validate(&c, 2), Err(Error::Invalid(_))));
    }

    #[test]
    fn builtin_only_limits() {
        let d = tempfile::tempdir().unwrap();
        let mut c = base(d.path());
        // Within the host's CPUs (the shared check) but over KVM's limit.
        if vmpod_runtime::hypervisor::host::cpus() >= 2 {
            c.vcpus = 2;
            assert!(matches!(
                validate(&c, 1),
                Err(Error::Vcpus { got: 2, max: 1 })
            ));
        }
        let mut c = base(d.path());
        c.shared_dirs.push(SharedDirConfig {
            tag: "fs".into(),
            path: d.path().to_path_buf(),
        });
        assert!(matches!(validate(&c, 2), Err(Error::SharedDirs)));
        let mut c = base(d.path());
        let img = d.path().join("disk.img");
        std::fs::write(&img, [0u8; 512]).unwrap();
        c.disks = (0..MAX_VIRTIO_DEVICES)
            .map(|_| DiskConfig {
                path: img.clone(),
                read_only: true,
            })
            .collect();
        assert!(matches!(
            validate(&c, 2),
            Err(Error::TooManyDevices(n)) if n == MAX_VIRTIO_DEVICES + 2
        ));
    }
}
