//! Accept gRPC clients that send the socket path as HTTP/2 `:authority`.
//!
//! grpc-go dialling a unix socket through the passthrough resolver (crictl
//! ≤ 1.26, kubelet ≤ 1.26) sends `:authority: /run/vmpod/vmpod.sock`. That
//! is not a valid authority (RFC 9113 §8.3.1), so `h2` resets the stream
//! with PROTOCOL_ERROR before tonic sees it (hyperium/h2#487).
//! containerd (grpc-go server) accepts it, so we must too.
//!
//! [`AuthorityFix`] wraps each accepted connection. Client→server bytes go
//! through a small HTTP/2 frame parser. Every header block (HEADERS plus its
//! CONTINUATIONs) is decoded with HPACK, keeping the client's dynamic table.
//! The block is re-encoded as literals without indexing, with an invalid
//! `:authority` replaced by `localhost`. The server's HPACK table then
//! stays empty, so the two sides never disagree. All other frames, and
//! everything server→client, pass through untouched. If the stream is not
//! HTTP/2 or a header block does not decode, the bytes pass through
//! unchanged and `h2` reports the error itself.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use loona_hpack::encoder::encode_integer_into;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::codegen::http::uri::Authority;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames we emit stay within the protocol's initial SETTINGS_MAX_FRAME_SIZE.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is passed through for h2 to refuse.
const MAX_BLOCK: usize = 1 << 20;

#[derive(Debug, PartialEq, Eq)]
enum State {
    Preface,
    Frames,
    /// Not HTTP/2 as we understand it: bytes go through untouched.
    Passthrough,
}

/// A header block being collected: HEADERS waiting for its CONTINUATIONs.
struct Pending {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
    /// The original frames, emitted as they were if anything goes wrong.
    raw: Vec<u8>,
}

/// The client→server byte rewriter (sans I/O).
pub struct Rewriter {
    state: State,
    input: Vec<u8>,
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<Pending>,
    rewritten: u64,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter {
            state: State::Preface,
            input: Vec::new(),
            decoder: loona_hpack::Decoder::new(),
            pending: None,
            rewritten: 0,
        }
    }
}

impl Rewriter {
    /// How many `:authority` values were replaced so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Feed bytes read from the client; append what the server should see.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.state == State::Passthrough {
            out.extend_from_slice(data);
            return;
        }
        self.input.extend_from_slice(data);
        if self.state == State::Preface {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                return self.passthrough(out);
            }
            if n < PREFACE.len() {
                return;
            }
            out.extend_from_slice(PREFACE);
            self.input.drain(..PREFACE.len());
            self.state = State::Frames;
        }
        let mut pos = 0;
        while self.input.len() - pos >= FRAME_HEADER {
            let h = &self.input[pos..pos + FRAME_HEADER];
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            if self.input.len() - pos < FRAME_HEADER + len {
                break;
            }
            let frame = self.input[pos..pos + FRAME_HEADER + len].to_vec();
            pos += FRAME_HEADER + len;
            if !self.frame(&frame, out) {
                self.input.drain(..pos);
                return self.passthrough(out);
            }
        }
        self.input.drain(..pos);
    }

    /// Give up: emit everything held back, pass the rest through.
    fn passthrough(&mut self, out: &mut Vec<u8>) {
        if let Some(p) = self.pending.take() {
            out.extend_from_slice(&p.raw);
        }
        out.append(&mut self.input);
        self.state = State::Passthrough;
    }

    /// Handle one complete frame; `false` = give up (pass through).
    fn frame(&mut self, frame: &[u8], out: &mut Vec<u8>) -> bool {
        let (kind, flags) = (frame[3], frame[4]);
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        match (kind, self.pending.as_mut()) {
            (HEADERS, None) => {
                let Some((priority, fragment)) = split_headers_payload(flags, payload) else {
                    return false;
                };
                self.pending = Some(Pending {
                    stream,
                    flags,
                    priority,
                    block: fragment.to_vec(),
                    raw: frame.to_vec(),
                });
            }
            (CONTINUATION, Some(p)) if p.stream == stream => {
                p.block.extend_from_slice(payload);
                p.raw.extend_from_slice(frame);
                p.flags |= flags & END_HEADERS;
                if p.block.len() > MAX_BLOCK {
                    return false;
                }
            }
            (_, Some(_)) | (CONTINUATION, None) => return false,
            (_, None) => {
                out.extend_from_slice(frame);
                return true;
            }
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.flags & END_HEADERS != 0)
        {
            let p = self.pending.take().expect("checked above");
            match self.reencode(&p.block) {
                Some(block) => emit_headers(&p, &block, out),
                None => {
                    out.extend_from_slice(&p.raw);
                    return false;
                }
            }
        }
        true
    }

    /// Decode a header block (updating the client's table) and re-encode it
    /// statelessly with a valid `:authority`. `None` if it does not decode
    /// or decodes to more than [`MAX_BLOCK`] bytes (HPACK lets a small block
    /// name large table entries many times; we never build that much).
    fn reencode(&mut self, block: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(block.len() + 16);
        let mut ok = true;
        let mut rewritten = 0;
        self.decoder
            .decode_with_cb(block, |name, value| {
                if !ok {
                    return;
                }
                let value: &[u8] =
                    if &name[..] == b":authority" && Authority::try_from(&value[..]).is_err() {
                        rewritten += 1;
                        tracing::debug!(
                            authority = %String::from_utf8_lossy(&value),
                            "replacing invalid :authority with localhost"
                        );
                        b"localhost"
                    } else {
                        &value
                    };
                if out.len() + name.len() + value.len() > MAX_BLOCK {
                    ok = false;
                    return;
                }
                // Literal header field without indexing, new name (RFC 7541 §6.2.2).
                out.push(0x00);
                ok &= encode_integer_into(name.len(), 7, 0, &mut out).is_ok();
                out.extend_from_slice(&name);
                ok &= encode_integer_into(value.len(), 7, 0, &mut out).is_ok();
                out.extend_from_slice(value);
            })
            .ok()?;
        self.rewritten += rewritten;
        ok.then_some(out)
    }
}

/// HEADERS payload → (priority fields, header block fragment), padding removed.
fn split_headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut p = payload;
    let mut pad = 0usize;
    if flags & PADDED != 0 {
        pad = *p.first()? as usize;
        p = &p[1..];
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        priority = Some(p.get(..5)?.try_into().ok()?);
        p = &p[5..];
    }
    let end = p.len().checked_sub(pad)?;
    Some((priority, &p[..end]))
}

/// Write the block as HEADERS (+ CONTINUATION) frames, unpadded.
fn emit_headers(p: &Pending, block: &[u8], out: &mut Vec<u8>) {
    let prio_len = if p.priority.is_some() { 5 } else { 0 };
    let first_len = block.len().min(MAX_FRAME - prio_len);
    let (first, mut rest) = block.split_at(first_len);
    let mut flags = p.flags & (END_STREAM | PRIORITY);
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame_header(out, prio_len + first.len(), HEADERS, flags, p.stream);
    if let Some(prio) = p.priority {
        out.extend_from_slice(&prio);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), CONTINUATION, flags, p.stream);
        out.extend_from_slice(chunk);
    }
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let l = (len as u32).to_be_bytes();
    out.extend_from_slice(&[l[1], l[2], l[3], kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// An accepted connection whose client→server bytes go through [`Rewriter`].
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    out: Vec<u8>,
    out_pos: usize,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            rewriter: Rewriter::default(),
            out: Vec::new(),
            out_pos: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // EOF: whatever is held back (a partial frame) goes through.
                this.rewriter.passthrough(&mut this.out);
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.rewriter.feed(rb.filled(), &mut this.out);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::UnixStream> {
    type ConnectInfo = <tokio::net::UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests;
