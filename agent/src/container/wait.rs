//! Wait: a process's exit. Collecting an exec's exit also retires the
//! exec once its output has been read to the end (or nobody has read any
//! for [`OUTPUT_IDLE`]): its stdio is released and its id leaves the
//! table, as containerd deletes an exec process after its exit. The
//! container's init stays until the container is removed.

use std::sync::Arc;
use std::time::Duration;

use super::process::{ExitInfo, Process};
use super::Container;
use crate::error::Result;
use crate::state::Agent;

/// How long a retired-to-be exec's output may go unread before it is
/// discarded anyway (a host that waits but never reads, or a background
/// child holding the pipe open).
pub const OUTPUT_IDLE: Duration = Duration::from_secs(30);

/// The exit of the init (empty `exec_id`) or an exec, and when it started.
pub async fn wait(agent: &Arc<Agent>, id: &str, exec_id: &str) -> Result<(ExitInfo, Option<i64>)> {
    let p = agent.get(id)?.process(exec_id)?;
    let info = p.wait().await;
    let started = *p.started_at.lock().unwrap_or_else(|e| e.into_inner());
    // No await from here on: once the exit is returned, retiring is
    // scheduled even if the caller's deadline drops this future next.
    if !exec_id.is_empty() && p.mark_collected() {
        // A removed container has released everything already.
        if let Ok(c) = agent.get(id) {
            tokio::spawn(retire_when_read(c, exec_id.to_string(), p));
        }
    }
    Ok((info, started))
}

/// Retire the exec once both output streams are drained, or after
/// [`OUTPUT_IDLE`] without a read.
async fn retire_when_read(c: Arc<Container>, exec_id: String, p: Arc<Process>) {
    let mut out = p.stdout.progress();
    let mut err = p.stderr.progress();
    loop {
        let drained = out.borrow_and_update().drained;
        if drained && err.borrow_and_update().drained {
            break;
        }
        let change = async {
            tokio::select! {
                r = out.changed() => r,
                r = err.changed() => r,
            }
        };
        match tokio::time::timeout(OUTPUT_IDLE, change).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) => break,
            Err(_) => {
                tracing::info!(container = %c.id, exec = %exec_id, "exec output unread; discarded");
                break;
            }
        }
    }
    c.retire_exec(&exec_id, &p);
    tracing::debug!(container = %c.id, exec = %exec_id, "exec retired");
}
