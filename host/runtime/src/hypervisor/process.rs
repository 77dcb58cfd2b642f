//! Spawning and supervising the processes backends run (QEMU, vhost-user
//! helpers, the built-in VMM's `vmpod vm run` child).

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{HypervisorError, Result};

/// Spawn `program args` with stdout+stderr appended to `log`, in its own
/// process group (a terminal's Ctrl-C reaches only us; we stop the VM), and
/// killed if the handle holding it is dropped. With `die_with_parent`, the
/// kernel also kills it when the spawning thread dies (use only from a
/// thread that lives as long as the VM, e.g. a CLI's main thread).
pub(crate) fn spawn(
    program: &Path,
    args: &[String],
    log: &Path,
    die_with_parent: bool,
) -> Result<Child> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(HypervisorError::io("opening helper log"))?;
    let err = out
        .try_clone()
        .map_err(HypervisorError::io("opening helper log"))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    if die_with_parent {
        // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn()
        .map_err(|e| HypervisorError::Start(format!("cannot run {}: {e}", program.display())))
}

/// Wait until `path` exists (a helper created its socket), failing early if
/// `child` exits first.
pub(crate) async fn wait_for_path(
    path: &Path,
    child: &mut Child,
    what: &str,
    log: &Path,
    timeout: Duration,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(HypervisorError::Start(format!(
                "{what} exited ({status}) before creating {}: {}",
                path.display(),
                log_tail(log, 3)
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(HypervisorError::Start(format!(
                "{what} did not create {} within {timeout:?}: {}",
                path.display(),
                log_tail(log, 3)
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Last `n` non-empty lines of a log, joined with " | " (for one-line errors).
pub(crate) fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(n);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Returns once the process is gone.
pub(crate) async fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on our own child's PID (not yet reaped).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}
