//! Guest kernel command line: the user's, plus what the VMM must add
//! (virtio-mmio device locations; on PVM hosts the CPU feature masks).

use std::path::Path;

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

/// Appended unless the user set the same key: console on the UART (the
/// console log and crash reasons depend on it), reset through the i8042,
/// and reboot (which ends the VM) on panic.
pub const DEFAULTS: &[&str] = &["console=ttyS0", "reboot=k", "panic=-1"];

/// One `virtio_mmio.device=` argument.
pub fn virtio_mmio_arg(addr: u64, irq: u32) -> String {
    format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        VIRTIO_MMIO_SIZE >> 10,
        addr,
        irq
    )
}

/// The final command line: `user` unchanged, then [`DEFAULTS`] whose key
/// the user did not set, device locations, and the PVM masks when `pvm`.
/// Arguments after `--` would go to init, so ours are inserted before a
/// user `--`.
pub fn assemble(user: &str, devices: &[(u64, u32)], pvm: bool) -> Result<String, Error> {
    if user.contains('\0') {
        return Err(Error::Nul);
    }
    let user = user.trim();
    let (kernel_part, init_part) = match user.find(" -- ") {
        Some(i) => (&user[..i], Some(&user[i + 4..])),
        None if user == "--" => ("", Some("")),
        None => match user.strip_suffix(" --") {
            Some(k) => (k, Some("")),
            None => (user, None),
        },
    };
    let key = |arg: &str| arg.split('=').next().unwrap_or(arg).to_string();
    let present: Vec<String> = kernel_part.split_whitespace().map(key).collect();
    let mut ours: Vec<String> = DEFAULTS
        .iter()
        .filter(|d| !present.contains(&key(d)))
        .map(|d| d.to_string())
        .collect();
    ours.extend(
        devices
            .iter()
            .map(|&(addr, irq)| virtio_mmio_arg(addr, irq)),
    );
    if pvm {
        ours.push(PVM_MASKS.to_string());
    }
    let mut parts: Vec<&str> = Vec::new();
    if !kernel_part.is_empty() {
        parts.push(kernel_part);
    }
    parts.extend(ours.iter().map(String::as_str));
    let mut line = parts.join(" ");
    if let Some(init) = init_part {
        line.push_str(" --");
        if !init.is_empty() {
            line.push(' ');
            line.push_str(init);
        }
    }
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
            "console=hvc0 reboot=t panic=-1 virtio_mmio.device=4K@0xd0000000:5 \
             virtio_mmio.device=4K@0xd0001000:6",
            "user keys win over our defaults"
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
        assert!(l.starts_with(
            "console=ttyS0 reboot=k panic=-1 virtio_mmio.device=4K@0xd0000000:5 noxsave"
        ));
        assert!(l.ends_with("no_int3_selftest no_fwait tsc=reliable -- foo bar"));
        let l = assemble("a --", &[(0xd000_0000, 5)], false).unwrap();
        assert_eq!(
            l,
            "a console=ttyS0 reboot=k panic=-1 virtio_mmio.device=4K@0xd0000000:5 --"
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
