//! Device-level vsock tests: real descriptor chains in guest memory, real
//! unix sockets on the host side.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use virtio_queue::Queue;

use super::connection::{State, BUF_ALLOC};
use super::packet::*;
use super::Vsock;
use crate::devices::virtio::test_util::{self, TestQueue};
use crate::devices::virtio::VirtioDevice;

const GUEST_CID: u64 = 3;
const RXQ: u64 = 0x1000;
const TXQ: u64 = 0x4000;
const EVQ: u64 = 0x7000;
const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x20_0000;

pub(super) struct Rig<'a> {
    mem: &'a vm_memory::GuestMemoryMmap,
    pub(super) dev: Vsock,
    rx: TestQueue<'a>,
    tx: TestQueue<'a>,
    rx_seen: u16,
    tx_slot: u64,
    rx_free: std::collections::VecDeque<u16>,
    dir: tempfile::TempDir,
}

impl<'a> Rig<'a> {
    pub(super) fn new(mem: &'a vm_memory::GuestMemoryMmap) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dev = Vsock::new(GUEST_CID, &dir.path().join("v.sock")).unwrap();
        let mut r = Rig {
            mem,
            dev,
            rx: TestQueue::new(mem, RXQ),
            tx: TestQueue::new(mem, TXQ),
            rx_seen: 0,
            tx_slot: 0,
            rx_free: (0..16).collect(),
            dir,
        };
        let ev = TestQueue::new(mem, EVQ);
        let (irq, _) = test_util::irq();
        let queues: Vec<Queue> = vec![r.rx.queue(), r.tx.queue(), ev.queue()];
        r.dev.activate(mem.clone(), irq, queues).unwrap();
        r
    }

    fn uds(&self) -> std::path::PathBuf {
        self.dir.path().join("v.sock")
    }

    /// Post one 4 KiB RX buffer.
    pub(super) fn post_rx(&mut self) {
        // Descriptor i always describes the buffer at RX_BUF + i * 4 KiB;
        // only free ones (returned through the used ring) are reposted.
        let Some(slot) = self.rx_free.pop_front() else {
            return; // all 16 are with the device already
        };
        let addr = RX_BUF + u64::from(slot) * 0x1000;
        self.rx.add_chain_at(slot, &[(addr, 0x1000, true)]);
        self.dev.queue_notify(0);
    }

    /// Packets the device put into the RX queue since last time.
    pub(super) fn take_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx() {
            let (id, len) = self.rx.used(self.rx_seen % 16);
            let addr = RX_BUF + u64::from(id) * 0x1000;
            let bytes = test_util::read(self.mem, addr, len as usize);
            let hdr = Header::from_bytes(bytes[..HDR_LEN].try_into().unwrap());
            out.push((hdr, bytes[HDR_LEN..].to_vec()));
            self.rx_free.push_back(id as u16);
            self.rx_seen += 1;
        }
        out
    }

    /// Send a packet from the guest, laid out as `descs` lengths (header
    /// and data may share a descriptor or be split anywhere).
    fn send(&mut self, bytes: &[u8], split: &[usize]) {
        let mut descs = Vec::new();
        let mut off = 0;
        for &len in split.iter().chain(std::iter::once(
            &(bytes.len() - split.iter().sum::<usize>()),
        )) {
            if len == 0 {
                continue;
            }
            let addr = TX_BUF + self.tx_slot * 0x2_0000 + off as u64 * 2;
            test_util::write(self.mem, addr, &bytes[off..off + len]);
            descs.push((addr, len as u32, false));
            off += len;
        }
        self.tx_slot = (self.tx_slot + 1) % 8;
        self.tx.add_chain(&descs);
        self.dev.queue_notify(1);
    }

    pub(super) fn send_pkt(&mut self, op: u16, src_port: u32, dst_port: u32, data: &[u8]) {
        let h = guest_hdr(op, src_port, dst_port, data.len() as u32);
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        self.send(&bytes, &[]);
    }

    /// Let the back-end notice host socket activity.
    pub(super) fn poll(&mut self) {
        for _ in 0..20 {
            self.dev.backend_event();
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn guest_hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

/// Host connects and asks for guest port `port`; returns the stream and
/// the REQUEST the guest got.
pub(super) fn host_connect(rig: &mut Rig, port: u32) -> (UnixStream, Header) {
    let mut s = UnixStream::connect(rig.uds()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    for _ in 0..8 {
        rig.post_rx();
    }
    rig.poll();
    let pkts = rig.take_rx();
    assert_eq!(pkts.len(), 1, "{pkts:?}");
    let req = pkts[0].0;
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, GUEST_CID, port)
    );
    (s, req)
}

pub(super) fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn host_connect_accepted_then_data_both_ways() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    rig.send_pkt(OP_RESPONSE, 1024, req.src_port, &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", req.src_port));

    // Host -> guest.
    s.write_all(b"ping").unwrap();
    rig.poll();
    let pkts = rig.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RW);
    assert_eq!(pkts[0].1, b"ping");
    assert_eq!(pkts[0].0.buf_alloc, BUF_ALLOC);

    // Guest -> host, header and data in one descriptor.
    rig.send_pkt(OP_RW, 1024, req.src_port, b"pong");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    // Split: header alone, then the data in two pieces.
    let mut bytes = guest_hdr(OP_RW, 1024, req.src_port, 6).to_bytes().to_vec();
    bytes.extend_from_slice(b"abcdef");
    rig.send(&bytes, &[HDR_LEN, 2]);
    let mut buf = [0u8; 6];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"abcdef");
    // Header itself split across descriptors.
    let mut bytes = guest_hdr(OP_RW, 1024, req.src_port, 3).to_bytes().to_vec();
    bytes.extend_from_slice(b"xyz");
    rig.send(&bytes, &[10, 30]);
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"xyz");
    // 13 bytes of 256 KiB: no standalone credit update; the next data
    // packet to the guest carries fwd_cnt 13.
    assert!(
        !rig.take_rx().iter().any(|p| p.0.op == OP_CREDIT_UPDATE),
        "no update while the guest has plenty of credit"
    );
    s.write_all(b"!").unwrap();
    rig.post_rx();
    rig.poll();
    let pkts = rig.take_rx();
    let rw = pkts
        .iter()
        .find(|p| p.0.op == OP_RW)
        .expect("data to the guest");
    assert_eq!(rw.0.fwd_cnt, 13, "credit rides on the data header");

    // Host closes: guest gets SHUTDOWN(SEND); guest closes: RST, removed.
    drop(s);
    rig.poll();
    let pkts = rig.take_rx();
    assert!(
        pkts.iter()
            .any(|p| p.0.op == OP_SHUTDOWN && p.0.flags == SHUTDOWN_SEND),
        "{pkts:?}"
    );
    let mut sd = guest_hdr(OP_SHUTDOWN, 1024, req.src_port, 0);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    rig.send(&sd.to_bytes(), &[]);
    let pkts = rig.take_rx();
    assert!(pkts.iter().any(|p| p.0.op == OP_RST), "{pkts:?}");
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}

#[test]
fn host_connect_refused_by_guest_closes_stream() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 4000);
    rig.send_pkt(OP_RST, 4000, req.src_port, &[]);
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "EOF, no OK line");
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}

#[test]
fn bad_connect_lines_are_closed() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    for line in ["HELLO 5\n", "CONNECT x\n", "CONNECT 99999999999\n"] {
        let mut s = UnixStream::connect(rig.uds()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        rig.poll();
        let mut buf = [0u8; 4];
        assert_eq!(s.read(&mut buf).unwrap(), 0, "{line:?} closed");
    }
    let mut s = UnixStream::connect(rig.uds()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(&[b'A'; 64]).unwrap();
    rig.poll();
    let mut buf = [0u8; 4];
    // Closed with unread bytes: EOF or a reset, never data.
    match s.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "over-long line closed"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    post_and_expect_nothing(&mut rig);
}

fn post_and_expect_nothing(rig: &mut Rig) {
    rig.post_rx();
    rig.poll();
    assert!(rig.take_rx().is_empty());
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}

#[test]
fn guest_connect_to_host_listener_and_refused() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    for _ in 0..4 {
        rig.post_rx();
    }
    let listener = UnixListener::bind(format!("{}_5000", rig.uds().display())).unwrap();
    rig.send_pkt(OP_REQUEST, 777, 5000, &[]);
    let (mut s, _) = listener.accept().unwrap();
    let pkts = rig.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RESPONSE);
    assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (5000, 777));
    rig.send_pkt(OP_RW, 777, 5000, b"hi host");
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hi host");
    s.write_all(b"hi guest").unwrap();
    rig.poll();
    let pkts = rig.take_rx();
    assert!(
        pkts.iter().any(|p| p.0.op == OP_RW && p.1 == b"hi guest"),
        "{pkts:?}"
    );

    // Nobody listens on port 5001: RST.
    rig.send_pkt(OP_REQUEST, 778, 5001, &[]);
    let pkts = rig.take_rx();
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.op, OP_RST);
    assert_eq!(pkts[0].0.dst_port, 778);
}

#[test]
fn malformed_and_unknown_packets() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    for _ in 0..8 {
        rig.post_rx();
    }
    // Shorter than a header: dropped, no reply.
    rig.send(&[0u8; 20], &[]);
    assert!(rig.take_rx().is_empty());
    // Length beyond the chain: dropped.
    let mut bytes = guest_hdr(OP_RW, 1, 2, 100).to_bytes().to_vec();
    bytes.extend_from_slice(b"short");
    rig.send(&bytes, &[]);
    assert!(rig.take_rx().is_empty());
    // Absurd length: dropped.
    rig.send(&guest_hdr(OP_RW, 1, 2, u32::MAX).to_bytes(), &[]);
    assert!(rig.take_rx().is_empty());
    // Wrong source CID (spoofing): dropped.
    let mut h = guest_hdr(OP_REQUEST, 1, 2, 0);
    h.src_cid = 99;
    rig.send(&h.to_bytes(), &[]);
    assert!(rig.take_rx().is_empty());
    // Unknown op on no connection: RST.
    rig.send(&guest_hdr(42, 10, 20, 0).to_bytes(), &[]);
    let p = rig.take_rx();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].0.op, p[0].0.src_port, p[0].0.dst_port),
        (OP_RST, 20, 10)
    );
    // Unsupported socket type (SEQPACKET = 2): RST.
    let mut h = guest_hdr(OP_REQUEST, 11, 21, 0);
    h.type_ = 2;
    rig.send(&h.to_bytes(), &[]);
    assert_eq!(rig.take_rx()[0].0.op, OP_RST);
    // RST for nothing: ignored (never answer a RST with a RST).
    rig.send(&guest_hdr(OP_RST, 12, 22, 0).to_bytes(), &[]);
    assert!(rig.take_rx().is_empty());
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}

#[test]
fn unknown_op_on_established_connection_resets_it() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    rig.send_pkt(OP_RESPONSE, 1024, req.src_port, &[]);
    read_line(&mut s);
    rig.send(&guest_hdr(99, 1024, req.src_port, 0).to_bytes(), &[]);
    let p = rig.take_rx();
    assert!(p.iter().any(|p| p.0.op == OP_RST), "{p:?}");
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "host stream closed");
}

#[test]
fn guest_credit_limits_host_to_guest_data() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    // The guest accepts with only 10 bytes of buffer.
    let mut resp = guest_hdr(OP_RESPONSE, 1024, req.src_port, 0);
    resp.buf_alloc = 10;
    rig.send(&resp.to_bytes(), &[]);
    read_line(&mut s);
    s.write_all(b"0123456789ABCDEF").unwrap();
    rig.poll();
    let p = rig.take_rx();
    let data: Vec<u8> = p
        .iter()
        .filter(|p| p.0.op == OP_RW)
        .flat_map(|p| p.1.clone())
        .collect();
    assert_eq!(data, b"0123456789", "only the credit's worth");
    assert!(p.iter().any(|p| p.0.op == OP_CREDIT_REQUEST), "{p:?}");
    // Guest consumed everything: credit update frees the rest.
    let mut up = guest_hdr(OP_CREDIT_UPDATE, 1024, req.src_port, 0);
    up.buf_alloc = 10;
    up.fwd_cnt = 10;
    rig.send(&up.to_bytes(), &[]);
    rig.poll();
    let p = rig.take_rx();
    let data: Vec<u8> = p
        .iter()
        .filter(|p| p.0.op == OP_RW)
        .flat_map(|p| p.1.clone())
        .collect();
    assert_eq!(data, b"ABCDEF");
}

#[test]
fn guest_exceeding_our_credit_is_reset() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    rig.send_pkt(OP_RESPONSE, 1024, req.src_port, &[]);
    read_line(&mut s);
    // Host never reads: fill the socket buffer and then our buffer.
    let chunk = vec![7u8; 60 * 1024];
    let mut sent = 0usize;
    let mut reset = false;
    while sent < 8 << 20 {
        rig.send_pkt(OP_RW, 1024, req.src_port, &chunk);
        sent += chunk.len();
        let pkts = rig.take_rx();
        if pkts.iter().any(|p| p.0.op == OP_RST) {
            reset = true;
            break;
        }
        // Give back as many RX buffers as were used.
        for _ in 0..pkts.len() {
            rig.post_rx();
        }
    }
    assert!(reset, "a guest ignoring credit gets reset");
    assert!(
        sent as u64 > u64::from(BUF_ALLOC),
        "not before the credit ran out"
    );
}

#[test]
fn host_connect_times_out_when_guest_never_answers() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    assert_eq!(
        rig.dev.muxer().state_of(req.src_port, 1024),
        Some(State::Connecting)
    );
    // Pretend the deadline passed.
    rig.dev.muxer.expire_connects_for_test();
    rig.dev.tick();
    let p = rig.take_rx();
    assert!(
        p.iter().any(|p| p.0.op == OP_RST),
        "guest told to forget it: {p:?}"
    );
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}

#[test]
fn device_reset_drops_connections() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    rig.send_pkt(OP_RESPONSE, 1024, req.src_port, &[]);
    read_line(&mut s);
    rig.dev.reset();
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}

#[test]
fn rsts_for_a_guest_that_posts_no_rx_buffers_are_bounded() {
    use super::muxer::{Muxer, MAX_ORPHAN_RSTS};
    let dir = tempfile::tempdir().unwrap();
    let mut m = Muxer::new(GUEST_CID, &dir.path().join("v.sock")).unwrap();
    // Garbage to ports nobody listens on, far more than the cap.
    for i in 0..(MAX_ORPHAN_RSTS as u32 * 4) {
        m.on_guest_packet(TxPacket {
            hdr: guest_hdr(42, 5000 + i, 6000, 0),
            data: Vec::new(),
        });
    }
    let mut rsts = Vec::new();
    while let Some((h, d)) = m.next_rx(4096) {
        assert!(d.is_empty());
        rsts.push(h);
    }
    assert_eq!(rsts.len(), MAX_ORPHAN_RSTS);
    assert!(rsts.iter().all(|h| h.op == OP_RST));
    // The oldest are kept, in order.
    assert_eq!((rsts[0].dst_port, rsts[1].dst_port), (5000, 5001));
    assert!(m
        .stats()
        .contains(&format!("rsts_dropped={}", MAX_ORPHAN_RSTS * 3)));
    // Once drained, new garbage is answered again.
    m.on_guest_packet(TxPacket {
        hdr: guest_hdr(42, 7000, 6000, 0),
        data: Vec::new(),
    });
    assert_eq!(m.next_rx(4096).map(|(h, _)| h.dst_port), Some(7000));
}

/// A host listener with a backlog of 1 that never accepts.
fn stuck_listener(path: &std::path::Path) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let l = UnixListener::bind(path).unwrap();
    // SAFETY: listen(2) on a listening socket we own, to shrink its backlog.
    assert_eq!(
        unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 1) },
        0
    );
    let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
    // SAFETY: we own `fd` (taken from the listener above).
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

#[test]
fn guest_connects_to_a_host_listener_that_never_accepts_do_not_block() {
    use super::muxer::Muxer;
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let mut m = Muxer::new(GUEST_CID, &uds).unwrap();
    let _l = stuck_listener(&dir.path().join("v.sock_5000"));
    // A blocking connect(2) would hang here once the backlog is full.
    for port in 0..16 {
        m.on_guest_packet(TxPacket {
            hdr: guest_hdr(OP_REQUEST, 900 + port, 5000, 0),
            data: Vec::new(),
        });
    }
    let mut ops = Vec::new();
    while let Some((h, _)) = m.next_rx(4096) {
        ops.push(h.op);
    }
    let responses = ops.iter().filter(|&&o| o == OP_RESPONSE).count();
    let rsts = ops.iter().filter(|&&o| o == OP_RST).count();
    assert!(responses >= 1, "{ops:?}");
    assert!(rsts >= 1, "a full backlog is refused: {ops:?}");
    assert_eq!(responses + rsts, 16, "{ops:?}");
    assert_eq!(m.connection_count(), responses);
}

/// Guest data the host has not read yet when the guest closes: pushed
/// `bytes` (within credit) while the host reads nothing.
fn guest_sends_unread(rig: &mut Rig, guest_port: u32, host_port: u32, bytes: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    for chunk in data.chunks(60 * 1024) {
        rig.send_pkt(OP_RW, guest_port, host_port, chunk);
    }
    assert!(
        rig.dev
            .muxer()
            .connection(host_port, guest_port)
            .unwrap()
            .tx_buffered()
            > 0,
        "the host socket is full, data waits in the muxer"
    );
    data
}

fn full_shutdown(rig: &mut Rig, guest_port: u32, host_port: u32) {
    let mut sd = guest_hdr(OP_SHUTDOWN, guest_port, host_port, 0);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    rig.send(&sd.to_bytes(), &[]);
}

#[test]
fn guest_close_delivers_buffered_data_before_the_rst() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    rig.send_pkt(OP_RESPONSE, 1024, req.src_port, &[]);
    read_line(&mut s);
    let data = guest_sends_unread(&mut rig, 1024, req.src_port, 240 * 1024);
    full_shutdown(&mut rig, 1024, req.src_port);
    assert!(
        !rig.take_rx().iter().any(|p| p.0.op == OP_RST),
        "no RST while data is undelivered"
    );
    // The guest gives up waiting and resets: the data still arrives.
    rig.send_pkt(OP_RST, 1024, req.src_port, &[]);
    assert_eq!(rig.dev.muxer().connection_count(), 1, "still draining");
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    for _ in 0..50 {
        rig.poll();
        if rig.dev.muxer().connection_count() == 0 {
            break;
        }
    }
    let got = reader.join().unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "every byte, in order");
    assert_eq!(
        rig.dev.muxer().connection_count(),
        0,
        "removed once drained"
    );
    assert!(
        !rig.take_rx().iter().any(|p| p.0.op == OP_RST),
        "no RST to a guest that already reset"
    );
}

#[test]
fn drained_close_ends_with_an_rst_to_the_guest() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    rig.send_pkt(OP_RESPONSE, 1024, req.src_port, &[]);
    read_line(&mut s);
    let data = guest_sends_unread(&mut rig, 1024, req.src_port, 250 * 1024);
    full_shutdown(&mut rig, 1024, req.src_port);
    let mut got = vec![0u8; data.len()];
    let reader = std::thread::spawn(move || {
        s.read_exact(&mut got).unwrap();
        got
    });
    let mut rst = false;
    for _ in 0..50 {
        rig.poll();
        rig.post_rx();
        if rig.take_rx().iter().any(|p| p.0.op == OP_RST) {
            rst = true;
            break;
        }
    }
    assert!(reader.join().unwrap() == data);
    assert!(rst, "the guest's close completes with our RST");
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}

#[test]
fn guest_half_close_gives_host_eof_and_keeps_the_other_direction() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    rig.send_pkt(OP_RESPONSE, 1024, req.src_port, &[]);
    read_line(&mut s);
    rig.send_pkt(OP_RW, 1024, req.src_port, b"last words");
    let mut sd = guest_hdr(OP_SHUTDOWN, 1024, req.src_port, 0);
    sd.flags = SHUTDOWN_SEND;
    rig.send(&sd.to_bytes(), &[]);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last words", "data, then EOF");
    // Host → guest still flows; socket events after the shutdown (which
    // itself wakes the socket) are handled once, not in a loop.
    for round in 0..3 {
        s.write_all(format!("reply {round}").as_bytes()).unwrap();
        rig.post_rx();
        rig.poll();
        let pkts = rig.take_rx();
        assert!(
            pkts.iter()
                .any(|p| p.0.op == OP_RW && p.1 == format!("reply {round}").as_bytes()),
            "{pkts:?}"
        );
    }
    assert_eq!(rig.dev.muxer().connection_count(), 1);
}

#[test]
fn an_owed_rst_survives_further_guest_packets() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    rig.send_pkt(OP_RESPONSE, 1024, req.src_port, &[]);
    read_line(&mut s);
    // An unknown op resets the connection (RST owed) and the guest's next
    // packet for it is in the same TX batch, handled before the RX pass
    // that would carry the RST. (A later packet would get an orphan RST
    // anyway; this one is the last.)
    for (slot, (op, data)) in [(99u16, &b""[..]), (OP_RW, &b"late"[..])]
        .iter()
        .enumerate()
    {
        let h = guest_hdr(*op, 1024, req.src_port, data.len() as u32);
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        let addr = TX_BUF + 0x10_0000 + slot as u64 * 0x1000;
        test_util::write(&mem, addr, &bytes);
        rig.tx.add_chain(&[(addr, bytes.len() as u32, false)]);
    }
    rig.dev.queue_notify(1); // one TX batch: both packets before any RX pass
    rig.post_rx();
    let pkts = rig.take_rx();
    assert!(
        pkts.iter()
            .any(|p| p.0.op == OP_RST && p.0.dst_port == 1024),
        "the RST still reaches the guest: {pkts:?}"
    );
    assert_eq!(rig.dev.muxer().connection_count(), 0);
}

#[test]
fn host_connections_without_connect_line_are_bounded() {
    use super::muxer::MAX_PENDING;
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let mut silent = Vec::new();
    for _ in 0..MAX_PENDING + 3 {
        let s = UnixStream::connect(rig.uds()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        silent.push(s);
    }
    rig.poll();
    let mut closed = 0;
    for s in silent.iter_mut() {
        s.set_nonblocking(true).unwrap();
        if matches!(s.read(&mut [0u8; 1]), Ok(0)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 3, "only the ones beyond MAX_PENDING are closed");
    // A real connection still gets through once a slot frees up.
    drop(silent);
    rig.poll();
    let (_s, req) = host_connect(&mut rig, 77);
    assert_eq!(req.dst_port, 77);
}

#[test]
fn credit_update_once_the_guest_has_used_half_its_credit() {
    let mem = test_util::mem();
    let mut rig = Rig::new(&mem);
    let (mut s, req) = host_connect(&mut rig, 1024);
    rig.send_pkt(OP_RESPONSE, 1024, req.src_port, &[]);
    read_line(&mut s);
    // The host reads everything at once; the guest sends 60 KiB at a time.
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 200 * 1024];
        s.read_exact(&mut got).unwrap();
        s
    });
    let chunk = vec![1u8; 40 * 1024];
    let mut updates = Vec::new();
    for i in 0..5 {
        rig.send_pkt(OP_RW, 1024, req.src_port, &chunk);
        rig.poll();
        rig.post_rx();
        for p in rig.take_rx() {
            if p.0.op == OP_CREDIT_UPDATE {
                updates.push((i, p.0.fwd_cnt));
            }
        }
    }
    let _s = reader.join().unwrap();
    assert!(!updates.is_empty(), "the guest is told before it runs dry");
    let (first_at, fwd) = updates[0];
    assert!(
        (u64::from(BUF_ALLOC) / 2..=u64::from(BUF_ALLOC))
            .contains(&((first_at as u64 + 1) * 40 * 1024)),
        "first update once half the credit is used: after chunk {first_at}"
    );
    assert!(fwd >= BUF_ALLOC / 2, "{fwd}");
}
