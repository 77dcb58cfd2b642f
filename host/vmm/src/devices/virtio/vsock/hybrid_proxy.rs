//! The hybrid-vsock unix socket in front of a vsock whose data path is not
//! ours (the vhost-kernel back-end): accept on `<uds>`, read
//! `CONNECT <port>\n`, connect to the guest port through a
//! [`GuestConnector`] (the host kernel's AF_VSOCK in production), answer
//! `OK <local port>\n`, then relay bytes both ways, half-close included,
//! until both directions are done. A refused or timed-out connect closes
//! the unix stream without an `OK` line, as the userspace muxer does.
//!
//! One thread per direction per connection: the host side is a handful of
//! agent connections per VM, and blocking copies keep the code obvious.
//!
//! Guest-initiated connections (guest → CID 2) are not bridged: with
//! vhost-kernel they arrive at the host kernel's AF_VSOCK, shared by every
//! VM on the host, not at `<uds>_<port>`.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::muxer::{parse_connect, CONNECT_TIMEOUT, MAX_CONNECT_LINE};
use super::Error;

/// Most relayed connections at once.
const MAX_CONNECTIONS: usize = 1024;

/// A byte stream to the guest that can be split into two directions.
pub trait GuestStream: Read + Write + Send + Sized + 'static {
    fn try_clone(&self) -> io::Result<Self>;
    fn shutdown_write(&self) -> io::Result<()>;
    /// Our end's port number, for the `OK <port>` line.
    fn local_port(&self) -> u32;
}

/// Opens a stream to a guest port.
pub trait GuestConnector: Send + Sync + 'static {
    type Stream: GuestStream;
    fn connect(&self, port: u32) -> io::Result<Self::Stream>;
}

/// The host kernel's AF_VSOCK to guest `cid` (vhost-vsock's host side).
pub struct KernelVsock {
    pub cid: u32,
}

impl GuestConnector for KernelVsock {
    type Stream = vsock::VsockStream;
    fn connect(&self, port: u32) -> io::Result<vsock::VsockStream> {
        vsock::VsockStream::connect_with_cid_port(self.cid, port)
    }
}

impl GuestStream for vsock::VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        vsock::VsockStream::try_clone(self)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn local_port(&self) -> u32 {
        self.local_addr().map(|a| a.port()).unwrap_or(0)
    }
}

impl GuestStream for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
    fn local_port(&self) -> u32 {
        // Unix sockets have no port; used by tests standing in for a guest.
        self.as_raw_fd() as u32
    }
}

/// The running proxy; dropping it stops accepting and removes the socket
/// (relays already running finish on their own).
pub struct HybridProxy {
    uds: PathBuf,
    stop: Arc<AtomicBool>,
    listener: Arc<UnixListener>,
    accept_thread: Option<std::thread::JoinHandle<()>>,
}

impl HybridProxy {
    pub fn start<C: GuestConnector>(uds: &Path, connector: C) -> Result<Self, Error> {
        let listener = UnixListener::bind(uds).map_err(|source| Error::Bind {
            path: uds.display().to_string(),
            source,
        })?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let accept_thread = {
            let (listener, stop) = (listener.clone(), stop.clone());
            std::thread::Builder::new()
                .name("vsock-proxy".into())
                .spawn(move || accept_loop(&listener, &stop, Arc::new(connector)))
                .map_err(|source| Error::Io {
                    op: "spawning the vsock proxy",
                    source,
                })?
        };
        Ok(Self {
            uds: uds.to_path_buf(),
            stop,
            listener,
            accept_thread: Some(accept_thread),
        })
    }
}

impl Drop for HybridProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake accept(): shutdown(2) on a listening unix socket makes it
        // return EINVAL.
        // SAFETY: plain syscall on a listener fd we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.uds);
    }
}

fn accept_loop<C: GuestConnector>(listener: &UnixListener, stop: &AtomicBool, conn: Arc<C>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        let host = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(e) => {
                // E.g. out of fds: the connection stays queued; retry soon
                // rather than give up on every future connection.
                tracing::warn!(error = %e, "vsock proxy: accept failed; retrying");
                std::thread::sleep(std::time::Duration::from_millis(200));
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            tracing::warn!("vsock proxy: too many connections");
            continue; // dropping `host` closes it
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (conn, active2) = (conn.clone(), active.clone());
        let spawned = std::thread::Builder::new()
            .name("vsock-relay".into())
            .spawn(move || {
                if let Err(why) = relay(host, conn.as_ref()) {
                    tracing::debug!(why, "vsock proxy: connection closed");
                }
                active2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Read the `CONNECT <port>` line byte by byte (what follows is data).
fn read_connect_line(host: &mut UnixStream) -> Result<u32, String> {
    host.set_read_timeout(Some(CONNECT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match host.read(&mut byte) {
            Ok(0) => return Err("closed before CONNECT".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_CONNECT_LINE {
                    return Err("CONNECT line too long".into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading CONNECT: {e}")),
        }
    }
    host.set_read_timeout(None).map_err(|e| e.to_string())?;
    parse_connect(&line)
}

fn relay<C: GuestConnector>(mut host: UnixStream, conn: &C) -> Result<(), String> {
    let port = read_connect_line(&mut host)?;
    let guest = conn
        .connect(port)
        .map_err(|e| format!("guest port {port}: {e}"))?;
    host.write_all(format!("OK {}\n", guest.local_port()).as_bytes())
        .map_err(|e| e.to_string())?;
    let guest_w = guest.try_clone().map_err(|e| e.to_string())?;
    let host_r = host.try_clone().map_err(|e| e.to_string())?;
    // Host → guest on a second thread; guest → host here.
    let up = std::thread::Builder::new()
        .name("vsock-relay-up".into())
        .spawn(move || pump(host_r, guest_w, |g| g.shutdown_write()))
        .map_err(|e| e.to_string())?;
    pump(guest, host, |h| h.shutdown(Shutdown::Write));
    let _ = up.join();
    Ok(())
}

/// Copy until EOF or error, then half-close the destination.
fn pump<R: Read, W: Write>(mut from: R, mut to: W, close: impl Fn(&W) -> io::Result<()>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = close(&to);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::time::Duration;

    /// How long tests wait for the proxy.
    const TEST_TIMEOUT: Duration = Duration::from_secs(5);

    /// Stands in for the guest: guest port P is the unix socket `<dir>/P`.
    struct UnixGuest(PathBuf);
    impl GuestConnector for UnixGuest {
        type Stream = UnixStream;
        fn connect(&self, port: u32) -> io::Result<UnixStream> {
            UnixStream::connect(self.0.join(port.to_string()))
        }
    }

    fn connect(uds: &Path, port: u32) -> (UnixStream, String) {
        let mut s = UnixStream::connect(uds).unwrap();
        s.set_read_timeout(Some(TEST_TIMEOUT)).unwrap();
        s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (s, line)
    }

    #[test]
    fn relays_both_ways_with_half_close() {
        let dir = tempfile::tempdir().unwrap();
        let guest = UnixListener::bind(dir.path().join("1024")).unwrap();
        let uds = dir.path().join("vm.vsock");
        let proxy = HybridProxy::start(&uds, UnixGuest(dir.path().into())).unwrap();
        // The guest echoes in upper case until EOF, then says bye.
        let echo = std::thread::spawn(move || {
            let (mut g, _) = guest.accept().unwrap();
            let mut all = Vec::new();
            g.read_to_end(&mut all).unwrap();
            g.write_all(&all.to_ascii_uppercase()).unwrap();
            g.write_all(b" bye").unwrap();
        });
        let (mut s, ok) = connect(&uds, 1024);
        assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
        let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        s.write_all(&big).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        echo.join().unwrap();
        let mut want = big.to_ascii_uppercase();
        want.extend_from_slice(b" bye");
        assert!(back == want, "all bytes, in order, after the half-close");
        drop(proxy);
        assert!(!uds.exists(), "socket removed on drop");
    }

    #[test]
    fn refused_or_bad_connects_close_without_ok() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.vsock");
        let _proxy = HybridProxy::start(&uds, UnixGuest(dir.path().into())).unwrap();
        let (_, line) = connect(&uds, 4000);
        assert_eq!(line, "", "nobody listens on 4000: EOF, no OK");
        for bad in ["CONNECT\n", "CONNECT x\n", "HELLO 1\n"] {
            let mut s = UnixStream::connect(&uds).unwrap();
            s.set_read_timeout(Some(TEST_TIMEOUT)).unwrap();
            s.write_all(bad.as_bytes()).unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            assert!(buf.is_empty(), "{bad:?} → closed");
        }
        // Still serving afterwards.
        let _g = UnixListener::bind(dir.path().join("5")).unwrap();
        assert!(connect(&uds, 5).1.starts_with("OK "));
    }

    #[test]
    fn socket_in_use_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vm.vsock");
        let _a = HybridProxy::start(&uds, UnixGuest(dir.path().into())).unwrap();
        assert!(HybridProxy::start(&uds, UnixGuest(dir.path().into())).is_err());
    }
}
