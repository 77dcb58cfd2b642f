//! ttrpc service implementations. This layer is thin: each RPC converts
//! the protocol message, calls into `container/` or `sandbox`, and maps
//! errors to ttrpc statuses. Handlers live in the file of their area.

mod container;
mod health;
mod process;
mod sandbox;
mod stdio;
mod summary;

use std::sync::Arc;

use async_trait::async_trait;
use ttrpc::r#async::TtrpcContext;
use vmpod_proto::agent::*;
use vmpod_proto::agent_ttrpc;

use crate::state::Agent;

pub use health::HealthService;

pub struct AgentService {
    pub agent: Arc<Agent>,
}

type R<T> = ttrpc::Result<T>;

/// One line per RPC: `name, Request, Response, handler;` — or with
/// `+timeout` at the end for handlers that get the caller's deadline
/// (`timeout_nano`, 0 = none) as a third argument.
macro_rules! agent_service {
    ($($name:ident, $req:ty, $resp:ty, $handler:path $(, +$timeout:ident)?;)*) => {
        #[async_trait]
        impl agent_ttrpc::Agent for AgentService {
            $(
                async fn $name(&self, _ctx: &TtrpcContext, req: $req) -> R<$resp> {
                    // Ids and sizes only: requests carry stdin, env, specs.
                    tracing::debug!(rpc = stringify!($name), req = %summary::summary(&req), "request");
                    $handler(&self.agent, req $(, { let _ = stringify!($timeout); _ctx.timeout_nano })?).await.map_err(|e| {
                        tracing::warn!(rpc = stringify!($name), error = %e, "rpc failed");
                        e.into()
                    })
                }
            )*
        }
    };
}

agent_service! {
    create_sandbox, CreateSandboxRequest, CreateSandboxResponse, sandbox::create_sandbox;
    set_time, SetTimeRequest, SetTimeResponse, sandbox::set_time;
    destroy_sandbox, DestroySandboxRequest, DestroySandboxResponse, sandbox::destroy_sandbox;
    guest_details, GuestDetailsRequest, GuestDetailsResponse, sandbox::guest_details;
    create_container, CreateContainerRequest, CreateContainerResponse, container::create;
    start_container, StartContainerRequest, StartContainerResponse, container::start;
    remove_container, RemoveContainerRequest, RemoveContainerResponse, container::remove;
    update_container, UpdateContainerRequest, UpdateContainerResponse, container::update;
    stats_container, StatsContainerRequest, StatsContainerResponse, container::stats;
    list_containers, ListContainersRequest, ListContainersResponse, container::list;
    exec_process, ExecProcessRequest, ExecProcessResponse, process::exec;
    signal_process, SignalProcessRequest, SignalProcessResponse, process::signal;
    wait_process, WaitProcessRequest, WaitProcessResponse, process::wait;
    read_stream, ReadStreamRequest, ReadStreamResponse, stdio::read_stream;
    write_stdin, WriteStdinRequest, WriteStdinResponse, stdio::write_stdin, +timeout;
    close_stdin, CloseStdinRequest, CloseStdinResponse, stdio::close_stdin;
    resize_tty, ResizeTtyRequest, ResizeTtyResponse, stdio::resize_tty;
}
