//! `vmpod serve`: run the CRI daemon. Thin: parse flags, load the config,
//! set up logging, hand over to `vmpod_cri::daemon`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use vmpod_cri::config::{Config, DEFAULT_CONFIG_PATH};
use vmpod_cri::daemon::{self, Daemon, Options, DEFAULT_SOCKET, DEFAULT_STATE_DIR};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// CRI unix socket to listen on.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Daemon state (images, metadata).
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Config file (TOML). If not given, /etc/vmpod/config.toml is read when
    /// it exists; a file given here must exist.
    #[arg(long)]
    config: Option<PathBuf>,
}

pub fn run(args: ServeArgs, log_level: Option<&str>) -> anyhow::Result<ExitCode> {
    let (path, optional) = match args.config {
        Some(p) => (p, false),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), true),
    };
    let config = Config::load(&path, optional)?;
    init_tracing(log_level.unwrap_or(&config.log_level))?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %path.display(),
        config_found = path.exists(),
        "starting vmpod serve"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vmpod-serve")
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let daemon = Daemon::start(Options {
            socket: args.socket,
            state_dir: args.state_dir,
            config,
        })
        .await?;
        daemon.serve(daemon::shutdown_signal()).await
    })?;
    Ok(ExitCode::SUCCESS)
}

fn init_tracing(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .with_context(|| format!("invalid log level {filter:?}"))?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    Ok(())
}
