//! Intel MultiProcessor table (MP spec 1.4): tells a kernel without ACPI
//! about the vCPUs, the IOAPIC and how ISA IRQs are wired to it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} vCPUs do not fit in an MP table (max 254)")]
    TooManyCpus(u8),
    #[error("writing the MP table: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const MP_IRQDIR_DEFAULT: u16 = 0;
const BUS_ISA: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Serialise the floating pointer + configuration table for `cpus` vCPUs,
/// to be placed at `base`.
pub fn build(cpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    if cpus == 0 || cpus > 254 {
        return Err(Error::TooManyCpus(cpus));
    }
    let table_addr = base + 16;
    let ioapic_id = cpus;

    // Entries after the 44-byte header.
    let mut entries = Vec::new();
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[1, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..IOAPIC_PINS as u8 {
        entries.push(3);
        entries.push(MP_IRQ_INT);
        entries.extend_from_slice(&MP_IRQDIR_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[BUS_ISA, irq, ioapic_id, irq]);
    }
    for (kind, dest, lint) in [(MP_IRQ_EXTINT, 0u8, 0u8), (MP_IRQ_NMI, 0xff, 1)] {
        entries.push(4);
        entries.push(kind);
        entries.extend_from_slice(&MP_IRQDIR_DEFAULT.to_le_bytes());
        entries.extend_from_slice(&[BUS_ISA, 0, dest, lint]);
    }
    let entry_count = cpus as u16 + 2 + IOAPIC_PINS as u16 + 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMPOD   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // oem table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // oem table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MPC_SPEC);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]);
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    Ok(mpf)
}

pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), Error> {
    let bytes = build(cpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_lengths() {
        for cpus in [1u8, 2, 8] {
            let b = build(cpus, EBDA_START).unwrap();
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let t = &b[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(sum(t), 0, "table checksum");
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count as usize, cpus as usize + 2 + 24 + 2);
            assert_eq!(len, 44 + 20 * cpus as usize + 8 * (2 + 24 + 2));
            // First CPU is the boot processor, others only enabled.
            assert_eq!(t[44 + 3], CPU_ENABLED | CPU_BOOTPROCESSOR);
            if cpus > 1 {
                assert_eq!(t[44 + 20 + 1], 1, "apic id");
                assert_eq!(t[44 + 20 + 3], CPU_ENABLED);
            }
            assert!(b.len() as u64 <= 0xa0000 - EBDA_START, "fits in the EBDA");
        }
    }

    #[test]
    fn bad_cpu_counts() {
        assert!(build(0, EBDA_START).is_err());
        assert!(build(255, EBDA_START).is_err());
    }
}
