//! The connection under an [`AgentClient`](super::AgentClient): the
//! hybrid-vsock handshake, and one ttrpc client shared by every clone,
//! replaced by a new one when it breaks (the agent restarted, the vsock
//! connection was reset). Callers take a clone of the current client under
//! a short lock and never hold the lock across a call.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vmpod_proto::agent_ttrpc::AgentClient as RawAgent;
use vmpod_proto::health_ttrpc::HealthClient;

use super::{AgentClientError, Result};

/// The ttrpc clients of one connection.
type Clients = (RawAgent, HealthClient);

pub struct Shared {
    uds: PathBuf,
    port: u32,
    current: Mutex<Clients>,
    /// Bumped on every re-dial: a caller whose call failed on generation
    /// N re-dials only if nobody has replaced N yet.
    generation: AtomicU64,
    /// One re-dial at a time.
    redialing: tokio::sync::Mutex<()>,
}

impl Shared {
    pub async fn dial(uds: &Path, port: u32, handshake_timeout: Duration) -> Result<Self> {
        Ok(Shared {
            uds: uds.into(),
            port,
            current: Mutex::new(open(uds, port, handshake_timeout).await?),
            generation: AtomicU64::new(0),
            redialing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn current(&self) -> Clients {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Replace the connection of `seen` with a new one (a no-op when
    /// another caller already replaced it).
    pub async fn redial(&self, seen: u64, handshake_timeout: Duration) -> Result<()> {
        let _one = self.redialing.lock().await;
        if self.generation() != seen {
            return Ok(());
        }
        let fresh = open(&self.uds, self.port, handshake_timeout).await?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        self.generation.fetch_add(1, Ordering::SeqCst);
        tracing::info!(uds = %self.uds.display(), port = self.port, "agent connection re-dialled");
        Ok(())
    }
}

async fn open(uds: &Path, port: u32, handshake_timeout: Duration) -> Result<Clients> {
    let s = tokio::time::timeout(handshake_timeout, connect_stream(uds, port))
        .await
        .map_err(|_| AgentClientError::Timeout {
            op: "connect",
            timeout: handshake_timeout,
        })??;
    let client = ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(s));
    Ok((RawAgent::new(client.clone()), HealthClient::new(client)))
}

/// Open the hybrid-vsock stream to `port` in the guest.
pub async fn connect_stream(uds: &Path, port: u32) -> Result<UnixStream> {
    let hs = |msg: String| AgentClientError::Handshake {
        path: uds.into(),
        port,
        msg,
    };
    let mut s = UnixStream::connect(uds)
        .await
        .map_err(|source| AgentClientError::Connect {
            path: uds.into(),
            source,
        })?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| hs(format!("write: {e}")))?;
    // Read the reply byte by byte: what follows belongs to ttrpc.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        let n = s.read(&mut b).await.map_err(|e| hs(format!("read: {e}")))?;
        if n == 0 {
            return Err(hs(format!(
                "connection closed after {:?} (nothing listening on the port yet?)",
                String::from_utf8_lossy(&line)
            )));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(hs("reply line too long".into()));
        }
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        return Err(hs(format!("unexpected reply {line:?}")));
    }
    Ok(s)
}
