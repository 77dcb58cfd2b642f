//! One process the agent started (a container's init or an exec): its
//! stage handshake, stdio and exit.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::cgroup::Cgroup;
use super::config::StageConfig;
use super::spawn::{self, ChildStdio, StagePipes};
use crate::error::{AgentError, Result};
use crate::reaper::Exit;
use crate::state::Agent;
use crate::stdin::Stdin;
use crate::stdio::OutBuf;

/// How long a staged child may take to report `ready` or exec.
pub const STAGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExitInfo {
    pub exit: Exit,
    pub finished_at: i64,
    pub oom_killed: bool,
}

pub struct Process {
    pub pid: i32,
    pub stdout: Arc<OutBuf>,
    pub stderr: Arc<OutBuf>,
    pub stdin: Stdin,
    pub pty: Mutex<Option<OwnedFd>>,
    pub exit: watch::Receiver<Option<ExitInfo>>,
    pub started_at: Mutex<Option<i64>>,
    /// Stage pipes until the process is started.
    stage: Mutex<Option<(File, File)>>,
    /// A Wait has returned this process's exit (execs are then retired).
    collected: AtomicBool,
}

pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// What to launch.
pub struct Launch<'a> {
    pub config: StageConfig,
    pub clone_flags: i32,
    pub stdin: bool,
    pub cgroup: &'a Cgroup,
    /// For exec: the container's PID namespace.
    pub pid_ns: Option<File>,
    pub what: String,
}

/// Clone the staged child, put it in its cgroup, hand it its config and wait
/// until it is ready to exec (blocking; run on a blocking thread).
pub fn launch(agent: &Arc<Agent>, l: Launch<'_>) -> Result<Arc<Process>> {
    let io = |what: &str| {
        let what = format!("{}: {what}", l.what);
        move |e: std::io::Error| AgentError::internal(what, e)
    };
    let terminal = l.config.process.terminal;
    let (stdio, stdout_src, stderr_src, stdin_w, pty) = if terminal {
        let (master, slave) = spawn::pty().map_err(io("openpty"))?;
        let stdio = ChildStdio {
            stdin: slave.try_clone().map_err(io("dup"))?,
            stdout: slave.try_clone().map_err(io("dup"))?,
            stderr: slave,
        };
        let out = File::from(master.try_clone().map_err(io("dup"))?);
        let inp = File::from(master.try_clone().map_err(io("dup"))?);
        (stdio, out, None, Some(inp), Some(master))
    } else {
        let (out_r, out_w) = spawn::pipe_pair().map_err(io("pipe"))?;
        let (err_r, err_w) = spawn::pipe_pair().map_err(io("pipe"))?;
        let (stdin, stdin_w) = if l.stdin {
            let (r, w) = spawn::pipe_pair().map_err(io("pipe"))?;
            (r, Some(File::from(w)))
        } else {
            (spawn::dev_null().map_err(io("open /dev/null"))?, None)
        };
        let stdio = ChildStdio {
            stdin,
            stdout: out_w,
            stderr: err_w,
        };
        (
            stdio,
            File::from(out_r),
            Some(File::from(err_r)),
            stdin_w,
            None,
        )
    };
    let stdin = Stdin::new(stdin_w.map(OwnedFd::from), terminal).map_err(io("stdin"))?;

    let (pid, pipes, exit_rx) = agent
        .reaper
        .spawn(|| match &l.pid_ns {
            Some(ns) => with_pid_ns(ns, || spawn::clone_stage2(l.clone_flags, stdio)),
            None => spawn::clone_stage2(l.clone_flags, stdio),
        })
        .map_err(io("clone"))?;
    let StagePipes {
        mut config,
        mut status,
        start,
    } = pipes;

    let kill = || {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    };
    let setup = (|| {
        l.cgroup
            .add_pid(agent.cgroups.as_ref(), pid)
            .map_err(|e| AgentError::internal(&l.what, e))?;
        let json = serde_json::to_vec(&l.config).map_err(|e| AgentError::internal(&l.what, e))?;
        config.write_all(&json).map_err(io("send stage config"))?;
        drop(config);
        match read_status(&mut status, STAGE_TIMEOUT)? {
            StageStatus::Ready => Ok(()),
            StageStatus::Error(msg) => {
                Err(AgentError::InvalidArgument(format!("{}: {msg}", l.what)))
            }
            StageStatus::Eof => Err(AgentError::Internal(format!(
                "{}: container set-up process died before reporting",
                l.what
            ))),
        }
    })();
    if let Err(e) = setup {
        kill();
        return Err(e);
    }

    let stdout = OutBuf::spawn_reader(format!("out-{pid}"), stdout_src);
    let stderr = match stderr_src {
        Some(f) => OutBuf::spawn_reader(format!("err-{pid}"), f),
        None => OutBuf::closed(),
    };
    let (tx, rx) = watch::channel(None);
    let cgroup = l.cgroup.clone();
    let a = agent.clone();
    tokio::runtime::Handle::current().spawn(async move {
        let exit = exit_rx.await.unwrap_or(Exit::Signal(libc::SIGKILL));
        let oom_killed = cgroup.oom_killed(a.cgroups.as_ref());
        tracing::info!(pid, ?exit, oom_killed, "process exited");
        let _ = tx.send(Some(ExitInfo {
            exit,
            finished_at: now_nanos(),
            oom_killed,
        }));
    });
    Ok(Arc::new(Process {
        pid,
        stdout,
        stderr,
        stdin,
        pty: Mutex::new(pty),
        exit: rx,
        started_at: Mutex::new(None),
        stage: Mutex::new(Some((status, start))),
        collected: AtomicBool::new(false),
    }))
}

/// Run `f` (a clone) on a short-lived thread whose children go to the
/// PID namespace `ns`. The thread ends right after, so nothing has to be
/// set back (a thread of the agent — PID 1 — left pointing its children
/// at a container could not be repaired); its children are reparented to
/// the agent's other threads, where the reaper collects them as usual.
fn with_pid_ns<T: Send>(
    ns: &File,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    use nix::sched::{setns, CloneFlags};
    std::thread::scope(|s| {
        let t = std::thread::Builder::new()
            .name("pidns-clone".into())
            .spawn_scoped(s, || {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWPID)?;
                f()
            })?;
        t.join()
            .map_err(|_| std::io::Error::other("clone thread panicked"))?
    })
}

enum StageStatus {
    Ready,
    Error(String),
    Eof,
}

/// Read one status line (`ready` / `error: ...`) or EOF, with a timeout.
fn read_status(f: &mut File, timeout: Duration) -> Result<StageStatus> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(AgentError::DeadlineExceeded(format!(
                "container set-up did not finish within {}s",
                timeout.as_secs()
            )));
        }
        let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
        let ms =
            PollTimeout::try_from(left.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(AgentError::internal("poll stage status", e)),
            Ok(_) => {}
        }
        let mut chunk = [0u8; 4096];
        let n = f
            .read(&mut chunk)
            .map_err(|e| AgentError::internal("read stage status", e))?;
        if n == 0 {
            let s = String::from_utf8_lossy(&buf).trim().to_string();
            return Ok(if s.is_empty() {
                StageStatus::Eof
            } else {
                parse_status(&s)
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.contains(&b'\n') {
            return Ok(parse_status(String::from_utf8_lossy(&buf).trim()));
        }
    }
}

fn parse_status(s: &str) -> StageStatus {
    match s.strip_prefix("error: ") {
        Some(m) => StageStatus::Error(m.to_string()),
        None if s == "ready" => StageStatus::Ready,
        None => StageStatus::Error(s.to_string()),
    }
}

impl Process {
    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    pub fn is_started(&self) -> bool {
        self.started_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Let the staged child exec; returns once exec succeeded (blocking).
    pub fn start(&self, what: &str) -> Result<()> {
        let Some((mut status, mut start)) =
            self.stage.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            return Err(AgentError::FailedPrecondition(format!(
                "{what}: already started"
            )));
        };
        start
            .write_all(b"s")
            .map_err(|e| AgentError::FailedPrecondition(format!("{what}: process is gone: {e}")))?;
        drop(start);
        match read_status(&mut status, STAGE_TIMEOUT)? {
            StageStatus::Eof => {
                *self.started_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(now_nanos());
                Ok(())
            }
            StageStatus::Error(m) => Err(AgentError::InvalidArgument(format!("{what}: {m}"))),
            StageStatus::Ready => Err(AgentError::Internal(format!(
                "{what}: unexpected stage status"
            ))),
        }
    }

    /// Drop the stage pipes of a never-started process (it then exits).
    pub fn abandon(&self) {
        self.stage.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Nothing will use this process's stdio again (container removed,
    /// exec retired): discard its output (ending the reader threads and
    /// their pipes), close stdin and the pty master, drop the stage pipes.
    /// Never blocks: a WriteStdin in flight is cancelled.
    pub fn release(&self) {
        self.stdout.discard();
        self.stderr.discard();
        self.stdin.take();
        self.pty.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.abandon();
    }

    /// Mark the exit as collected by a Wait; true the first time only.
    pub fn mark_collected(&self) -> bool {
        !self.collected.swap(true, Ordering::AcqRel)
    }

    /// A process that never ran, for table tests (`finished_at`: exited).
    #[cfg(test)]
    pub fn for_test(pid: i32, finished_at: Option<i64>) -> Arc<Process> {
        let info = finished_at.map(|finished_at| ExitInfo {
            exit: Exit::Code(0),
            finished_at,
            oom_killed: false,
        });
        let (_, rx) = watch::channel(info);
        Arc::new(Process {
            pid,
            stdout: OutBuf::silent(),
            stderr: OutBuf::silent(),
            stdin: Stdin::new(None, false).expect("no fd, no reactor needed"),
            pty: Mutex::new(None),
            exit: rx,
            started_at: Mutex::new(None),
            stage: Mutex::new(None),
            collected: AtomicBool::new(false),
        })
    }

    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit.clone();
        loop {
            if let Some(i) = *rx.borrow_and_update() {
                return i;
            }
            if rx.changed().await.is_err() {
                return ExitInfo {
                    exit: Exit::Signal(libc::SIGKILL),
                    finished_at: now_nanos(),
                    oom_killed: false,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid_ns_for_children() -> std::path::PathBuf {
        std::fs::read_link("/proc/thread-self/ns/pid_for_children").unwrap()
    }

    #[test]
    fn pid_ns_switch_happens_on_its_own_thread() {
        let before = pid_ns_for_children();
        let own = File::open("/proc/self/ns/pid").unwrap();
        let caller = nix::unistd::gettid();
        let (tid, ns) =
            with_pid_ns(&own, || Ok((nix::unistd::gettid(), pid_ns_for_children()))).unwrap();
        assert_ne!(tid, caller, "ran on a thread of its own");
        assert_eq!(ns, before);
        assert_eq!(pid_ns_for_children(), before, "caller untouched");
        // A failing setns is an error for the caller, nothing worse.
        let not_a_ns = File::open("/dev/null").unwrap();
        let r = with_pid_ns(&not_a_ns, || Ok(()));
        assert!(r.is_err());
        assert_eq!(pid_ns_for_children(), before);
    }
}
