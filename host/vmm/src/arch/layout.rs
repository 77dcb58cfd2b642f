//! Guest physical memory layout (all fixed addresses live here).

/// GDT (4 entries of 8 bytes).
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT (empty; the kernel loads its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// The zero page (`struct boot_params`), pointed to by %rsi at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack (grows down below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86 COMMAND_LINE_SIZE (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area: the MP table lives here. Low RAM ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy hole (kernel, initrd and the rest of RAM).
pub const HIMEM_START: u64 = 0x10_0000;
/// 32-bit MMIO gap: [3 GiB, 4 GiB). RAM above it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices: one 4 KiB window each, from here.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio-mmio devices (0-4 are legacy ISA: timer,
/// keyboard, cascade, COM2, COM1).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// IOAPIC pins (KVM's in-kernel IOAPIC has 24).
pub const IOAPIC_PINS: u32 = 24;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;

/// Guest RAM regions for `mem_bytes` of memory, skipping the MMIO gap.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_mmio_gap() {
        let r = ram_regions(4 << 30);
        assert_eq!(r, vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        let total: u64 = r.iter().map(|(_, l)| l).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let spans = [
            (BOOT_GDT_START, 32),
            (BOOT_IDT_START, 8),
            (ZERO_PAGE_START, 4096),
            (PML4_START, 4096),
            (PDPTE_START, 4096),
            (PDE_START, 4096),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in spans.iter().enumerate() {
            assert!(a.0 + a.1 <= EBDA_START);
            for b in &spans[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{a:?} overlaps {b:?}");
            }
        }
        const { assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 4096) };
        assert!(VIRTIO_MMIO_START >= MMIO_GAP_START && VIRTIO_MMIO_START < u64::from(IOAPIC_ADDR));
    }
}
