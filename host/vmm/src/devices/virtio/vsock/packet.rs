//! virtio-vsock packets: the 44-byte little-endian header and moving
//! packets between descriptor chains and host buffers. A packet's header
//! and data may share one descriptor (Linux >= 6.2) or be split across
//! several; both arrive through the same `Reader`/`Writer` streams.

use std::io::{Read, Write};

pub const HDR_LEN: usize = 44;
/// Largest payload we accept from the guest in one packet (the Linux
/// driver sends at most 64 KiB).
pub const MAX_PKT_DATA: u32 = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

pub const HOST_CID: u64 = 2;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// A packet the guest sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    /// Payload (only RW packets carry one).
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("chain holds {0} readable bytes, less than a 44-byte header")]
    ShortHeader(usize),
    #[error("header says {len} data bytes but the chain holds {avail}")]
    Truncated { len: u32, avail: usize },
    #[error("data length {0} exceeds the 64 KiB packet limit")]
    TooLong(u32),
    #[error("reading the packet: {0}")]
    Read(String),
}

/// Read one guest packet. `avail` is how many readable bytes the chain has.
/// Data beyond `hdr.len` is ignored; non-RW packets carry no data.
pub fn read_tx<R: Read>(reader: &mut R, avail: usize) -> Result<TxPacket, PacketError> {
    if avail < HDR_LEN {
        return Err(PacketError::ShortHeader(avail));
    }
    let mut hb = [0u8; HDR_LEN];
    reader
        .read_exact(&mut hb)
        .map_err(|e| PacketError::Read(e.to_string()))?;
    let hdr = Header::from_bytes(&hb);
    if hdr.op != OP_RW {
        return Ok(TxPacket {
            hdr,
            data: Vec::new(),
        });
    }
    if hdr.len > MAX_PKT_DATA {
        return Err(PacketError::TooLong(hdr.len));
    }
    if (hdr.len as usize) > avail - HDR_LEN {
        return Err(PacketError::Truncated {
            len: hdr.len,
            avail: avail - HDR_LEN,
        });
    }
    let mut data = vec![0u8; hdr.len as usize];
    reader
        .read_exact(&mut data)
        .map_err(|e| PacketError::Read(e.to_string()))?;
    Ok(TxPacket { hdr, data })
}

/// Write a packet for the guest; the caller checked it fits.
pub fn write_rx<W: Write>(writer: &mut W, hdr: &Header, data: &[u8]) -> std::io::Result<usize> {
    writer.write_all(&hdr.to_bytes())?;
    writer.write_all(data)?;
    Ok(HDR_LEN + data.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(op: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trip_and_layout() {
        let h = hdr(OP_RW, 5);
        let b = h.to_bytes();
        assert_eq!(Header::from_bytes(&b), h);
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
    }

    #[test]
    fn rw_packet_with_data() {
        let mut bytes = hdr(OP_RW, 5).to_bytes().to_vec();
        bytes.extend_from_slice(b"hello, trailing");
        let p = read_tx(&mut &bytes[..], bytes.len()).unwrap();
        assert_eq!(p.data, b"hello");
    }

    #[test]
    fn control_packets_carry_no_data() {
        let mut bytes = hdr(OP_REQUEST, 9).to_bytes().to_vec();
        bytes.extend_from_slice(b"ignored!!");
        let p = read_tx(&mut &bytes[..], bytes.len()).unwrap();
        assert!(p.data.is_empty());
        assert_eq!(p.hdr.op, OP_REQUEST);
    }

    #[test]
    fn malformed_lengths() {
        let b = hdr(OP_RW, 10).to_bytes();
        assert_eq!(
            read_tx(&mut &b[..20], 20),
            Err(PacketError::ShortHeader(20))
        );
        let mut bytes = b.to_vec();
        bytes.extend_from_slice(b"abc");
        assert_eq!(
            read_tx(&mut &bytes[..], bytes.len()),
            Err(PacketError::Truncated { len: 10, avail: 3 })
        );
        let huge = hdr(OP_RW, MAX_PKT_DATA + 1).to_bytes();
        assert_eq!(
            read_tx(&mut &huge[..], 1 << 20),
            Err(PacketError::TooLong(MAX_PKT_DATA + 1))
        );
    }

    #[test]
    fn write_rx_layout() {
        let mut out = Vec::new();
        let n = write_rx(&mut out, &hdr(OP_RW, 3), b"abc").unwrap();
        assert_eq!(n, 47);
        assert_eq!(&out[44..], b"abc");
    }
}
