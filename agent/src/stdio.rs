//! Process output buffering: a thread per output stream reads the pipe (or
//! pty master) into a bounded buffer; RPC readers take chunks out. When the
//! buffer is full the thread stops reading, so the process blocks on write
//! instead of output being dropped.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Most a stream buffers before back-pressuring the process.
pub const BUFFER_CAP: usize = 1 << 20;
/// Largest chunk one read RPC returns (keeps vsock traffic well under the
/// 256 KiB in-flight limit of the vsock backend).
pub const MAX_CHUNK: usize = 64 << 10;

#[derive(Default)]
struct State {
    data: VecDeque<u8>,
    eof: bool,
}

#[derive(Default)]
pub struct OutBuf {
    state: Mutex<State>,
    space: Condvar,
    ready: Notify,
}

impl OutBuf {
    /// Start the reader thread for `src`.
    pub fn spawn_reader(name: String, mut src: File) -> Arc<OutBuf> {
        let buf = Arc::new(OutBuf::default());
        let b = buf.clone();
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let mut chunk = vec![0u8; 32 << 10];
            loop {
                {
                    let mut st = b.state.lock().unwrap_or_else(|p| p.into_inner());
                    while st.data.len() >= BUFFER_CAP {
                        st = b.space.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                }
                let n = match src.read(&mut chunk) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // EIO: pty slave closed.
                    Err(_) => 0,
                };
                let mut st = b.state.lock().unwrap_or_else(|p| p.into_inner());
                if n == 0 {
                    st.eof = true;
                } else {
                    st.data.extend(&chunk[..n]);
                }
                drop(st);
                b.ready.notify_one();
                if n == 0 {
                    return;
                }
            }
        });
        if spawned.is_err() {
            buf.close();
        }
        buf
    }

    /// A stream that never produces data (e.g. stderr of a tty process).
    pub fn closed() -> Arc<OutBuf> {
        let b = OutBuf::default();
        b.close();
        Arc::new(b)
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).eof = true;
    }

    /// Up to `max` bytes; waits up to `wait` for data. `(data, eof)`, where
    /// eof means the stream ended and everything was read.
    pub async fn read(&self, max: usize, wait: Duration) -> (Vec<u8>, bool) {
        let max = max.clamp(1, MAX_CHUNK);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            {
                let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if !st.data.is_empty() {
                    let n = max.min(st.data.len());
                    let out: Vec<u8> = st.data.drain(..n).collect();
                    let eof = st.eof && st.data.is_empty();
                    drop(st);
                    self.space.notify_all();
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

    #[tokio::test]
    async fn reads_everything_then_eof() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let buf = OutBuf::spawn_reader("t".into(), File::from(r));
        let mut w = File::from(w);
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
    }

    #[tokio::test]
    async fn times_out_without_data() {
        let (r, _w) = nix::unistd::pipe().unwrap();
        let buf = OutBuf::spawn_reader("t".into(), File::from(r));
        let (d, eof) = buf.read(10, Duration::from_millis(50)).await;
        assert!(d.is_empty() && !eof);
    }
}
