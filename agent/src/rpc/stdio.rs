//! Stdio RPCs: chunked output reads, stdin, tty resize.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use vmpod_proto::agent::*;

use crate::error::{AgentError, Result};
use crate::state::Agent;
use crate::stdin::StdinError;

pub async fn read_stream(agent: &Arc<Agent>, req: ReadStreamRequest) -> Result<ReadStreamResponse> {
    let c = agent.get(&req.container_id)?;
    let p = c.process(&req.exec_id)?;
    drop(c);
    let buf = match req.stream.enum_value_or_default() {
        Stream::STDOUT => p.stdout.clone(),
        Stream::STDERR => p.stderr.clone(),
    };
    let max = if req.max_bytes == 0 {
        crate::stdio::MAX_CHUNK
    } else {
        req.max_bytes as usize
    };
    let (data, eof) = buf
        .read(max, Duration::from_millis(req.wait_ms.min(30_000) as u64))
        .await;
    Ok(ReadStreamResponse {
        data,
        eof,
        ..Default::default()
    })
}

/// Longest a WriteStdin waits for a process to read when the caller set
/// no deadline (or a longer one).
pub const STDIN_WRITE_BOUND: Duration = Duration::from_secs(30);

/// When a write must give up: before the caller's deadline (ttrpc drops
/// the handler at the deadline, and the partial count must reach the
/// caller), and never later than [`STDIN_WRITE_BOUND`].
pub fn write_budget(timeout_nano: i64) -> Duration {
    if timeout_nano <= 0 {
        return STDIN_WRITE_BOUND;
    }
    let t = Duration::from_nanos(timeout_nano as u64);
    let margin = (t / 5).min(Duration::from_millis(500));
    (t - margin).min(STDIN_WRITE_BOUND)
}

pub async fn write_stdin(
    agent: &Arc<Agent>,
    req: WriteStdinRequest,
    timeout_nano: i64,
) -> Result<WriteStdinResponse> {
    let deadline = tokio::time::Instant::now() + write_budget(timeout_nano);
    let c = agent.get(&req.container_id)?;
    let p = c.process(&req.exec_id)?;
    drop(c);
    let written = p
        .stdin
        .write(&req.data, deadline)
        .await
        .map_err(|e| match e {
            StdinError::Timeout(_) => AgentError::DeadlineExceeded(e.to_string()),
            StdinError::Closed | StdinError::Io(_) => AgentError::FailedPrecondition(e.to_string()),
        })?;
    if written < req.data.len() {
        tracing::debug!(
            container = %req.container_id,
            exec = %req.exec_id,
            written,
            len = req.data.len(),
            "partial stdin write"
        );
    }
    Ok(WriteStdinResponse {
        written: written as u32,
        ..Default::default()
    })
}

/// Never waits behind a write in flight: that write is cancelled.
pub async fn close_stdin(agent: &Arc<Agent>, req: CloseStdinRequest) -> Result<CloseStdinResponse> {
    let c = agent.get(&req.container_id)?;
    let p = c.process(&req.exec_id)?;
    drop(c);
    p.stdin.close().await;
    Ok(CloseStdinResponse::default())
}

pub async fn resize_tty(agent: &Arc<Agent>, req: ResizeTtyRequest) -> Result<ResizeTtyResponse> {
    let c = agent.get(&req.container_id)?;
    let p = c.process(&req.exec_id)?;
    let pty = p.pty.lock().unwrap_or_else(|e| e.into_inner());
    let pty = pty
        .as_ref()
        .ok_or_else(|| AgentError::FailedPrecondition("process has no terminal".into()))?;
    let dim = |what: &str, v: u32| {
        u16::try_from(v)
            .map_err(|_| AgentError::InvalidArgument(format!("tty {what} {v} is over 65535")))
    };
    let ws = libc::winsize {
        ws_row: dim("rows", req.rows)?,
        ws_col: dim("cols", req.cols)?,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ with a valid winsize on our pty master.
    if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ as _, &ws) } < 0 {
        return Err(AgentError::internal(
            "resize tty",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(ResizeTtyResponse::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_write_budget() {
        assert_eq!(write_budget(0), STDIN_WRITE_BOUND);
        // leaves a margin before the caller's deadline
        assert_eq!(write_budget(1_000_000_000), Duration::from_millis(800));
        assert_eq!(write_budget(10_000_000_000), Duration::from_millis(9500));
        assert_eq!(write_budget(3_600_000_000_000), STDIN_WRITE_BOUND);
    }
}
