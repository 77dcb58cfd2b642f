//! The Linux zero page (`struct boot_params`): e820 map, command line and
//! initrd location, for the 64-bit boot protocol.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{
    ram_regions, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("too many e820 entries")]
    E820Full,
    #[error("guest memory of {0} bytes is too small (need more than 1 MiB)")]
    MemoryTooSmall(u64),
    #[error("writing the zero page: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdInfo {
    pub addr: u64,
    pub size: u64,
}

fn add_e820(p: &mut boot_params, addr: u64, size: u64, kind: u32) -> Result<(), Error> {
    let n = p.e820_entries as usize;
    if n >= p.e820_table.len() {
        return Err(Error::E820Full);
    }
    p.e820_table[n] = boot_e820_entry {
        addr,
        size,
        r#type: kind,
    };
    p.e820_entries += 1;
    Ok(())
}

/// Build the zero page for `mem_bytes` of RAM.
pub fn build(
    mem_bytes: u64,
    cmdline_len: usize,
    initrd: Option<InitrdInfo>,
) -> Result<boot_params, Error> {
    if mem_bytes <= HIMEM_START {
        return Err(Error::MemoryTooSmall(mem_bytes));
    }
    let mut p = boot_params::default();
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    p.hdr.header = KERNEL_HDR_MAGIC;
    p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_len.min(CMDLINE_MAX_SIZE - 1) as u32;
    if let Some(i) = initrd {
        p.hdr.ramdisk_image = i.addr as u32;
        p.hdr.ramdisk_size = i.size as u32;
    }
    // Low RAM up to the EBDA (which holds the MP table), then everything
    // from 1 MiB on, skipping the MMIO gap.
    add_e820(&mut p, 0, EBDA_START, E820_RAM)?;
    for (start, len) in ram_regions(mem_bytes) {
        let (s, l) = if start == 0 {
            (HIMEM_START, len - HIMEM_START)
        } else {
            (start, len)
        };
        add_e820(&mut p, s, l, E820_RAM)?;
    }
    Ok(p)
}

pub fn write(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), Error> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(Error::Write)
}

/// Highest page-aligned address at which an initrd of `size` bytes fits in
/// the first RAM region, above `kernel_end`.
pub fn initrd_addr(mem_bytes: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let low_end = ram_regions(mem_bytes)[0].1;
    let addr = low_end.checked_sub(size)? & !0xfff;
    (addr >= kernel_end).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_for_small_guest() {
        let p = build(128 << 20, 20, None).unwrap();
        assert_eq!(p.e820_entries, 2);
        let t = p.e820_table;
        assert_eq!(
            (t[0].addr, t[0].size, t[0].r#type),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(
            (t[1].addr, t[1].size, t[1].r#type),
            (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM)
        );
        let hdr = p.hdr;
        let (flag, magic, ptr, size, rd) = (
            hdr.boot_flag,
            hdr.header,
            hdr.cmd_line_ptr,
            hdr.cmdline_size,
            hdr.ramdisk_size,
        );
        assert_eq!(flag, 0xaa55);
        assert_eq!(magic, 0x5372_6448);
        assert_eq!(ptr as u64, CMDLINE_START);
        assert_eq!(size, 20);
        assert_eq!(rd, 0);
    }

    #[test]
    fn e820_skips_mmio_gap() {
        let p = build(5 << 30, 10, None).unwrap();
        assert_eq!(p.e820_entries, 3);
        let t = p.e820_table;
        assert_eq!(t[1].addr + t[1].size, 3 << 30);
        assert_eq!((t[2].addr, t[2].size), (4 << 30, 2 << 30));
        let ram: u64 = t[..3].iter().map(|e| e.size).sum();
        assert_eq!(ram, (5 << 30) - (HIMEM_START - EBDA_START));
    }

    #[test]
    fn initrd_recorded_and_placed_high() {
        let mem = 256u64 << 20;
        let addr = initrd_addr(mem, 32 << 20, 5000).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 5000 <= mem);
        let p = build(mem, 1, Some(InitrdInfo { addr, size: 5000 })).unwrap();
        let hdr = p.hdr;
        let (img, size) = (hdr.ramdisk_image, hdr.ramdisk_size);
        assert_eq!((img as u64, size), (addr, 5000));
        assert_eq!(
            initrd_addr(mem, 250 << 20, 10 << 20),
            None,
            "overlaps kernel"
        );
        assert_eq!(initrd_addr(1 << 20, 0, 2 << 20), None, "bigger than RAM");
    }

    #[test]
    fn tiny_memory_rejected() {
        assert!(matches!(
            build(1 << 20, 1, None),
            Err(Error::MemoryTooSmall(_))
        ));
    }

    #[test]
    fn zero_page_written_to_guest() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 21)]).unwrap();
        let p = build(64 << 20, 7, None).unwrap();
        write(&m, &p).unwrap();
        let back: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(back.e820_entries, 2);
        let magic: u16 = m.read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe)).unwrap();
        assert_eq!(magic, 0xaa55, "boot_flag at its documented offset");
    }
}
