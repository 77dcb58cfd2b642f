//! Host side of the guest agent protocol: a ttrpc client over the VMM's
//! hybrid-vsock unix socket (connect, `CONNECT <port>\n`, `OK <hostport>\n`,
//! then a byte stream to the guest's vsock port).
//!
//! Every call has a timeout; [`AgentClient::connect_retry`] retries with
//! backoff while the guest boots; a broken connection is re-dialled and
//! idempotent calls retried once (see `conn.rs`). Output is read in chunks of at most
//! 64 KiB, which keeps vsock traffic far below the 256 KiB in-flight limit
//! of the QEMU backend's vsock device.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ttrpc::context::{self, Context};
use vmpod_proto::agent::*;
use vmpod_proto::agent_ttrpc::AgentClient as RawAgent;
use vmpod_proto::health::{
    check_response::ServingStatus, CheckRequest, VersionRequest, VersionResponse,
};
use vmpod_proto::health_ttrpc::HealthClient;

mod api;
mod conn;

pub use api::AgentApi;
pub use conn::connect_stream;
pub use ttrpc::Code;
pub use vmpod_proto::agent;
pub use vmpod_proto::AGENT_VSOCK_PORT;

/// The message of ttrpc's client-side request deadline error.
const TTRPC_DEADLINE_ELAPSED: &str = "Request deadline elapsed";
/// Longest a re-dial after a broken connection may take.
const REDIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Default per-call timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most stdout (and, separately, stderr) bytes [`AgentClient::exec_sync`]
/// collects.
pub const MAX_EXEC_SYNC_OUTPUT: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    #[error("connect to agent socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hybrid vsock handshake on {path} (port {port}): {msg}")]
    Handshake {
        path: PathBuf,
        port: u32,
        msg: String,
    },
    #[error("agent {op}: {code:?}: {message}")]
    Rpc {
        op: &'static str,
        code: ttrpc::Code,
        message: String,
    },
    #[error("agent {op}: {message}")]
    Transport { op: &'static str, message: String },
    #[error("agent {op} timed out after {timeout:?}")]
    Timeout { op: &'static str, timeout: Duration },
    #[error("{op}: {stream:?} output exceeds {limit} bytes")]
    OutputTooLarge {
        op: &'static str,
        stream: OutputStream,
        limit: usize,
    },
    #[error("agent not reachable on {path} within {waited:?}: {last}")]
    NotReady {
        path: PathBuf,
        waited: Duration,
        last: Box<AgentClientError>,
    },
}

impl AgentClientError {
    /// The agent's status code, if the agent answered with an error.
    pub fn code(&self) -> Option<ttrpc::Code> {
        match self {
            AgentClientError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    fn from_ttrpc(op: &'static str, e: ttrpc::Error, timeout: Duration) -> Self {
        match e {
            ttrpc::Error::RpcStatus(s)
                if s.code() == ttrpc::Code::DEADLINE_EXCEEDED
                    && s.message().contains("timeout") =>
            {
                AgentClientError::Timeout { op, timeout }
            }
            ttrpc::Error::RpcStatus(s) => AgentClientError::Rpc {
                op,
                code: s.code(),
                message: s.message().to_string(),
            },
            // ttrpc's own deadline (the request's timeout) fired: the
            // connection is fine, the agent was slow.
            ttrpc::Error::Others(m) if m == TTRPC_DEADLINE_ELAPSED => {
                AgentClientError::Timeout { op, timeout }
            }
            // Socket errors, closed streams, EOF, undecodable frames: the
            // connection is unusable.
            other => AgentClientError::Transport {
                op,
                message: other.to_string(),
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, AgentClientError>;

/// Which output stream to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Exit of a container process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    pub exit_code: i32,
    pub signal: i32,
    pub oom_killed: bool,
    pub started_at_unix_nanos: i64,
    pub finished_at_unix_nanos: i64,
}

impl From<WaitProcessResponse> for ExitStatus {
    fn from(r: WaitProcessResponse) -> Self {
        ExitStatus {
            exit_code: r.exit_code,
            signal: r.signal,
            oom_killed: r.oom_killed,
            started_at_unix_nanos: r.started_at_unix_nanos,
            finished_at_unix_nanos: r.finished_at_unix_nanos,
        }
    }
}

/// An exec request (args plus optional settings).
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `user[:group]`, resolved in the container.
    pub username: Option<String>,
    pub terminal: bool,
    pub stdin: bool,
}

/// A connected agent client. Cheap to clone: clones share one connection,
/// which is re-dialled after it breaks (see [`conn`]).
#[derive(Clone)]
pub struct AgentClient {
    conn: Arc<conn::Shared>,
    timeout: Duration,
}

impl AgentClient {
    /// One connection attempt.
    pub async fn connect(uds: &Path, port: u32, handshake_timeout: Duration) -> Result<Self> {
        Ok(AgentClient {
            conn: Arc::new(conn::Shared::dial(uds, port, handshake_timeout).await?),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Connect and pass a health check, retrying with backoff (the VM may
    /// still be booting) until `total` elapsed.
    pub async fn connect_retry(uds: &Path, port: u32, total: Duration) -> Result<Self> {
        let start = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(20);
        loop {
            let left = total.saturating_sub(start.elapsed());
            let attempt = async {
                let c = AgentClient::connect(uds, port, left.min(Duration::from_secs(5))).await?;
                c.with_timeout(left.clamp(Duration::from_millis(100), Duration::from_secs(5)))
                    .check()
                    .await?;
                Ok::<_, AgentClientError>(c)
            };
            match attempt.await {
                Ok(c) => {
                    tracing::debug!(uds = %uds.display(), waited = ?start.elapsed(), "agent connected");
                    return Ok(c);
                }
                Err(e) if start.elapsed() + delay >= total => {
                    return Err(AgentClientError::NotReady {
                        path: uds.into(),
                        waited: start.elapsed(),
                        last: Box::new(e),
                    })
                }
                Err(e) => {
                    tracing::trace!(error = %e, "agent not ready yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// A copy with another per-call timeout.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        AgentClient {
            timeout,
            ..self.clone()
        }
    }

    fn ctx(&self) -> Context {
        context::with_duration(self.timeout)
    }

    fn agent(&self) -> RawAgent {
        self.conn.current().0
    }

    fn health(&self) -> HealthClient {
        self.conn.current().1
    }

    /// Run an RPC under the client timeout (enforced locally too, so a
    /// stalled connection cannot hang the caller). A broken connection is
    /// re-dialled for the next call; this one fails (it may have run).
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        // The generation is read before the call takes its client, so a
        // failure is never blamed on a connection made after it started.
        let generation = self.conn.generation();
        let r = self.call_once(op, f()).await;
        if let Err(AgentClientError::Transport { .. }) = &r {
            self.redial(generation).await;
        }
        r
    }

    /// [`AgentClient::call`] for requests that may safely run twice (reads,
    /// waits): after a broken connection is re-dialled, retried once.
    async fn call_idempotent<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        let generation = self.conn.generation();
        match self.call_once(op, f()).await {
            Err(e @ AgentClientError::Transport { .. }) => {
                if self.redial(generation).await {
                    self.call_once(op, f()).await
                } else {
                    Err(e)
                }
            }
            r => r,
        }
    }

    async fn call_once<T>(
        &self,
        op: &'static str,
        f: impl std::future::Future<Output = ttrpc::Result<T>>,
    ) -> Result<T> {
        let t = self.timeout;
        match tokio::time::timeout(t + Duration::from_millis(500), f).await {
            Ok(r) => r.map_err(|e| AgentClientError::from_ttrpc(op, e, t)),
            Err(_) => Err(AgentClientError::Timeout { op, timeout: t }),
        }
    }

    /// Replace the connection seen at `generation` (unless another caller
    /// already did). True when a working connection is in place.
    async fn redial(&self, generation: u64) -> bool {
        match self
            .conn
            .redial(generation, self.timeout.min(REDIAL_TIMEOUT))
            .await
        {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "agent connection broken; re-dial failed");
                false
            }
        }
    }

    pub async fn check(&self) -> Result<()> {
        let r = self
            .call_idempotent("health check", || async {
                self.health().check(self.ctx(), &CheckRequest::new()).await
            })
            .await?;
        if r.status.enum_value_or_default() != ServingStatus::SERVING {
            return Err(AgentClientError::Rpc {
                op: "health check",
                code: ttrpc::Code::UNAVAILABLE,
                message: format!("agent reports {:?}", r.status),
            });
        }
        Ok(())
    }

    pub async fn version(&self) -> Result<VersionResponse> {
        self.call_idempotent("version", || async {
            self.health()
                .version(self.ctx(), &VersionRequest::new())
                .await
        })
        .await
    }

    pub async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<()> {
        self.call("create sandbox", || async {
            self.agent().create_sandbox(self.ctx(), &req).await
        })
        .await
        .map(drop)
    }

    /// Set the guest clock to the host's.
    pub async fn sync_time(&self) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let req = SetTimeRequest {
            unix_nanos: now,
            ..Default::default()
        };
        self.call("set time", || async {
            self.agent().set_time(self.ctx(), &req).await
        })
        .await
        .map(drop)
    }

    pub async fn destroy_sandbox(&self) -> Result<()> {
        self.call("destroy sandbox", || async {
            self.agent()
                .destroy_sandbox(self.ctx(), &DestroySandboxRequest::new())
                .await
        })
        .await
        .map(drop)
    }

    pub async fn guest_details(&self) -> Result<GuestDetailsResponse> {
        self.call_idempotent("guest details", || async {
            self.agent()
                .guest_details(self.ctx(), &GuestDetailsRequest::new())
                .await
        })
        .await
    }

    /// Create a container from an OCI runtime spec (config.json bytes).
    pub async fn create_container(
        &self,
        id: &str,
        oci_spec_json: Vec<u8>,
        rootfs: &str,
        username: Option<&str>,
        stdin: bool,
    ) -> Result<u32> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json,
            rootfs: rootfs.into(),
            username: username.unwrap_or_default().into(),
            stdin,
            ..Default::default()
        };
        Ok(self
            .call("create container", || async {
                self.agent().create_container(self.ctx(), &req).await
            })
            .await?
            .pid)
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let req = StartContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.call("start container", || async {
            self.agent().start_container(self.ctx(), &req).await
        })
        .await
        .map(drop)
    }

    pub async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let req = SignalProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            signal,
            all,
            ..Default::default()
        };
        self.call("signal", || async {
            self.agent().signal_process(self.ctx(), &req).await
        })
        .await
        .map(drop)
    }

    /// Wait for a process to exit (bounded by this client's timeout).
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitStatus> {
        let req = WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        Ok(self
            .call_idempotent("wait", || async {
                self.agent().wait_process(self.ctx(), &req).await
            })
            .await?
            .into())
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let req = RemoveContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.call("remove container", || async {
            self.agent().remove_container(self.ctx(), &req).await
        })
        .await
        .map(drop)
    }

    /// Apply OCI `linux.resources` ([`agent::LinuxResources`]) to a
    /// container, translated as the spec's are at create: omitted fields
    /// (and memory/cpu values of 0) stay as they are, -1 lifts a limit.
    pub async fn update_container(&self, id: &str, resources: LinuxResources) -> Result<()> {
        let req = UpdateContainerRequest::new_for(id, &resources).map_err(|e| {
            AgentClientError::Transport {
                op: "update container",
                message: format!("encoding resources: {e}"),
            }
        })?;
        self.call("update container", || async {
            self.agent().update_container(self.ctx(), &req).await
        })
        .await
        .map(drop)
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        let req = StatsContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.call_idempotent("stats", || async {
            self.agent().stats_container(self.ctx(), &req).await
        })
        .await
    }

    pub async fn list_containers(&self) -> Result<Vec<ContainerInfo>> {
        Ok(self
            .call_idempotent("list containers", || async {
                self.agent()
                    .list_containers(self.ctx(), &ListContainersRequest::new())
                    .await
            })
            .await?
            .containers)
    }

    pub async fn exec(&self, id: &str, exec_id: &str, spec: &ExecSpec) -> Result<u32> {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            user: spec
                .username
                .as_ref()
                .map(|u| User {
                    username: u.clone(),
                    ..Default::default()
                })
                .into(),
            terminal: spec.terminal,
            stdin: spec.stdin,
            ..Default::default()
        };
        Ok(self
            .call("exec", || async {
                self.agent().exec_process(self.ctx(), &req).await
            })
            .await?
            .pid)
    }

    /// One chunk of output (waits up to `wait` for data). `(data, eof)`.
    pub async fn read_chunk(
        &self,
        id: &str,
        exec_id: &str,
        stream: OutputStream,
        wait: Duration,
    ) -> Result<(Vec<u8>, bool)> {
        let req = ReadStreamRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            stream: match stream {
                OutputStream::Stdout => Stream::STDOUT,
                OutputStream::Stderr => Stream::STDERR,
            }
            .into(),
            max_bytes: 64 << 10,
            wait_ms: wait
                .min(self.timeout.saturating_sub(Duration::from_millis(500)))
                .as_millis() as u32,
            ..Default::default()
        };
        let r = self
            .call("read output", || async {
                self.agent().read_stream(self.ctx(), &req).await
            })
            .await?;
        Ok((r.data, r.eof))
    }

    /// Read a stream to its end (the process and its children closed it).
    pub async fn read_to_end(
        &self,
        id: &str,
        exec_id: &str,
        stream: OutputStream,
    ) -> Result<Vec<u8>> {
        self.read_to_end_max(id, exec_id, stream, usize::MAX).await
    }

    /// Like [`read_to_end`](Self::read_to_end), but an OutputTooLarge error
    /// once more than `limit` bytes arrived (the guest decides how much a
    /// process writes; the host must not buffer without bound).
    pub async fn read_to_end_max(
        &self,
        id: &str,
        exec_id: &str,
        stream: OutputStream,
        limit: usize,
    ) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let (d, eof) = self
                .read_chunk(id, exec_id, stream, Duration::from_secs(5))
                .await?;
            if d.len() > limit.saturating_sub(out.len()) {
                return Err(AgentClientError::OutputTooLarge {
                    op: "read output",
                    stream,
                    limit,
                });
            }
            out.extend(d);
            if eof {
                return Ok(out);
            }
        }
    }

    /// Run a process in a running container to completion (CRI ExecSync):
    /// its stdout, stderr and exit. On `timeout` the process is killed and
    /// a Timeout error returned; output beyond [`MAX_EXEC_SYNC_OUTPUT`] per
    /// stream kills it too (OutputTooLarge).
    pub async fn exec_sync(
        &self,
        id: &str,
        exec_id: &str,
        spec: &ExecSpec,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Vec<u8>, ExitStatus)> {
        self.exec(id, exec_id, spec).await?;
        let run = async {
            let (out, err) = tokio::join!(
                self.read_to_end_max(id, exec_id, OutputStream::Stdout, MAX_EXEC_SYNC_OUTPUT),
                self.read_to_end_max(id, exec_id, OutputStream::Stderr, MAX_EXEC_SYNC_OUTPUT)
            );
            let st = self
                .with_timeout(timeout + Duration::from_secs(5))
                .wait(id, exec_id)
                .await?;
            Ok::<_, AgentClientError>((out?, err?, st))
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Err(e @ AgentClientError::OutputTooLarge { .. })) => {
                self.kill_and_reap(id, exec_id).await;
                Err(e)
            }
            Ok(r) => r,
            Err(_) => {
                self.kill_and_reap(id, exec_id).await;
                Err(AgentClientError::Timeout {
                    op: "exec sync",
                    timeout,
                })
            }
        }
    }

    /// SIGKILL an exec we give up on and collect its exit, so the agent
    /// retires it (and its stdio) instead of keeping it until the cap.
    async fn kill_and_reap(&self, id: &str, exec_id: &str) {
        let _ = self.signal(id, exec_id, 9, false).await;
        if let Err(e) = self
            .with_timeout(Duration::from_secs(5))
            .wait(id, exec_id)
            .await
        {
            tracing::debug!(container = id, exec = exec_id, error = %e, "reaping a killed exec");
        }
    }

    /// Write all of `data` to the process's stdin. The agent takes what
    /// the process reads before the call's deadline and reports the count;
    /// the rest is sent again, so nothing is lost while the process makes
    /// progress. A process that reads nothing for a whole call fails it
    /// (`DEADLINE_EXCEEDED` from the agent, or a timeout here).
    pub async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<()> {
        let mut rest = data;
        while !rest.is_empty() {
            // Chunks of 64 KiB: one bounded ttrpc message each.
            let n = rest.len().min(64 << 10);
            let req = WriteStdinRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                data: rest[..n].to_vec(),
                ..Default::default()
            };
            let r = self
                .call("write stdin", || async {
                    self.agent().write_stdin(self.ctx(), &req).await
                })
                .await?;
            let written = (r.written as usize).min(n);
            if written == 0 {
                return Err(AgentClientError::Rpc {
                    op: "write stdin",
                    code: ttrpc::Code::DEADLINE_EXCEEDED,
                    message: "the process read none of its stdin".into(),
                });
            }
            rest = &rest[written..];
        }
        Ok(())
    }

    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        let req = CloseStdinRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        self.call("close stdin", || async {
            self.agent().close_stdin(self.ctx(), &req).await
        })
        .await
        .map(drop)
    }

    pub async fn resize_tty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        let req = ResizeTtyRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            rows,
            cols,
            ..Default::default()
        };
        self.call("resize tty", || async {
            self.agent().resize_tty(self.ctx(), &req).await
        })
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests;
