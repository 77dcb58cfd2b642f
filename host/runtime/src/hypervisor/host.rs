//! What the host can run: KVM flavour, CPUs, memory. Used by backend
//! selection (`--accel auto`, handler defaults) and `vmpod check`.

use std::fs::OpenOptions;
use std::path::Path;

/// Kernel command-line words a non-PVM guest kernel needs on a PVM host: its
/// kernel mode runs in KVM's instruction emulator, which lacks these CPU
/// features, and our kernel patch's switch skips the `int3` self-test.
/// (PVM returns host CPUID whatever the VMM sets, so masking happens here.)
/// `no_fwait` (our patch 0002) keeps kernel-thread exit from running `fwait`,
/// which the emulator lacks; `tsc=reliable` keeps the clocksource watchdog
/// (whose thread would exit) from running at all.
pub const PVM_GUEST_CMDLINE: &str = "noxsave clearcpuid=popcnt,cx16,xsave,avx,fsgsbase,pcid,\
invpcid,rdrand,rdseed,rdpid,rdtscp,smap mitigations=off no_int3_selftest no_fwait tsc=reliable";

/// The flavour of `/dev/kvm` on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmFlavour {
    /// Hardware virtualisation (`vmx` = Intel VT-x, `svm` = AMD-V, or
    /// `unknown` when `/proc/cpuinfo` shows neither but KVM works).
    Hardware { flag: &'static str },
    /// PVM (module `kvm_pvm`): guest kernels we can build run their kernel
    /// mode in KVM's emulator and their user mode cannot make syscalls.
    Pvm,
    /// No usable `/dev/kvm`; the string says why.
    None(String),
}

impl KvmFlavour {
    /// Probe this host.
    pub fn detect() -> KvmFlavour {
        Self::detect_at(
            Path::new("/dev/kvm"),
            Path::new("/sys/module/kvm_pvm"),
            Path::new("/proc/cpuinfo"),
        )
    }

    fn detect_at(dev: &Path, pvm_module: &Path, cpuinfo: &Path) -> KvmFlavour {
        if !dev.exists() {
            return KvmFlavour::None(format!("{} does not exist", dev.display()));
        }
        if let Err(e) = OpenOptions::new().read(true).write(true).open(dev) {
            return KvmFlavour::None(format!("cannot open {}: {e}", dev.display()));
        }
        if pvm_module.exists() {
            return KvmFlavour::Pvm;
        }
        let flags = std::fs::read_to_string(cpuinfo).unwrap_or_default();
        let flag_line = flags
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or_default();
        let has = |f: &str| flag_line.split_whitespace().any(|w| w == f);
        let flag = if has("vmx") {
            "vmx"
        } else if has("svm") {
            "svm"
        } else {
            "unknown"
        };
        KvmFlavour::Hardware { flag }
    }

    /// Can a guest's user mode run under KVM here?
    pub fn runs_guest_userspace(&self) -> bool {
        matches!(self, KvmFlavour::Hardware { .. })
    }

    pub fn is_usable(&self) -> bool {
        !matches!(self, KvmFlavour::None(_))
    }

    /// One-line description for reports.
    pub fn describe(&self) -> String {
        match self {
            KvmFlavour::Hardware { flag: "vmx" } => "hardware (Intel VT-x)".into(),
            KvmFlavour::Hardware { flag: "svm" } => "hardware (AMD-V)".into(),
            KvmFlavour::Hardware { .. } => "hardware (no vmx/svm flag visible)".into(),
            KvmFlavour::Pvm => {
                "PVM (kvm_pvm: guest kernel mode emulated, guest user mode cannot syscall)".into()
            }
            KvmFlavour::None(why) => format!("none ({why})"),
        }
    }
}

/// Host RAM in MiB (`MemTotal`).
pub fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// Host CPUs available to us.
pub fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Host cgroup layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    V1,
    V2,
    /// v1 controllers plus an (often empty) v2 hierarchy at
    /// `/sys/fs/cgroup/unified`.
    Hybrid,
    Unknown,
}

pub fn cgroup_mode() -> CgroupMode {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        CgroupMode::V2
    } else if root.join("unified").join("cgroup.controllers").exists() {
        CgroupMode::Hybrid
    } else if root.join("memory").exists() || root.join("cpu").exists() {
        CgroupMode::V1
    } else {
        CgroupMode::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_flavours_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        let pvm = dir.path().join("kvm_pvm");
        let cpuinfo = dir.path().join("cpuinfo");
        assert!(matches!(
            KvmFlavour::detect_at(&dev, &pvm, &cpuinfo),
            KvmFlavour::None(_)
        ));
        std::fs::write(&dev, b"").unwrap();
        std::fs::write(&cpuinfo, "processor: 0\nflags\t: fpu svm sse\n").unwrap();
        assert_eq!(
            KvmFlavour::detect_at(&dev, &pvm, &cpuinfo),
            KvmFlavour::Hardware { flag: "svm" }
        );
        std::fs::create_dir(&pvm).unwrap();
        let f = KvmFlavour::detect_at(&dev, &pvm, &cpuinfo);
        assert_eq!(f, KvmFlavour::Pvm);
        assert!(!f.runs_guest_userspace());
        assert!(f.is_usable());
    }

    #[test]
    fn host_numbers_are_sane() {
        assert!(memory_mib() > 0);
        assert!(cpus() >= 1);
    }
}
