//! vmpod-agent: the guest agent, PID 1 of the pod microVM.
//!
//! `vmpod-agent` mounts the base filesystems, brings up loopback, sets up
//! the pod cgroup, reaps children and serves the ttrpc protocol
//! (`vmpod-proto`) on vsock port 1024. `vmpod-agent __stage2` is the
//! staged container process set-up (see `stage2/`), exec'd by the agent
//! itself after clone.

mod container;
mod error;
mod log;
mod pid1;
mod reaper;
mod rpc;
mod stage2;
mod state;
mod stdin;
mod stdio;

use std::sync::Arc;

use container::cgroup::{setup_pod_parent, DirCgroupFs};

fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if first.as_deref() == Some("__stage2") {
        stage2::main();
    }
    let port = match first.as_deref() {
        Some("--port") => args
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(vmpod_proto::AGENT_VSOCK_PORT),
        _ => vmpod_proto::AGENT_VSOCK_PORT,
    };
    let is_init = std::process::id() == 1;
    let switched = if is_init {
        Some(pid1::switch_to_tmpfs_root())
    } else {
        None
    };
    if is_init {
        pid1::mount_base();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMPOD_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(log::console)
        .with_ansi(false)
        .init();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        "vmpod-agent starting"
    );
    if let Some(Err(e)) = switched {
        tracing::warn!(error = %e, "could not move the initramfs to a tmpfs root; containers fall back to chroot");
    }
    if let Err(e) = run(port, is_init) {
        tracing::error!(error = %e, "agent failed");
    }
    if is_init {
        // PID 1 must not exit (kernel panic): power off instead.
        nix::unistd::sync();
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
    std::process::exit(1);
}

fn run(port: u32, is_init: bool) -> Result<(), String> {
    container::spawn::init_self_exe().map_err(|e| format!("open /proc/self/exe: {e}"))?;
    if let Err(e) = pid1::loopback_up() {
        tracing::warn!(error = %e, "loopback up");
    }
    if is_init {
        if let Err(e) = pid1::raise_fd_limit() {
            tracing::warn!(error = %e, "raising the agent's open-file limit");
        }
    }
    let cgroups = Arc::new(DirCgroupFs::new("/sys/fs/cgroup"));
    if let Err(e) = setup_pod_parent(cgroups.as_ref()) {
        tracing::warn!(error = %e, "pod cgroup set-up; resource limits may not apply");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(serve(port, cgroups, is_init))
}

async fn serve(port: u32, cgroups: Arc<DirCgroupFs>, _is_init: bool) -> Result<(), String> {
    let reaper = Arc::new(reaper::Reaper::default());
    tokio::spawn(reaper.clone().run());
    let agent = state::Agent::new(reaper, cgroups);
    let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
        tokio_vsock::VMADDR_CID_ANY,
        port,
    ))
    .map_err(|e| format!("listen on vsock port {port}: {e}"))?;
    let agent_svc = vmpod_proto::agent_ttrpc::create_agent(Arc::new(rpc::AgentService { agent }));
    let health_svc = vmpod_proto::health_ttrpc::create_health(Arc::new(rpc::HealthService));
    let mut server = ttrpc::r#async::Server::new()
        .add_listener(listener.into())
        .register_service(agent_svc)
        .register_service(health_svc);
    server
        .start()
        .await
        .map_err(|e| format!("ttrpc server: {e}"))?;
    tracing::info!(port, "serving ttrpc on vsock");
    std::future::pending::<()>().await;
    Ok(())
}
