//! Hybrid-vsock back-end (Firecracker's protocol): the host side of the
//! guest's vsock is one unix socket.
//! - Host-initiated: connect to the socket, write `CONNECT <port>\n`; once
//!   the guest accepts we answer `OK <host port>\n` and the stream carries
//!   the data; if the guest refuses (RST) or times out we close it.
//! - Guest-initiated connections to CID 2 port P are connected to the unix
//!   socket `<uds>_P`.
//!
//! All host sockets are non-blocking, registered edge-triggered in the
//! muxer's own epoll, whose fd the VMM's event loop watches.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, Verdict, BUF_ALLOC};
use super::packet::{Header, TxPacket, HOST_CID, OP_REQUEST, OP_RST, OP_RW, TYPE_STREAM};
use super::Error;

/// How long the guest has to accept a host-initiated connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `CONNECT <port>\n` line we accept.
pub(crate) const MAX_CONNECT_LINE: usize = 32;
/// Host-side port numbers for host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const MAX_CONNECTIONS: usize = 1024;
const LISTENER_TOKEN: u64 = u64::MAX;
/// Host connections that have not sent their CONNECT line yet, at most;
/// beyond that new ones are closed at once.
pub const MAX_PENDING: usize = 64;
/// Most RSTs for unmatched packets kept waiting for RX buffers: a guest
/// that sends garbage but never posts RX buffers must not grow our memory.
pub const MAX_ORPHAN_RSTS: usize = 256;
/// Guest data waiting for slow host readers, over all of a VM's
/// connections. Each connection may hold up to its credit (`BUF_ALLOC`,
/// 256 KiB), so without this 1024 connections could pin 256 MiB of VMM
/// memory. Data that passes it after its socket took what it could resets
/// the connection holding the most (see `Muxer::enforce_buffer_cap`).
pub const MAX_BUFFERED_PER_VM: usize = 32 << 20;

type Key = (u32, u32); // (local/host port, peer/guest port)

pub struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    /// Host streams that have not sent their CONNECT line yet.
    pending: HashMap<RawFd, (UnixStream, Vec<u8>, Instant)>,
    /// Connections that may have something for the guest, in order.
    rx_queue: VecDeque<Key>,
    /// RSTs for packets that matched no connection.
    orphan_rx: VecDeque<Header>,
    next_local_port: u32,
    /// The listener is out of epoll after a hard accept error (e.g. out of
    /// fds): level-triggered it would report the same queued connection
    /// for ever. `tick` puts it back.
    listener_paused: bool,
    host_connects: u64,
    guest_connects: u64,
    resets_from_guest: u64,
    rsts_dropped: u64,
    /// See [`MAX_BUFFERED_PER_VM`] (smaller in tests).
    max_buffered: usize,
    buffer_cap_resets: u64,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds: &Path) -> Result<Self, Error> {
        let listener = UnixListener::bind(uds).map_err(|source| Error::Bind {
            path: uds.display().to_string(),
            source,
        })?;
        listener.set_nonblocking(true).map_err(|source| Error::Io {
            op: "set_nonblocking",
            source,
        })?;
        let epoll = Epoll::new().map_err(|source| Error::Io {
            op: "epoll_create",
            source,
        })?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(|source| Error::Io {
                op: "epoll_ctl",
                source,
            })?;
        Ok(Self {
            guest_cid,
            uds: uds.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            pending: HashMap::new(),
            rx_queue: VecDeque::new(),
            orphan_rx: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            listener_paused: false,
            host_connects: 0,
            guest_connects: 0,
            resets_from_guest: 0,
            rsts_dropped: 0,
            max_buffered: MAX_BUFFERED_PER_VM,
            buffer_cap_resets: 0,
        })
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn stats(&self) -> String {
        format!(
            "host_connects={} guest_connects={} resets_from_guest={} rsts_dropped={} \
             buffer_cap_resets={} open={}",
            self.host_connects,
            self.guest_connects,
            self.resets_from_guest,
            self.rsts_dropped,
            self.buffer_cap_resets,
            self.conns.len()
        )
    }

    /// Guest data all connections hold for their host sockets.
    pub fn buffered(&self) -> usize {
        self.conns.values().map(Connection::tx_buffered).sum()
    }

    #[cfg(test)]
    pub fn set_max_buffered(&mut self, bytes: usize) {
        self.max_buffered = bytes;
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn connection(&self, local: u32, peer: u32) -> Option<&Connection> {
        self.conns.get(&(local, peer))
    }

    fn watch(&self, fd: RawFd, token: u64) {
        let ev = EpollEvent::new(
            EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP,
            token,
        );
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, ev) {
            tracing::warn!(error = %e, "vsock: epoll add");
        }
    }

    fn unwatch(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn schedule(&mut self, key: Key) {
        if !self.rx_queue.contains(&key) {
            self.rx_queue.push_back(key);
        }
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            let fd = c.stream.as_raw_fd();
            self.unwatch(fd);
            self.by_fd.remove(&fd);
        }
        self.rx_queue.retain(|k| *k != key);
    }

    fn rst_for(&self, hdr: &Header) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    /// Queue an RST answering `hdr` (dropped once MAX_ORPHAN_RSTS wait:
    /// the guest then just sees no answer, as for a lost packet).
    fn queue_rst(&mut self, hdr: &Header) {
        if self.orphan_rx.len() >= MAX_ORPHAN_RSTS {
            self.rsts_dropped += 1;
            return;
        }
        let rst = self.rst_for(hdr);
        self.orphan_rx.push_back(rst);
    }

    /// A packet from the guest's TX queue.
    pub fn on_guest_packet(&mut self, pkt: TxPacket) {
        let hdr = pkt.hdr;
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::debug!(?hdr, "vsock: packet with wrong addresses dropped");
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.queue_rst(&hdr);
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == OP_RST {
            self.resets_from_guest += 1;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            // The data goes to the host socket first; only what it could
            // not take yet stays buffered and counts against the limit.
            match conn.on_guest_packet(&hdr, &pkt.data) {
                Verdict::Remove => self.remove(key),
                Verdict::Keep => {
                    if conn.wants_rx() {
                        self.schedule(key);
                    }
                }
            }
            // Only data can grow the buffers; summing over the connections
            // is cheap next to moving the packet.
            if hdr.op == OP_RW && !pkt.data.is_empty() {
                self.enforce_buffer_cap();
            }
            return;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(&hdr),
            OP_RST => {}
            _ => self.queue_rst(&hdr),
        }
    }

    /// Keep the guest data buffered for slow host readers within
    /// [`MAX_BUFFERED_PER_VM`]: while over it, reset the connection that
    /// holds the most (a stalled reader), never one whose data flows: its
    /// bytes went straight to its socket and hold no buffer.
    fn enforce_buffer_cap(&mut self) {
        let mut total = self.buffered();
        while total > self.max_buffered {
            let Some((key, held)) = self
                .conns
                .iter()
                .map(|(k, c)| (*k, c.tx_buffered()))
                .max_by_key(|(_, held)| *held)
            else {
                return;
            };
            if held == 0 {
                return;
            }
            tracing::warn!(
                port = key.0,
                held,
                max = self.max_buffered,
                "vsock: the VM's buffered guest data passed its limit; resetting the \
                 connection holding the most"
            );
            self.buffer_cap_resets += 1;
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.reset(); // drops its buffered data; the RST is queued
            }
            total -= held;
            self.schedule(key);
        }
    }

    fn guest_connect(&mut self, hdr: &Header) {
        let path = format!("{}_{}", self.uds.display(), hdr.dst_port);
        if self.conns.len() >= MAX_CONNECTIONS {
            self.queue_rst(hdr);
            return;
        }
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path, error = %e, "vsock: guest connect refused");
                self.queue_rst(hdr);
                return;
            }
        };
        self.guest_connects += 1;
        let conn = Connection::guest_initiated(stream, hdr, self.guest_cid);
        let key = (conn.local_port, conn.peer_port);
        let fd = conn.stream.as_raw_fd();
        self.watch(fd, fd as u64);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.schedule(key);
    }

    /// Is anything waiting for the guest's RX queue?
    pub fn has_rx(&self) -> bool {
        !self.orphan_rx.is_empty() || !self.rx_queue.is_empty()
    }

    /// Produce the next packet for the guest, with at most `max_data` bytes
    /// of payload.
    pub fn next_rx(&mut self, max_data: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.orphan_rx.pop_front() {
            return Some((h, Vec::new()));
        }
        while let Some(key) = self.rx_queue.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let pkt = conn.next_rx(max_data);
            let again = conn.wants_rx();
            let closed = conn.is_closed();
            if closed {
                self.remove(key);
            } else if again && pkt.is_some() {
                // Round-robin: it goes to the back. A connection that had
                // nothing after all waits for its next event instead.
                self.rx_queue.push_back(key);
            }
            if pkt.is_some() {
                return pkt;
            }
        }
        None
    }

    /// The muxer's epoll fd is ready: accept, read CONNECT lines, note
    /// readable/writable sockets.
    pub fn process_events(&mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock epoll");
                    return;
                }
            };
            if n == 0 {
                return;
            }
            for ev in &events[..n] {
                let token = ev.data();
                if token == LISTENER_TOKEN {
                    self.accept_all();
                    continue;
                }
                let fd = token as RawFd;
                let set = ev.event_set();
                if self.pending.contains_key(&fd) {
                    self.read_connect_line(fd);
                    continue;
                }
                let Some(&key) = self.by_fd.get(&fd) else {
                    continue;
                };
                let Some(conn) = self.conns.get_mut(&key) else {
                    continue;
                };
                if set.contains(EventSet::OUT) && conn.flush_tx().is_err() {
                    conn.reset();
                }
                if set.intersects(EventSet::IN | EventSet::READ_HANG_UP) {
                    conn.readable = true;
                }
                if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    conn.on_host_hangup();
                }
                if conn.wants_rx() {
                    self.schedule(key);
                } else if conn.is_closed() {
                    self.remove(key);
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if self.pending.len() >= MAX_PENDING {
                        tracing::warn!("vsock: too many connections without CONNECT line");
                        continue; // dropping `s` closes it
                    }
                    if s.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = s.as_raw_fd();
                    self.watch(fd, fd as u64);
                    self.pending.insert(fd, (s, Vec::new(), Instant::now()));
                    self.read_connect_line(fd);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "vsock accept failed; pausing the listener for a second");
                    self.unwatch(self.listener.as_raw_fd());
                    self.listener_paused = true;
                    return;
                }
            }
        }
    }

    fn read_connect_line(&mut self, fd: RawFd) {
        let Some((stream, line, _)) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte: nothing after the newline is consumed (it is data).
        let outcome = loop {
            match stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT".to_string()),
                Ok(_) if byte[0] == b'\n' => break parse_connect(line),
                Ok(_) => {
                    line.push(byte[0]);
                    if line.len() > MAX_CONNECT_LINE {
                        break Err("CONNECT line too long".to_string());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some((stream, _, _)) = self.pending.remove(&fd) else {
            return; // looked up just above
        };
        match outcome {
            Ok(port) if self.conns.len() < MAX_CONNECTIONS => {
                self.host_connects += 1;
                tracing::debug!(port, "vsock: host connection");
                let local = self.alloc_local_port();
                let conn = Connection::host_initiated(
                    stream,
                    local,
                    port,
                    self.guest_cid,
                    Instant::now() + CONNECT_TIMEOUT,
                );
                let key = (local, port);
                self.by_fd.insert(fd, key);
                self.conns.insert(key, conn);
                self.schedule(key);
            }
            Ok(_) => {
                tracing::warn!("vsock: too many connections");
                self.unwatch(fd);
            }
            Err(why) => {
                tracing::debug!(why, "vsock: bad host connection");
                self.unwatch(fd);
            }
        }
    }

    fn alloc_local_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|(l, _)| *l == p) {
                return p;
            }
        }
    }

    /// Once a second: connect timeouts (ours and the host's CONNECT line),
    /// a paused listener back into epoll.
    pub fn tick(&mut self) {
        if self.listener_paused {
            let ev = EpollEvent::new(EventSet::IN, LISTENER_TOKEN);
            match self
                .epoll
                .ctl(ControlOperation::Add, self.listener.as_raw_fd(), ev)
            {
                Ok(()) => self.listener_paused = false,
                Err(e) => tracing::warn!(error = %e, "vsock: re-arming the listener"),
            }
        }
        let now = Instant::now();
        let mut due = Vec::new();
        for (k, c) in self.conns.iter_mut() {
            if c.check_deadline(now) {
                due.push(*k);
            }
        }
        for k in due {
            self.schedule(k);
        }
        let stale: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, (_, _, t))| now.duration_since(*t) > CONNECT_TIMEOUT)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in stale {
            self.unwatch(fd);
            self.pending.remove(&fd);
        }
    }

    /// Driver reset: forget every connection (closing the host sockets).
    pub fn reset(&mut self) {
        for (_, c) in self.conns.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.by_fd.clear();
        self.rx_queue.clear();
        self.orphan_rx.clear();
    }

    #[cfg(test)]
    pub fn expire_connects_for_test(&mut self) {
        let past = Instant::now() - Duration::from_millis(1);
        for c in self.conns.values_mut() {
            if c.connect_deadline.is_some() {
                c.connect_deadline = Some(past);
            }
        }
    }

    #[cfg(test)]
    pub fn state_of(&self, local: u32, peer: u32) -> Option<super::connection::State> {
        self.conns.get(&(local, peer)).map(|c| c.state)
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// Connect to a unix socket without blocking: a host listener whose
/// backlog is full (it does not accept) makes a blocking connect(2) wait,
/// which would stall the VMM's event loop at the guest's request. Unix
/// stream sockets connect at once or fail (EAGAIN when the backlog is full).
pub fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "unix socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket we just created and nobody else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a sockaddr_un at least `len` bytes long.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// Parse `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let s = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8".to_string())?;
    let s = s.trim_end_matches('\r');
    let port = s
        .strip_prefix("CONNECT ")
        .ok_or_else(|| format!("expected `CONNECT <port>`, got {s:?}"))?;
    port.trim()
        .parse::<u32>()
        .map_err(|_| format!("bad port in {s:?}"))
}
