//! Child reaping without stealing exit statuses.
//!
//! As PID 1 the agent inherits every orphan. One reaper calls
//! `waitpid(-1, WNOHANG)` on SIGCHLD and hands the status of processes we
//! spawned to their waiter; others are just reaped. Spawning happens under
//! the same lock as reaping, so a child that dies instantly is never reaped
//! before its waiter is registered.

use std::collections::HashMap;
use std::sync::Mutex;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// Shell-style exit code (128+signal when killed).
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

#[derive(Default)]
pub struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<Exit>>>,
}

impl Reaper {
    /// Run `spawn` (which returns a child pid) with reaping held off, and
    /// register a waiter for the new child.
    pub fn spawn<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(i32, T), E>,
    ) -> Result<(i32, T, oneshot::Receiver<Exit>), E> {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let (pid, extra) = spawn()?;
        let (tx, rx) = oneshot::channel();
        w.insert(pid, tx);
        Ok((pid, extra, rx))
    }

    /// Reap every exited child.
    pub fn reap(&self) {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let exit = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            };
            match w.remove(&exit.0.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(exit.1);
                }
                None => tracing::debug!(pid = exit.0.as_raw(), status = ?exit.1, "reaped orphan"),
            }
        }
    }

    /// Reap on every SIGCHLD, forever.
    pub async fn run(self: std::sync::Arc<Self>) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut sig = match signal(SignalKind::child()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGCHLD; children will not be reaped");
                return;
            }
        };
        loop {
            self.reap();
            // Also poll periodically: signals coalesce, and a SIGCHLD that
            // arrives while reaping is still covered by the loop above.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), sig.recv()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fork_exit(code: i32, sig: Option<i32>) -> Result<(i32, ()), std::io::Error> {
        // SAFETY: the child only calls async-signal-safe functions.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(std::io::Error::last_os_error()),
            0 => unsafe {
                if let Some(s) = sig {
                    libc::kill(libc::getpid(), s);
                }
                libc::_exit(code)
            },
            pid => Ok((pid, ())),
        }
    }

    #[tokio::test]
    async fn statuses_reach_their_waiters() {
        let r = Reaper::default();
        let (_, _, rx1) = r.spawn(|| fork_exit(7, None)).unwrap();
        let (_, _, rx2) = r.spawn(|| fork_exit(0, Some(libc::SIGKILL))).unwrap();
        // Reap until both are in (children exit asynchronously).
        let mut rx1 = rx1;
        let mut rx2 = rx2;
        let (mut a, mut b) = (None, None);
        for _ in 0..500 {
            r.reap();
            if a.is_none() {
                a = rx1.try_recv().ok();
            }
            if b.is_none() {
                b = rx2.try_recv().ok();
            }
            if a.is_some() && b.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(a, Some(Exit::Code(7)));
        assert_eq!(b, Some(Exit::Signal(libc::SIGKILL)));
        assert_eq!(Exit::Signal(9).code(), 137);
    }
}
