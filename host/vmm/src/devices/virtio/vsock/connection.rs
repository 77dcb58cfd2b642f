//! One vsock stream connection between a guest port and a host unix
//! socket, with virtio-vsock credit flow control in both directions.
//!
//! Guest → host: the guest may send at most our `buf_alloc` bytes beyond
//! what we have forwarded (`fwd_cnt`); what the host socket cannot take yet
//! waits in `tx_buf`. We advertise progress with CREDIT_UPDATE (and in
//! every header we send).
//! Host → guest: we read from the socket only while the guest has credit
//! (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`); otherwise we ask with
//! CREDIT_REQUEST and wait.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::packet::{
    Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Receive buffer we advertise to the guest per connection.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// How long a connection the guest closed may take to hand its last
/// buffered bytes to a slow host reader before we drop them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host connected and sent `CONNECT`; we sent REQUEST to the guest.
    Connecting,
    Established,
    /// Finished: remove after sending whatever is queued (RST).
    Closed,
}

/// What the muxer should do after a guest packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Remove the connection now (nothing more to send).
    Remove,
}

pub struct Connection {
    pub stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    pub guest_cid: u64,
    pub state: State,
    pub connect_deadline: Option<Instant>,
    // Guest -> host.
    tx_buf: Vec<u8>,
    recv_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    // Host -> guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    rx_cnt: u32,
    /// The host socket may have data (edge-triggered readiness).
    pub readable: bool,
    host_eof: bool,
    guest_shut: u32,
    // Control packets owed to the guest.
    need_request: bool,
    need_response: bool,
    need_rst: bool,
    need_credit_update: bool,
    /// We asked the guest for credit and wait for its update.
    credit_requested: bool,
    /// The guest closed (SHUTDOWN both ways) while guest data still waited
    /// for the host socket: deliver it, then finish the close.
    draining: Option<Instant>,
    /// The guest already forgot the connection (RST after its close): no
    /// RST owed when the drain ends.
    guest_gone: bool,
    /// Directions of the host socket we already shut down.
    host_shut: u8,
}

const HOST_SHUT_WR: u8 = 1;
const HOST_SHUT_RD: u8 = 2;

impl Connection {
    fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        state: State,
    ) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state,
            connect_deadline: None,
            tx_buf: Vec::new(),
            recv_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            readable: false,
            host_eof: false,
            guest_shut: 0,
            need_request: false,
            need_response: false,
            need_rst: false,
            need_credit_update: false,
            credit_requested: false,
            draining: None,
            guest_gone: false,
            host_shut: 0,
        }
    }

    /// Host-initiated: we will send REQUEST and wait for the guest.
    pub fn host_initiated(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        guest_cid: u64,
        deadline: Instant,
    ) -> Self {
        let mut c = Self::new(stream, local_port, peer_port, guest_cid, State::Connecting);
        c.need_request = true;
        c.connect_deadline = Some(deadline);
        c
    }

    /// Guest-initiated (REQUEST already received, host socket connected).
    pub fn guest_initiated(stream: UnixStream, req: &Header, guest_cid: u64) -> Self {
        let mut c = Self::new(
            stream,
            req.dst_port,
            req.src_port,
            guest_cid,
            State::Established,
        );
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = req.fwd_cnt;
        c.need_response = true;
        c.readable = true;
        c
    }

    /// Bytes the guest can still take from us.
    pub fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    pub fn header(&self, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: super::packet::HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Handle a packet from the guest addressed to this connection.
    pub fn on_guest_packet(&mut self, hdr: &Header, data: &[u8]) -> Verdict {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.draining.is_some() {
            // The guest sent everything and closed; only its RST (it gave
            // up waiting for ours) matters now. Keep draining either way.
            if hdr.op == OP_RST {
                self.guest_gone = true;
            }
            return Verdict::Keep;
        }
        match (self.state, hdr.op) {
            (_, OP_RST) => {
                // Refused (while connecting) or reset: just close the host side.
                self.state = State::Closed;
                return Verdict::Remove;
            }
            (State::Connecting, OP_RESPONSE) => {
                self.state = State::Established;
                self.connect_deadline = None;
                let line = format!("OK {}\n", self.local_port);
                if self.stream.write_all(line.as_bytes()).is_err() {
                    return self.reset();
                }
                self.readable = true;
            }
            (State::Connecting, _) => return self.reset(),
            (State::Established, OP_RW) => {
                self.recv_cnt = self.recv_cnt.wrapping_add(data.len() as u32);
                if self.recv_cnt.wrapping_sub(self.fwd_cnt) > BUF_ALLOC {
                    tracing::warn!(port = self.local_port, "guest exceeded its vsock credit");
                    return self.reset();
                }
                if self.guest_shut & SHUTDOWN_SEND != 0 {
                    return self.reset();
                }
                self.tx_buf.extend_from_slice(data);
                if self.flush_tx().is_err() {
                    return self.reset();
                }
            }
            (State::Established, OP_CREDIT_UPDATE) => {}
            (State::Established, OP_CREDIT_REQUEST) => self.need_credit_update = true,
            (State::Established, OP_SHUTDOWN) => {
                self.guest_shut |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.guest_shut == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // Full close: what the host socket cannot take yet is
                    // still delivered (draining); the RST follows.
                    if self.flush_tx().is_err() || self.tx_buf.is_empty() {
                        return self.reset();
                    }
                    self.draining = Some(Instant::now() + DRAIN_TIMEOUT);
                    return Verdict::Keep;
                }
                if self.guest_shut & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty() {
                    self.shut_host(Shutdown::Write);
                }
            }
            (State::Established, OP_REQUEST) | (State::Established, OP_RESPONSE) => {
                return self.reset();
            }
            (State::Established, _) => return self.reset(),
            // Closed by us: if our RST is still owed, keep the connection
            // until the muxer has sent it (removing now would lose it and
            // leave the guest socket open for ever).
            (State::Closed, _) if self.need_rst => return Verdict::Keep,
            (State::Closed, _) => return Verdict::Remove,
        }
        Verdict::Keep
    }

    /// shutdown(2) the host socket, once per direction: every call wakes
    /// the socket's waiters, and with edge-triggered epoll a repeated call
    /// per readiness event would spin for ever.
    fn shut_host(&mut self, how: Shutdown) {
        let want = match how {
            Shutdown::Write => HOST_SHUT_WR,
            _ => HOST_SHUT_WR | HOST_SHUT_RD,
        };
        if self.host_shut & want != want {
            self.host_shut |= want;
            let _ = self.stream.shutdown(how);
        }
    }

    /// The last guest bytes reached the host socket (or never will): close
    /// it, RST the guest unless it already forgot us.
    fn finish_drain(&mut self) {
        self.draining = None;
        self.shut_host(Shutdown::Both);
        self.state = State::Closed;
        self.need_rst = !self.guest_gone;
    }

    /// Tell the guest to forget this connection; the muxer removes it once
    /// the RST is sent. Guest data not yet written to the host socket is
    /// dropped (and its memory freed).
    pub fn reset(&mut self) -> Verdict {
        self.tx_buf = Vec::new();
        self.draining = None;
        self.state = State::Closed;
        self.need_rst = true;
        Verdict::Keep
    }

    /// Write buffered guest data to the host socket. Err means the socket
    /// is gone.
    pub fn flush_tx(&mut self) -> std::io::Result<()> {
        let mut written = 0;
        while written < self.tx_buf.len() {
            match self.stream.write(&self.tx_buf[written..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.tx_buf.drain(..written);
        self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        if self.draining.is_some() {
            if self.tx_buf.is_empty() {
                self.finish_drain();
            }
            return Ok(());
        }
        // A standalone CREDIT_UPDATE only when the guest may run short: it
        // believes `recv_cnt - last_fwd_cnt_sent` of our buffer is in use
        // and stops sending at BUF_ALLOC. Below half of that it has room,
        // and the headers of our data packets carry fwd_cnt anyway; this
        // saves an RX packet and an interrupt per request/response.
        let unsent = self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        let guest_view_used = self.recv_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        if unsent > 0 && guest_view_used >= BUF_ALLOC / 2 {
            self.need_credit_update = true;
        }
        if self.tx_buf.is_empty() && self.guest_shut & SHUTDOWN_SEND != 0 {
            self.shut_host(Shutdown::Write);
        }
        Ok(())
    }

    /// Does this connection have a packet for the guest right now?
    pub fn wants_rx(&self) -> bool {
        self.need_rst
            || self.need_request
            || self.need_response
            || self.need_credit_update
            || (self.state == State::Established && self.want_data())
    }

    fn want_data(&self) -> bool {
        self.readable
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
            && (self.peer_credit() > 0 || !self.credit_requested)
    }

    /// The next packet for the guest, with at most `max_data` payload
    /// bytes. None if nothing is due (e.g. the socket had no data after
    /// all, or the guest has no credit).
    pub fn next_rx(&mut self, max_data: usize) -> Option<(Header, Vec<u8>)> {
        if self.need_rst {
            self.need_rst = false;
            return Some((self.header(OP_RST, 0, 0), Vec::new()));
        }
        if self.state == State::Closed {
            return None;
        }
        if self.need_request {
            self.need_request = false;
            return Some((self.header(OP_REQUEST, 0, 0), Vec::new()));
        }
        if self.need_response {
            self.need_response = false;
            return Some((self.header(OP_RESPONSE, 0, 0), Vec::new()));
        }
        if self.state != State::Established {
            return None;
        }
        if self.want_data() {
            let credit = self.peer_credit() as usize;
            if credit == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return Some((self.header(OP_CREDIT_REQUEST, 0, 0), Vec::new()));
                }
            } else {
                let mut buf = vec![0u8; credit.min(max_data)];
                match self.stream.read(&mut buf) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.readable = false;
                        self.last_fwd_cnt_sent = self.fwd_cnt;
                        self.need_credit_update = false;
                        return Some((self.header(OP_SHUTDOWN, 0, SHUTDOWN_SEND), Vec::new()));
                    }
                    Ok(n) => {
                        buf.truncate(n);
                        self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                        self.credit_requested = false;
                        self.last_fwd_cnt_sent = self.fwd_cnt;
                        self.need_credit_update = false;
                        return Some((self.header(OP_RW, n as u32, 0), buf));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.reset();
                        self.need_rst = false;
                        return Some((self.header(OP_RST, 0, 0), Vec::new()));
                    }
                }
            }
        }
        if self.need_credit_update {
            self.need_credit_update = false;
            self.last_fwd_cnt_sent = self.fwd_cnt;
            return Some((self.header(OP_CREDIT_UPDATE, 0, 0), Vec::new()));
        }
        None
    }

    /// The host socket reported hang-up or error.
    pub fn on_host_hangup(&mut self) {
        if self.state == State::Connecting {
            self.reset();
        }
        // Established: reads will return EOF (SHUTDOWN to the guest) and
        // writes will fail (RST); nothing else to do here.
        self.readable = true;
    }

    /// Connecting or draining for too long: give up.
    pub fn check_deadline(&mut self, now: Instant) -> bool {
        if self.draining.is_some_and(|d| now >= d) {
            tracing::info!(
                port = self.peer_port,
                dropped = self.tx_buf.len(),
                "vsock: host side never read the closed connection's last bytes"
            );
            self.tx_buf.clear();
            self.finish_drain();
            return true;
        }
        match self.connect_deadline {
            Some(d) if now >= d && self.state == State::Connecting => {
                tracing::info!(port = self.peer_port, "vsock connect timed out");
                self.reset();
                true
            }
            _ => false,
        }
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed && !self.need_rst
    }

    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }
}
