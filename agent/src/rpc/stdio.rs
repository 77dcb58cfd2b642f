//! Stdio RPCs: chunked output reads, stdin, tty resize.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use vmpod_proto::agent::*;

use crate::error::{AgentError, Result};
use crate::state::Agent;

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

pub async fn write_stdin(agent: &Arc<Agent>, req: WriteStdinRequest) -> Result<WriteStdinResponse> {
    let c = agent.get(&req.container_id)?;
    let p = c.process(&req.exec_id)?;
    drop(c);
    let len = req.data.len();
    tokio::task::spawn_blocking(move || {
        let mut g = p.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let f = g.as_mut().ok_or_else(|| {
            AgentError::FailedPrecondition("stdin is closed or was not requested".into())
        })?;
        f.write_all(&req.data)
            .map_err(|e| AgentError::FailedPrecondition(format!("write stdin: {e}")))
    })
    .await
    .map_err(|e| AgentError::internal("stdin task", e))??;
    Ok(WriteStdinResponse {
        written: len as u32,
        ..Default::default()
    })
}

pub async fn close_stdin(agent: &Arc<Agent>, req: CloseStdinRequest) -> Result<CloseStdinResponse> {
    let c = agent.get(&req.container_id)?;
    let p = c.process(&req.exec_id)?;
    drop(c);
    // On the blocking pool: the stdin lock may be held by a write_stdin
    // stuck on a full pipe, and the ^D write itself can block.
    tokio::task::spawn_blocking(move || {
        let mut g = p.stdin.lock().unwrap_or_else(|e| e.into_inner());
        if p.terminal {
            // A tty has no separate stdin to close: send EOF (^D).
            if let Some(f) = g.as_mut() {
                let _ = f.write_all(&[4]);
            }
        } else {
            g.take();
        }
    })
    .await
    .map_err(|e| AgentError::internal("close stdin task", e))?;
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
