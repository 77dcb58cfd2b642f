//! Process output buffering: a thread per output stream reads the pipe (or
//! pty master) into a bounded buffer; RPC readers take chunks out. When the
//! buffer is full the thread stops reading, so the process blocks on write
//! instead of output being dropped. [`OutBuf::discard`] (container removed,
//! exec retired) drops what is buffered and ends the thread, which closes
//! the pipe.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Most a stream buffers before back-pressuring the process.
pub const BUFFER_CAP: usize = 1 << 20;
/// Largest chunk one read RPC returns (keeps vsock traffic well under the
/// 256 KiB in-flight limit of the vsock backend).
pub const MAX_CHUNK: usize = 64 << 10;

#[derive(Default)]
struct State {
    data: VecDeque<u8>,
    eof: bool,
    discarded: bool,
}

/// What readers have taken out of a stream so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes handed to readers.
    pub consumed: u64,
    /// The stream ended and everything was read (or it was discarded).
    pub drained: bool,
}

pub struct OutBuf {
    state: Mutex<State>,
    space: Condvar,
    ready: Notify,
    progress: watch::Sender<Progress>,
    /// eventfd that wakes the reader thread out of poll(2) on discard, so
    /// it lets go of the pipe even while the writer is silent.
    wake: Option<OwnedFd>,
}

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the fd is ours alone.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Block until `src` is readable (or hung up).
fn wait_pollin(src: &File) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(src.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::NONE);
}

impl OutBuf {
    fn new(wake: Option<OwnedFd>) -> Self {
        OutBuf {
            state: Mutex::new(State::default()),
            space: Condvar::new(),
            ready: Notify::new(),
            progress: watch::Sender::new(Progress::default()),
            wake,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start the reader thread for `src`.
    pub fn spawn_reader(name: String, src: File) -> Arc<OutBuf> {
        let wake = eventfd()
            .map_err(
                |e| tracing::warn!(error = %e, "eventfd: discard cannot interrupt a silent stream"),
            )
            .ok();
        let buf = Arc::new(OutBuf::new(wake));
        let b = buf.clone();
        let spawned = std::thread::Builder::new()
            .name(name)
            .spawn(move || b.pump(src));
        if spawned.is_err() {
            buf.close();
        }
        buf
    }

    /// The reader thread: pipe → buffer until EOF or discard. Returning
    /// drops `src`, closing our end of the pipe.
    fn pump(&self, mut src: File) {
        let mut chunk = vec![0u8; 32 << 10];
        loop {
            {
                let mut st = self.lock();
                while st.data.len() >= BUFFER_CAP && !st.discarded {
                    st = self.space.wait(st).unwrap_or_else(|p| p.into_inner());
                }
                if st.discarded {
                    return;
                }
            }
            if !self.wait_readable(&src) {
                return;
            }
            let n = match src.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A pty master shares its file (and O_NONBLOCK) with the
                // process's stdin writer: nothing there after all, poll again.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if self.wake.is_none() {
                        wait_pollin(&src);
                    }
                    continue;
                }
                // EIO: pty slave closed.
                Err(_) => 0,
            };
            let mut st = self.lock();
            if st.discarded {
                return;
            }
            if n == 0 {
                st.eof = true;
            } else {
                st.data.extend(&chunk[..n]);
            }
            let drained = st.eof && st.data.is_empty();
            drop(st);
            if drained {
                self.progress.send_modify(|p| p.drained = true);
            }
            self.ready.notify_one();
            if n == 0 {
                return;
            }
        }
    }

    /// Block until `src` has data or hung up; false once discarded.
    fn wait_readable(&self, src: &File) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Some(wake) = &self.wake else {
            return true;
        };
        loop {
            let mut fds = [
                PollFd::new(src.as_fd(), PollFlags::POLLIN),
                PollFd::new(wake.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Err(nix::errno::Errno::EINTR) => continue,
                // Let read(2) report whatever is wrong.
                Err(_) => return true,
                Ok(_) => {}
            }
            // Only discard() writes the eventfd.
            let discarded = fds[1].revents().is_some_and(|r| !r.is_empty());
            return !discarded;
        }
    }

    /// A stream that never produces data (e.g. stderr of a tty process).
    pub fn closed() -> Arc<OutBuf> {
        let b = OutBuf::new(None);
        b.close();
        Arc::new(b)
    }

    /// A stream that is open but never gets data (table tests).
    #[cfg(test)]
    pub fn silent() -> Arc<OutBuf> {
        Arc::new(OutBuf::new(None))
    }

    fn close(&self) {
        self.lock().eof = true;
        self.progress.send_modify(|p| p.drained = true);
    }

    /// Nobody will read this stream again: drop what is buffered, end the
    /// reader thread (closing the pipe; a writer still alive gets EPIPE)
    /// and wake every waiter. Readers then see an empty, ended stream.
    pub fn discard(&self) {
        {
            let mut st = self.lock();
            if st.discarded {
                return;
            }
            st.discarded = true;
            st.eof = true;
            st.data = VecDeque::new();
        }
        self.space.notify_all();
        if let Some(w) = &self.wake {
            let _ = nix::unistd::write(w, &1u64.to_ne_bytes());
        }
        self.progress.send_modify(|p| p.drained = true);
        self.ready.notify_waiters();
        // A reader between its state check and its wait gets the permit.
        self.ready.notify_one();
    }

    /// Follow what readers take out (for retiring finished execs).
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Up to `max` bytes; waits up to `wait` for data. `(data, eof)`, where
    /// eof means the stream ended and everything was read.
    pub async fn read(&self, max: usize, wait: Duration) -> (Vec<u8>, bool) {
        let max = max.clamp(1, MAX_CHUNK);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            {
                let mut st = self.lock();
                if !st.data.is_empty() {
                    let n = max.min(st.data.len());
                    let out: Vec<u8> = st.data.drain(..n).collect();
                    let eof = st.eof && st.data.is_empty();
                    drop(st);
                    self.space.notify_all();
                    self.progress.send_modify(|p| {
                        p.consumed += n as u64;
                        p.drained |= eof;
                    });
                    // Another reader may be waiting for the rest.
                    self.ready.notify_one();
                    return (out, eof);
                }
                if st.eof {
                    return (Vec::new(), true);
                }
            }
            if tokio::time::timeout_at(deadline, self.ready.notified())
                .await
                .is_err()
            {
                return (Vec::new(), false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;

    fn pipe() -> (File, File) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (File::from(r), File::from(w))
    }

    /// Poll `cond` until true; panics after a generous hang guard.
    fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cond() {
            assert!(Instant::now() < deadline, "never happened: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The pipe's read end is closed: poll on the write end reports POLLERR.
    fn read_end_closed(w: &File) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(w.as_fd(), PollFlags::POLLOUT)];
        poll(&mut fds, PollTimeout::ZERO).unwrap();
        fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLERR))
    }

    /// State letter (R, S, ...) of this process's thread named `name`.
    fn thread_state(name: &str) -> Option<char> {
        std::fs::read_dir("/proc/self/task").ok()?.find_map(|t| {
            let t = t.ok()?.path();
            let comm = std::fs::read_to_string(t.join("comm")).ok()?;
            if comm.trim() != name {
                return None;
            }
            let stat = std::fs::read_to_string(t.join("stat")).ok()?;
            stat.rsplit(") ").next()?.chars().next()
        })
    }

    #[tokio::test]
    async fn reads_everything_then_eof() {
        let (r, mut w) = pipe();
        let buf = OutBuf::spawn_reader("t".into(), r);
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let p2 = payload.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(&p2).unwrap();
        });
        let mut got = Vec::new();
        loop {
            let (d, eof) = buf.read(MAX_CHUNK * 4, Duration::from_secs(5)).await;
            assert!(d.len() <= MAX_CHUNK);
            got.extend(d);
            if eof {
                break;
            }
        }
        writer.join().unwrap();
        assert_eq!(got.len(), payload.len());
        assert!(got == payload);
        let p = *buf.progress().borrow();
        assert_eq!(
            p,
            Progress {
                consumed: payload.len() as u64,
                drained: true
            }
        );
    }

    #[tokio::test]
    async fn times_out_without_data() {
        let (r, _w) = pipe();
        let buf = OutBuf::spawn_reader("t".into(), r);
        let (d, eof) = buf.read(10, Duration::from_millis(50)).await;
        assert!(d.is_empty() && !eof);
        assert!(!buf.progress().borrow().drained);
    }

    #[tokio::test]
    async fn discard_frees_a_full_buffer_and_ends_the_reader() {
        let (r, mut w) = pipe();
        let buf = OutBuf::spawn_reader("t".into(), r);
        // More than the buffer plus the pipe hold: the writer blocks once
        // the reader has parked on the full buffer.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(w.write_all(&vec![b'x'; 3 << 20]));
        });
        eventually("buffer full", || buf.lock().data.len() >= BUFFER_CAP);
        buf.discard();
        // The parked reader wakes, exits and closes the pipe: the blocked
        // writer fails instead of hanging for ever.
        let r = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("writer still blocked after discard");
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
        assert!(buf.lock().data.capacity() == 0, "buffered data dropped");
        assert_eq!(buf.read(10, Duration::ZERO).await, (Vec::new(), true));
        assert!(buf.progress().borrow().drained);
    }

    #[test]
    fn discard_ends_a_reader_waiting_on_a_silent_pipe() {
        let (r, mut w) = pipe();
        let buf = OutBuf::spawn_reader("silent-reader".into(), r);
        // One byte in, then the reader goes back to poll(2) and sleeps.
        w.write_all(b"x").unwrap();
        eventually("byte buffered", || buf.lock().data.len() == 1);
        eventually("reader asleep in poll", || {
            thread_state("silent-reader").is_some_and(|s| s == 'S')
        });
        assert!(!read_end_closed(&w));
        buf.discard();
        // Nothing is ever written: only the eventfd can end the reader.
        eventually("reader closed the pipe", || read_end_closed(&w));
    }
}
