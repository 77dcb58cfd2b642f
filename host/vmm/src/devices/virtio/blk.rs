//! virtio-blk backed by a raw image file (read-only or read-write).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    read_config_bytes, single_queue, ActivateError, Interrupt, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("disk image {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub const SECTOR_SIZE: u64 = 512;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
const QUEUE_SIZES: &[u16] = &[256];
/// Largest single request we accept (the driver never sends more).
const MAX_REQUEST_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("request shorter than its 16-byte header")]
    ShortHeader,
    #[error("no writable status byte")]
    NoStatus,
    #[error("sector {sector} + {len} bytes is beyond the disk ({capacity} bytes)")]
    OutOfRange {
        sector: u64,
        len: usize,
        capacity: u64,
    },
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(usize),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("request of {0} bytes is too large")]
    TooLarge(usize),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    #[error("I/O error: {0}")]
    Io(String),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// The image and its request semantics (no queue state).
pub struct Disk {
    file: File,
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
}

pub struct Block {
    disk: Disk,
    requests: u64,
    errors: u64,
    config: [u8; 8],
    active: Option<Active>,
}

struct Active {
    mem: GuestMemoryMmap,
    irq: Interrupt,
    queue: Queue,
}

impl Block {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, Error> {
        let err = |source| Error::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Self::from_file(file, len, read_only, &name))
    }

    pub fn from_file(file: File, len: u64, read_only: bool, id: &str) -> Self {
        let disk = Disk::new(file, len, read_only, id);
        Self {
            requests: 0,
            errors: 0,
            config: (disk.capacity / SECTOR_SIZE).to_le_bytes(),
            disk,
            active: None,
        }
    }

    fn process(&mut self) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        let mut used = false;
        while let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let len = match self.disk.handle_chain(&a.mem, chain) {
                Some((len, ok)) => {
                    self.errors += u64::from(!ok);
                    len
                }
                None => {
                    self.errors += 1;
                    0
                }
            };
            self.requests += 1;
            if a.queue.add_used(&a.mem, head, len).is_err() {
                tracing::warn!("virtio-blk: cannot add used entry");
            }
            used = true;
        }
        if used {
            a.irq.signal_used();
        }
    }
}

impl Disk {
    pub fn new(file: File, len: u64, read_only: bool, id: &str) -> Self {
        let capacity = len - len % SECTOR_SIZE;
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Self {
            file,
            capacity,
            read_only,
            id: idb,
        }
    }

    /// Execute one request chain; returns bytes written to the driver
    /// (data + status byte) and whether it succeeded, or None if there was
    /// no place for a status.
    pub fn handle_chain(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<(u32, bool)> {
        let mut reader = chain.clone().reader(mem).ok()?;
        let mut writer = chain.writer(mem).ok()?;
        let writable = writer.available_bytes();
        if writable == 0 {
            return None;
        }
        let mut status_w = writer.split_at(writable - 1).ok()?;
        let (status, data_len) = match self.execute(&mut reader, &mut writer, writable - 1) {
            Ok(n) => (S_OK, n),
            Err(e) => {
                tracing::debug!(error = %e, "virtio-blk request failed");
                (e.status(), 0)
            }
        };
        status_w.write_all(&[status]).ok()?;
        Some((data_len as u32 + 1, status == S_OK))
    }

    fn execute<R: Read, W: Write>(
        &self,
        reader: &mut R,
        writer: &mut W,
        writable: usize,
    ) -> Result<usize, RequestError> {
        let mut hdr = [0u8; 16];
        reader
            .read_exact(&mut hdr)
            .map_err(|_| RequestError::ShortHeader)?;
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
        match kind {
            T_IN => {
                let len = writable;
                let off = self.check_range(sector, len)?;
                let mut buf = vec![0u8; len];
                self.file
                    .read_exact_at(&mut buf, off)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                writer
                    .write_all(&buf)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                Ok(len)
            }
            T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let mut buf = Vec::new();
                reader
                    .take(MAX_REQUEST_BYTES as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                let off = self.check_range(sector, buf.len())?;
                self.file
                    .write_all_at(&buf, off)
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                Ok(0)
            }
            T_FLUSH => {
                if !self.read_only {
                    self.file
                        .sync_data()
                        .map_err(|e| RequestError::Io(e.to_string()))?;
                }
                Ok(0)
            }
            T_GET_ID => {
                let n = writable.min(ID_BYTES);
                writer
                    .write_all(&self.id[..n])
                    .map_err(|e| RequestError::Io(e.to_string()))?;
                Ok(n)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    fn check_range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        if len > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(len));
        }
        if !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::Unaligned(len));
        }
        let oor = RequestError::OutOfRange {
            sector,
            len,
            capacity: self.capacity,
        };
        let off = sector.checked_mul(SECTOR_SIZE).ok_or(oor.clone())?;
        let end = off.checked_add(len as u64).ok_or(oor.clone())?;
        if end > self.capacity {
            return Err(oor);
        }
        Ok(off)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        let ro = if self.disk.read_only {
            VIRTIO_BLK_F_RO
        } else {
            0
        };
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | ro
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        irq: Interrupt,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let queue = single_queue(queues)?;
        self.active = Some(Active { mem, irq, queue });
        Ok(())
    }
    fn queue_notify(&mut self, _index: u16) {
        self.process();
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn stats(&self) -> (&'static str, String) {
        (
            "virtio-blk",
            format!("requests={} errors={}", self.requests, self.errors),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_util::{self, TestQueue};
    use std::io::Seek;

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    fn disk(read_only: bool) -> (Block, File) {
        let mut f = tempfile::tempfile().unwrap();
        let mut content = vec![0u8; 8 * 512];
        for (i, b) in content.iter_mut().enumerate() {
            *b = (i / 512) as u8 + 1;
        }
        f.write_all(&content).unwrap();
        f.rewind().unwrap();
        let check = f.try_clone().unwrap();
        (
            Block::from_file(
                f,
                content.len() as u64,
                read_only,
                "disk-id-0123456789abcdef",
            ),
            check,
        )
    }

    fn req_hdr(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        test_util::write(mem, HDR, &h);
    }

    /// Run one request; returns (status, used len).
    fn run(b: &mut Block, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) -> (u8, u32) {
        let mut tq = TestQueue::new(mem, 0x1000);
        tq.add_chain(descs);
        let (irq, _) = test_util::irq();
        b.activate(mem.clone(), irq, vec![tq.queue()]).unwrap();
        b.queue_notify(0);
        assert_eq!(tq.used_idx(), 1);
        let (_, len) = tq.used(0);
        b.reset();
        (test_util::read(mem, STATUS, 1)[0], len)
    }

    #[test]
    fn read_sectors() {
        let mem = test_util::mem();
        let (mut b, _) = disk(false);
        req_hdr(&mem, T_IN, 2);
        let (st, len) = run(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
        );
        assert_eq!((st, len), (S_OK, 1025));
        let data = test_util::read(&mem, DATA, 1024);
        assert!(data[..512].iter().all(|&x| x == 3));
        assert!(data[512..].iter().all(|&x| x == 4));
    }

    #[test]
    fn write_then_flush() {
        let mem = test_util::mem();
        let (mut b, check) = disk(false);
        req_hdr(&mem, T_OUT, 7);
        test_util::write(&mem, DATA, &[0xee; 512]);
        let (st, len) = run(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!((st, len), (S_OK, 1));
        let mut back = [0u8; 512];
        check.read_exact_at(&mut back, 7 * 512).unwrap();
        assert_eq!(back, [0xee; 512]);
        req_hdr(&mem, T_FLUSH, 0);
        let (st, _) = run(&mut b, &mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(st, S_OK);
    }

    #[test]
    fn header_and_data_in_one_descriptor() {
        let mem = test_util::mem();
        let (mut b, check) = disk(false);
        let mut buf = vec![0u8; 16 + 512];
        buf[0..4].copy_from_slice(&T_OUT.to_le_bytes());
        buf[8..16].copy_from_slice(&1u64.to_le_bytes());
        buf[16..].fill(0x5a);
        test_util::write(&mem, HDR, &buf);
        let (st, _) = run(&mut b, &mem, &[(HDR, 528, false), (STATUS, 1, true)]);
        assert_eq!(st, S_OK);
        let mut back = [0u8; 512];
        check.read_exact_at(&mut back, 512).unwrap();
        assert_eq!(back, [0x5a; 512]);
    }

    #[test]
    fn get_id() {
        let mem = test_util::mem();
        let (mut b, _) = disk(true);
        req_hdr(&mem, T_GET_ID, 0);
        let (st, len) = run(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)],
        );
        assert_eq!((st, len), (S_OK, 21));
        assert_eq!(test_util::read(&mem, DATA, 20), b"disk-id-0123456789ab");
    }

    #[test]
    fn out_of_range_and_unaligned_rejected() {
        let mem = test_util::mem();
        let (mut b, _) = disk(false);
        req_hdr(&mem, T_IN, 7);
        let (st, len) = run(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
        );
        assert_eq!(
            (st, len),
            (S_IOERR, 1),
            "sector 7 + 2 sectors is past the end"
        );
        req_hdr(&mem, T_IN, u64::MAX / 2);
        let (st, _) = run(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        assert_eq!(st, S_IOERR, "overflowing offset");
        req_hdr(&mem, T_IN, 0);
        let (st, _) = run(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)],
        );
        assert_eq!(st, S_IOERR, "not a sector multiple");
    }

    #[test]
    fn read_only_disk_rejects_writes() {
        let mem = test_util::mem();
        let (mut b, check) = disk(true);
        assert_ne!(b.features() & VIRTIO_BLK_F_RO, 0);
        req_hdr(&mem, T_OUT, 0);
        test_util::write(&mem, DATA, &[0xff; 512]);
        let (st, _) = run(
            &mut b,
            &mem,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(st, S_IOERR);
        let mut back = [0u8; 512];
        check.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, [1; 512], "image unchanged");
        req_hdr(&mem, T_FLUSH, 0);
        let (st, _) = run(&mut b, &mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(st, S_OK, "flush on a read-only disk is a no-op");
    }

    #[test]
    fn unknown_type_and_short_header() {
        let mem = test_util::mem();
        let (mut b, _) = disk(false);
        req_hdr(&mem, 99, 0);
        let (st, _) = run(&mut b, &mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(st, S_UNSUPP);
        let (st, _) = run(&mut b, &mem, &[(HDR, 8, false), (STATUS, 1, true)]);
        assert_eq!(st, S_IOERR);
        // No writable status byte at all: the chain is returned unused.
        let (_, len) = run(&mut b, &mem, &[(HDR, 16, false)]);
        assert_eq!(len, 0);
    }

    #[test]
    fn config_reports_capacity_in_sectors() {
        let (b, _) = disk(false);
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 8);
        let mut beyond = [9u8; 4];
        b.read_config(8, &mut beyond);
        assert_eq!(beyond, [0; 4]);
    }
}
