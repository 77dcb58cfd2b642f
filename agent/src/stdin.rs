//! A process's stdin as the agent writes it: the pipe (or pty master) is
//! non-blocking and written through tokio's reactor, so a process that
//! never reads pins no thread. A write ends at its deadline with what it
//! got through (`written`); writes are serialised among themselves, but
//! closing never waits for them: it takes the descriptor away and cancels
//! writes in flight, which let go of it at once.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long closing a terminal waits to queue its EOF (^D).
const TTY_EOF_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StdinError {
    #[error("stdin is closed or was not requested")]
    Closed,
    #[error("the process did not read its stdin within {0:?}; nothing written")]
    Timeout(Duration),
    #[error("write stdin: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Stdin {
    /// `None` once closed (or when stdin was not requested).
    fd: Mutex<Option<Arc<AsyncFd<OwnedFd>>>>,
    /// Keeps writes (and a terminal's EOF) in order; held across the
    /// awaits of one write, never by close.
    order: tokio::sync::Mutex<()>,
    /// Set by close: writes in flight stop.
    closed: watch::Sender<bool>,
    /// A terminal: closing sends EOF (^D) instead of closing the master,
    /// which also carries the output.
    terminal: bool,
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

impl Stdin {
    /// Stdin writing to `fd` (made non-blocking here; needs a tokio
    /// runtime context); `None`: the process has none.
    pub fn new(fd: Option<OwnedFd>, terminal: bool) -> std::io::Result<Self> {
        let fd = match fd {
            Some(fd) => {
                set_nonblocking(&fd)?;
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(std::io::Error::other(
                        "no tokio runtime to register stdin with",
                    ));
                }
                // SAFETY: the OwnedFd is moved in and stays open, the same
                // descriptor, until the AsyncFd is dropped.
                let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::WRITABLE) }?;
                Some(Arc::new(fd))
            }
            None => None,
        };
        Ok(Stdin {
            fd: Mutex::new(fd),
            order: tokio::sync::Mutex::new(()),
            closed: watch::Sender::new(false),
            terminal,
        })
    }

    fn current(&self) -> Option<Arc<AsyncFd<OwnedFd>>> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Write `data` until it is all in, stdin is closed, or `deadline`.
    /// Returns how much went in; nothing at all is an error.
    pub async fn write(&self, data: &[u8], deadline: Instant) -> Result<usize, StdinError> {
        let budget = deadline.saturating_duration_since(Instant::now());
        let _order = tokio::time::timeout_at(deadline, self.order.lock())
            .await
            .map_err(|_| StdinError::Timeout(budget))?;
        let fd = self.current().ok_or(StdinError::Closed)?;
        let mut closed = self.closed.subscribe();
        let mut written = 0;
        while written < data.len() {
            if *closed.borrow_and_update() {
                break;
            }
            let mut ready = tokio::select! {
                r = fd.writable() => r?,
                _ = closed.changed() => break,
                _ = tokio::time::sleep_until(deadline) => break,
            };
            let r = ready.try_io(|inner| {
                nix::unistd::write(inner.get_ref(), &data[written..]).map_err(std::io::Error::from)
            });
            match r {
                Ok(Ok(n)) => written += n,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EPIPE: the process closed its stdin or exited.
                Ok(Err(e)) if written == 0 => return Err(e.into()),
                Ok(Err(_)) => break,
                // Spurious readiness: wait again.
                Err(_would_block) => {}
            }
        }
        if written == 0 && !data.is_empty() {
            return Err(if *closed.borrow() {
                StdinError::Closed
            } else {
                StdinError::Timeout(budget)
            });
        }
        Ok(written)
    }

    /// Close stdin without waiting for writes in flight (they stop and
    /// drop the descriptor). A pipe's write end is closed, so the process
    /// reads EOF; a terminal gets EOF (^D) queued instead, best effort.
    pub async fn close(&self) {
        let fd = self.take();
        if self.terminal {
            if let Some(fd) = fd {
                let eof = async {
                    let _order = self.order.lock().await;
                    let mut ready = fd.writable().await?;
                    match ready.try_io(|inner| {
                        nix::unistd::write(inner.get_ref(), &[4]).map_err(std::io::Error::from)
                    }) {
                        Ok(r) => r.map(drop),
                        Err(_) => Err(std::io::ErrorKind::WouldBlock.into()),
                    }
                };
                match tokio::time::timeout(TTY_EOF_WAIT, eof).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "tty EOF not sent"),
                    Err(_) => tracing::debug!("tty EOF not sent: terminal input full"),
                }
            }
        }
    }

    /// Take the descriptor away and stop writes in flight; never blocks.
    pub fn take(&self) -> Option<Arc<AsyncFd<OwnedFd>>> {
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.closed.send_replace(true);
        fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;

    fn pipe() -> (File, OwnedFd) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (File::from(r), w)
    }

    fn soon(d: u64) -> Instant {
        Instant::now() + Duration::from_millis(d)
    }

    #[tokio::test]
    async fn unread_pipe_gives_a_partial_write_then_a_timeout() {
        let (mut r, w) = pipe();
        let s = Stdin::new(Some(w), false).unwrap();
        let data = vec![b'x'; 1 << 20];
        let n = s.write(&data, soon(200)).await.unwrap();
        assert!(n > 0 && n < data.len(), "partial write: {n}");
        // The pipe is full now: nothing more goes in.
        let e = s.write(&data, soon(100)).await.unwrap_err();
        assert!(matches!(e, StdinError::Timeout(_)), "{e}");
        // What was reported written is exactly what the reader gets.
        s.close().await;
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), n);
    }

    #[tokio::test]
    async fn close_cancels_a_stuck_write_and_the_reader_sees_eof() {
        let (mut r, w) = pipe();
        let s = Arc::new(Stdin::new(Some(w), false).unwrap());
        let first = s.write(&vec![b'a'; 1 << 20], soon(100)).await.unwrap();
        // A write that would wait for a minute on the full pipe.
        let s2 = s.clone();
        let stuck = tokio::spawn(async move {
            s2.write(&[b'b'; 4096], Instant::now() + Duration::from_secs(60))
                .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!stuck.is_finished());
        // close takes no lock the writer holds ...
        s.close().await;
        // ... and the writer lets go of the pipe (hang guard only).
        let r2 = tokio::time::timeout(Duration::from_secs(30), stuck)
            .await
            .expect("write still stuck after close")
            .unwrap();
        assert!(matches!(r2, Err(StdinError::Closed)), "{r2:?}");
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), first);
        // Closed for good.
        let e = s.write(b"late", soon(100)).await.unwrap_err();
        assert!(matches!(e, StdinError::Closed), "{e}");
    }

    #[tokio::test]
    async fn gone_reader_is_an_error_and_no_stdin_is_closed() {
        let (r, w) = pipe();
        let s = Stdin::new(Some(w), false).unwrap();
        drop(r);
        let e = s.write(b"x", soon(1000)).await.unwrap_err();
        assert!(matches!(e, StdinError::Io(_)), "{e}");
        let none = Stdin::new(None, false).unwrap();
        let e = none.write(b"x", soon(1000)).await.unwrap_err();
        assert!(matches!(e, StdinError::Closed), "{e}");
        none.close().await;
    }
}
