//! Which backend runs a sandbox on this host, and why. Shared by the
//! sandbox manager (per runtime handler) and `vmpod check`.

use super::host::KvmFlavour;
use super::qemu::{Accel, EffectiveAccel};
use super::HypervisorKind;

/// The outcome of backend selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    pub kind: HypervisorKind,
    /// The QEMU accelerator (QEMU only).
    pub accel: Option<EffectiveAccel>,
    /// Can pod sandboxes (guest agent + containers, i.e. guest userspace)
    /// run with this choice here?
    pub runs_sandboxes: bool,
    /// Why, in one line.
    pub reason: String,
}

/// Choose for a handler that asks for `requested` (`None` = auto).
pub fn choose(requested: Option<HypervisorKind>, flavour: &KvmFlavour) -> BackendChoice {
    let qemu = |accel: EffectiveAccel, reason: String| BackendChoice {
        kind: HypervisorKind::Qemu,
        accel: Some(accel),
        runs_sandboxes: true,
        reason,
    };
    match (requested, flavour) {
        (None | Some(HypervisorKind::Builtin), KvmFlavour::Hardware { .. }) => BackendChoice {
            kind: HypervisorKind::Builtin,
            accel: None,
            runs_sandboxes: true,
            reason: "hardware KVM runs guest kernel and userspace natively".into(),
        },
        (None, KvmFlavour::Pvm) => qemu(
            EffectiveAccel::Tcg,
            "PVM host: a guest's user mode cannot make syscalls under KVM here, so sandboxes \
             run in QEMU with TCG (software emulation)"
                .into(),
        ),
        (None, KvmFlavour::None(why)) => qemu(
            EffectiveAccel::Tcg,
            format!("no usable KVM ({why}); QEMU with TCG (software emulation)"),
        ),
        (Some(HypervisorKind::Builtin), KvmFlavour::Pvm) => BackendChoice {
            kind: HypervisorKind::Builtin,
            accel: None,
            runs_sandboxes: false,
            reason: "builtin requested on a PVM host: guest kernels boot (kernel mode emulated) \
                     but guest userspace cannot run, so sandboxes fail; use qemu or auto"
                .into(),
        },
        (Some(HypervisorKind::Builtin), KvmFlavour::None(why)) => BackendChoice {
            kind: HypervisorKind::Builtin,
            accel: None,
            runs_sandboxes: false,
            reason: format!("builtin requested but KVM is unusable ({why})"),
        },
        (Some(HypervisorKind::Qemu), f) => {
            // resolve() never fails for Auto.
            let accel = Accel::Auto.resolve(f).unwrap_or(EffectiveAccel::Tcg);
            let reason = match accel {
                EffectiveAccel::Kvm { .. } => "qemu requested; hardware KVM accelerates it".into(),
                EffectiveAccel::Tcg => {
                    format!("qemu requested; TCG because KVM here is {}", f.describe())
                }
            };
            qemu(accel, reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_builtin_on_hardware_and_qemu_tcg_on_pvm() {
        let hw = KvmFlavour::Hardware { flag: "vmx" };
        let c = choose(None, &hw);
        assert_eq!(c.kind, HypervisorKind::Builtin);
        assert!(c.runs_sandboxes);
        let c = choose(None, &KvmFlavour::Pvm);
        assert_eq!(c.kind, HypervisorKind::Qemu);
        assert_eq!(c.accel, Some(EffectiveAccel::Tcg));
        assert!(c.reason.contains("syscalls"));
        let c = choose(Some(HypervisorKind::Builtin), &KvmFlavour::Pvm);
        assert!(!c.runs_sandboxes);
        let c = choose(Some(HypervisorKind::Qemu), &hw);
        assert_eq!(c.accel, Some(EffectiveAccel::Kvm { pvm: false }));
        let c = choose(None, &KvmFlavour::None("missing".into()));
        assert_eq!(c.accel, Some(EffectiveAccel::Tcg));
    }
}
