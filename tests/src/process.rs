//! Child processes in tests: run-and-check, a kill-on-drop guard for
//! long-running children (`vmpod vm run`, QEMU), and `/proc` look-ups to
//! check that nothing is left behind.

use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// How often the waiting helpers poll.
const POLL: Duration = Duration::from_millis(50);

/// Run `cmd` to completion and panic (with its stderr) unless it succeeds.
pub fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A spawned child that is killed and reaped when dropped, so a failing
/// test does not leave it running (a `vmpod vm run` takes QEMU and its
/// helpers with it: they get a parent-death signal).
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// Spawn `cmd` under the guard.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}")),
        ))
    }

    /// Wait until `log` (a console log) contains `needle` and return the
    /// whole log; panics (with the child's stderr when piped) if the child
    /// exits first, and kills it and panics after `timeout`.
    pub fn wait_console(&mut self, log: &Path, needle: &str, timeout: Duration) -> String {
        crate::vm::wait_console(log, needle, timeout, self.0.as_mut())
    }

    /// Wait at most `limit` for the child to exit and collect its output;
    /// past the limit it is killed and the test panics.
    pub fn wait_exit(mut self, limit: Duration) -> Output {
        let mut child = self.0.take().expect("child present");
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!("vmpod vm run did not exit within {limit:?}");
            }
            std::thread::sleep(POLL);
        }
        child.wait_with_output().unwrap()
    }

    /// Send SIGTERM to the child.
    pub fn sigterm(&self) {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.id() as i32, libc::SIGTERM) };
    }
}

impl Deref for ChildGuard {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("child present")
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present")
    }
}

impl Drop for ChildGuard {
    /// SIGTERM first, so a `vmpod vm run` stops its VM and removes its
    /// runtime dir and sockets even when a test fails; SIGKILL after 10 s.
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if let Ok(None) = c.try_wait() {
                // SAFETY: signalling our own child, which has not been reaped.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
                let start = Instant::now();
                while matches!(c.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(POLL);
                }
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Child PIDs of `pid` (from every thread's `/proc/PID/task/TID/children`).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Whether `pid` is running; a zombie (exited, not yet reaped) counts as
/// gone.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Wait up to 10 s for all of `pids` to be gone; panics naming them if not.
pub fn wait_gone(pids: &[u32]) {
    let start = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "processes left behind: {pids:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// `bytes` as text without ANSI escape sequences (tracing's colours).
pub fn strip_ansi(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
