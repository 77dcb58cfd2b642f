//! Guest kernel command line: the user's, plus what the VMM must add
//! (virtio-mmio device locations; on PVM hosts the CPU feature masks).

use std::path::Path;

use vmpod_runtime::hypervisor::cmdline::compose;

use crate::arch::layout::{CMDLINE_MAX_SIZE, VIRTIO_MMIO_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    Nul,
}

/// CPU features a non-PVM guest kernel must not use on a PVM host (its
/// kernel mode runs in KVM's instruction emulator, which lacks them), plus
/// our kernel patches' switches (`no_int3_selftest`, `no_fwait`) and
/// `tsc=reliable`. One definition, shared with the QEMU backend.
pub const PVM_MASKS: &str = vmpod_runtime::hypervisor::host::PVM_GUEST_CMDLINE;

/// Is the host's KVM the PVM flavour?
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Added unless the user set the same key: reset through the i8042, and
/// reboot (which ends the VM) on panic. `console=ttyS0` always goes first
/// (see [`vmpod_runtime::hypervisor::cmdline::compose`]).
pub const DEFAULTS: &[&str] = &["reboot=k", "panic=-1"];

/// One `virtio_mmio.device=` argument.
pub fn virtio_mmio_arg(addr: u64, irq: u32) -> String {
    format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        VIRTIO_MMIO_SIZE >> 10,
        addr,
        irq
    )
}

/// The final command line ([`compose`]): `console=ttyS0` first, `user`
/// unchanged, [`DEFAULTS`] whose key the user did not set, the device
/// locations, and the PVM masks when `pvm`; a user `--` (init's arguments)
/// stays last.
pub fn assemble(user: &str, devices: &[(u64, u32)], pvm: bool) -> Result<String, Error> {
    if user.contains('\0') {
        return Err(Error::Nul);
    }
    let mut always: Vec<String> = devices
        .iter()
        .map(|&(addr, irq)| virtio_mmio_arg(addr, irq))
        .collect();
    if pvm {
        always.push(PVM_MASKS.to_string());
    }
    let always: Vec<&str> = always.iter().map(String::as_str).collect();
    let line = compose(user, DEFAULTS, &always);
    if line.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::TooLong {
            len: line.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_line_kept_and_devices_appended() {
        let l = assemble(
            "console=hvc0 reboot=t",
            &[(0xd000_0000, 5), (0xd000_1000, 6)],
            false,
        )
        .unwrap();
        assert_eq!(
            l,
            "console=ttyS0 console=hvc0 reboot=t panic=-1 virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6",
            "user keys win over our defaults; ttyS0 first, the user's console last"
        );
    }

    #[test]
    fn pvm_masks_appended_after_user_line() {
        let l = assemble("console=ttyS0 quiet", &[], true).unwrap();
        assert!(l.starts_with("console=ttyS0 quiet "));
        assert!(l.ends_with("no_int3_selftest no_fwait tsc=reliable"));
        for w in ["noxsave", "clearcpuid=popcnt,cx16,xsave,avx,fsgsbase,pcid,invpcid,rdrand,rdseed,rdpid,rdtscp,smap", "mitigations=off", "no_int3_selftest", "no_fwait", "tsc=reliable"] {
            assert!(l.split(' ').any(|x| x == w), "missing {w} in {l}");
        }
        assert!(!assemble("console=ttyS0", &[], false)
            .unwrap()
            .contains("noxsave"));
    }

    #[test]
    fn init_arguments_stay_last() {
        let l = assemble("console=ttyS0 -- foo bar", &[(0xd000_0000, 5)], true).unwrap();
        assert!(
            l.starts_with(
                "console=ttyS0 reboot=k panic=-1 virtio_mmio.device=4K@0xd0000000:5 noxsave"
            ),
            "{l}"
        );
        assert!(l.ends_with("no_int3_selftest no_fwait tsc=reliable -- foo bar"));
        let l = assemble("a --", &[(0xd000_0000, 5)], false).unwrap();
        assert_eq!(
            l,
            "console=ttyS0 a reboot=k panic=-1 virtio_mmio.device=4K@0xd0000000:5 --"
        );
    }

    #[test]
    fn empty_user_line() {
        assert_eq!(
            assemble("", &[(0xd000_0000, 5)], false).unwrap(),
            "console=ttyS0 reboot=k panic=-1 virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn limits() {
        let long = "x".repeat(2040);
        assert!(matches!(
            assemble(&long, &[], true),
            Err(Error::TooLong { .. })
        ));
        assert!(matches!(assemble("a\0b", &[], false), Err(Error::Nul)));
    }
}
