//! `vmpod`: the one host binary. Each subcommand lives in its own module.

mod agent_ctl;
mod check;
mod serve;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vmpod",
    version,
    about = "Hypervisor-isolated Kubernetes container runtime (CRI v1)"
)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax); overrides the config file.
    #[arg(long, global = true, env = "VMPOD_LOG")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the CRI daemon.
    Serve(serve::ServeArgs),
    /// Run or manage a single microVM.
    Vm(vm::VmArgs),
    /// Talk to a guest agent directly (debugging).
    AgentCtl(agent_ctl::AgentCtlArgs),
    /// Report what this host can run and which backend each handler uses.
    Check(check::CheckArgs),
}

fn init_tracing(level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = level.map(EnvFilter::new).unwrap_or_else(|| {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args, cli.log_level.as_deref()),
        Command::Vm(args) => {
            init_tracing(cli.log_level.as_deref());
            vm::run(args)
        }
        Command::AgentCtl(args) => {
            init_tracing(cli.log_level.as_deref());
            agent_ctl::run(args)
        }
        Command::Check(args) => {
            init_tracing(cli.log_level.as_deref());
            check::run(args)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmpod: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
