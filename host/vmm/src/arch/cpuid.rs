//! CPUID: what KVM supports, filtered by us per vCPU.
//!
//! We fix the topology (APIC IDs, logical/core counts in leaves 0x1, 0x4,
//! 0xb, 0x8000_0008, 0x8000_001e), set the hypervisor bit, hide the PMU and
//! IA32_ARCH_CAPABILITIES (PVM hosts cannot set MSR 0x10a) and advertise the
//! TSC-deadline timer only when KVM emulates it. Everything else is passed
//! through so hardware-KVM hosts stay fast.
//!
//! Note: PVM hosts ignore the CPUID we set (the guest sees host values);
//! there the command-line masks in [`crate::cmdline`] do the hiding.

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 0x1 ECX: hypervisor present.
const ECX_HYPERVISOR_BIT: u32 = 31;
/// Leaf 0x1 ECX: TSC deadline timer.
const ECX_TSC_DEADLINE_BIT: u32 = 24;
/// Leaf 0x1 EDX: multi-threading (more than one logical CPU per package).
const EDX_HTT_BIT: u32 = 28;
/// Leaf 0x7 subleaf 0 EDX: IA32_ARCH_CAPABILITIES MSR present.
const LEAF7_EDX_ARCH_CAPABILITIES_BIT: u32 = 29;
/// Leaf 0x4000_0001 EAX (KVM features) that need hypercalls from the guest:
/// PV unhalt (7: PV spinlock waiters are woken by KVM_HC_KICK_CPU), PV TLB
/// flush (9), PV send-IPI (11), PV sched-yield (13).
const KVM_FEATURES_HYPERCALL: u32 = (1 << 7) | (1 << 9) | (1 << 11) | (1 << 13);
/// Leaf 0x1 EBX: CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_SIZE: u32 = 8;

/// Inputs to the filter for one vCPU.
#[derive(Debug, Clone, Copy)]
pub struct CpuidParams {
    pub vcpu_id: u8,
    pub vcpu_count: u8,
    pub tsc_deadline: bool,
    /// Hide the KVM PV features that work through hypercalls (PV IPIs, PV
    /// spinlock kicks, TLB flush, sched yield): hypercalls from an emulated
    /// guest kernel do not work on PVM hosts, so IPIs must go through the
    /// (emulated) LAPIC and spinlock waiters must not halt for a kick.
    pub no_pv_hypercalls: bool,
}

/// Adjust KVM's supported CPUID for one vCPU, in place.
pub fn filter(entries: &mut [kvm_cpuid_entry2], p: CpuidParams) {
    let count = u32::from(p.vcpu_count.max(1));
    let id = u32::from(p.vcpu_id);
    // Bits needed to encode `count` core IDs (x2APIC shift).
    let core_shift = 32 - (count - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                // APIC ID, logical processor count, CLFLUSH size.
                e.ebx = (id << 24) | (count << 16) | (CLFLUSH_LINE_SIZE << 8) | (e.ebx & 0xff);
                e.ecx |= 1 << ECX_HYPERVISOR_BIT;
                if p.tsc_deadline {
                    e.ecx |= 1 << ECX_TSC_DEADLINE_BIT;
                } else {
                    e.ecx &= !(1 << ECX_TSC_DEADLINE_BIT);
                }
                if count > 1 {
                    e.edx |= 1 << EDX_HTT_BIT;
                } else {
                    e.edx &= !(1 << EDX_HTT_BIT);
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package - 1 in
                // EAX[31:26]; threads sharing the cache in EAX[25:14].
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
            }
            0x6 => {
                // No thermal/power management to offer.
                e.eax = 0;
                e.ecx &= 1; // keep only "hardware coordination feedback"
            }
            0x7 if e.index == 0 => {
                e.edx &= !(1 << LEAF7_EDX_ARCH_CAPABILITIES_BIT);
            }
            0xa => {
                // No PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb => {
                // Extended topology: level 0 = SMT (1 thread per core),
                // level 1 = core (count cores per package).
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_shift;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n & 0xff;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of physical cores - 1 and APIC ID size.
                e.ecx = (e.ecx & !0xf0ff) | (core_shift << 12) | (count - 1);
            }
            0x4000_0001 if p.no_pv_hypercalls => {
                e.eax &= !KVM_FEATURES_HYPERCALL;
            }
            0x8000_001e => {
                // AMD: extended APIC ID, one thread per core, one node.
                e.eax = id;
                e.ebx = (e.ebx & !0xffff) | id;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(es: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *es.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x1, 0, 0x00a2_0f12, 0xff_ff_00_00, 0x0, 0x1000_0000),
            entry(0x4, 0, (1 << 5) | 0x1, 0, 0, 0),
            entry(0x4, 3, (3 << 5) | 0x3, 0, 0, 0),
            entry(0x7, 0, 0, 0, 0, 1 << 29 | 1 << 4),
            entry(0x7, 1, 0, 0, 0, 1 << 29),
            entry(0xa, 0, 0x0703_0105, 0, 0, 0x603),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 8, 0x201, 7),
            entry(0x8000_0008, 0, 0x3030, 0, 0x700f, 0),
            entry(0x8000_0001, 0, 1, 2, 3, 4),
        ]
    }

    #[test]
    fn leaf1_topology_and_hypervisor_bit() {
        let mut es = sample();
        filter(
            &mut es,
            CpuidParams {
                vcpu_id: 1,
                vcpu_count: 2,
                tsc_deadline: true,
                no_pv_hypercalls: false,
            },
        );
        let e = find(&es, 1, 0);
        assert_eq!(e.ebx >> 24, 1, "APIC ID");
        assert_eq!((e.ebx >> 16) & 0xff, 2, "logical count");
        assert_eq!((e.ebx >> 8) & 0xff, 8, "clflush");
        assert_ne!(e.ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(e.ecx & (1 << 24), 0, "tsc deadline");
        assert_ne!(e.edx & (1 << 28), 0, "HTT with 2 vCPUs");
        assert_eq!(e.eax, 0x00a2_0f12, "family/model untouched");
    }

    #[test]
    fn single_vcpu_clears_htt_and_tsc_deadline_when_absent() {
        let mut es = sample();
        filter(
            &mut es,
            CpuidParams {
                vcpu_id: 0,
                vcpu_count: 1,
                tsc_deadline: false,
                no_pv_hypercalls: false,
            },
        );
        let e = find(&es, 1, 0);
        assert_eq!(e.edx & (1 << 28), 0);
        assert_eq!(e.ecx & (1 << 24), 0);
        assert_eq!((e.ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn arch_capabilities_hidden_only_in_subleaf0() {
        let mut es = sample();
        filter(
            &mut es,
            CpuidParams {
                vcpu_id: 0,
                vcpu_count: 1,
                tsc_deadline: false,
                no_pv_hypercalls: false,
            },
        );
        let e = find(&es, 7, 0);
        assert_eq!(e.edx & (1 << 29), 0);
        assert_ne!(e.edx & (1 << 4), 0, "other bits kept");
        assert_ne!(find(&es, 7, 1).edx & (1 << 29), 0, "subleaf 1 untouched");
    }

    #[test]
    fn kvm_hypercall_features_hidden_on_request() {
        let mut es = vec![entry(0x4000_0001, 0, 0x01ff_ffff, 0, 0, 0)];
        let p = CpuidParams {
            vcpu_id: 0,
            vcpu_count: 2,
            tsc_deadline: false,
            no_pv_hypercalls: false,
        };
        filter(&mut es, p);
        assert_eq!(es[0].eax, 0x01ff_ffff, "kept by default");
        filter(
            &mut es,
            CpuidParams {
                no_pv_hypercalls: true,
                ..p
            },
        );
        assert_eq!(es[0].eax & (1 << 11), 0, "PV send-IPI");
        assert_eq!(es[0].eax & (1 << 9), 0, "PV TLB flush");
        assert_eq!(es[0].eax & (1 << 13), 0, "PV sched yield");
        assert_eq!(es[0].eax & (1 << 7), 0, "PV unhalt (PV spinlocks)");
        assert_ne!(es[0].eax & (1 << 3), 0, "kvmclock kept");
    }

    #[test]
    fn pmu_hidden() {
        let mut es = sample();
        filter(
            &mut es,
            CpuidParams {
                vcpu_id: 0,
                vcpu_count: 1,
                tsc_deadline: false,
                no_pv_hypercalls: false,
            },
        );
        let e = find(&es, 0xa, 0);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
    }

    #[test]
    fn extended_topology_leaf() {
        let mut es = sample();
        filter(
            &mut es,
            CpuidParams {
                vcpu_id: 1,
                vcpu_count: 2,
                tsc_deadline: false,
                no_pv_hypercalls: false,
            },
        );
        let smt = find(&es, 0xb, 0);
        let core = find(&es, 0xb, 1);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8 & 0xff, smt.edx),
            (0, 1, 1, 1)
        );
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8 & 0xff, core.edx),
            (1, 2, 2, 1)
        );
    }

    #[test]
    fn cache_and_amd_core_counts() {
        let mut es = sample();
        filter(
            &mut es,
            CpuidParams {
                vcpu_id: 0,
                vcpu_count: 2,
                tsc_deadline: false,
                no_pv_hypercalls: false,
            },
        );
        let l1 = find(&es, 4, 0);
        let l3 = find(&es, 4, 3);
        assert_eq!(l1.eax >> 26, 1);
        assert_eq!((l1.eax >> 14) & 0xfff, 0, "L1 not shared");
        assert_eq!((l3.eax >> 14) & 0xfff, 1, "L3 shared by both");
        assert_eq!(l3.eax & 0x3fff, (3 << 5) | 3, "cache type/level kept");
        let amd = find(&es, 0x8000_0008, 0);
        assert_eq!(amd.ecx & 0xff, 1);
        assert_eq!((amd.ecx >> 12) & 0xf, 1);
        assert_eq!(find(&es, 0x8000_0001, 0).ecx, 3, "unrelated leaf untouched");
    }
}
