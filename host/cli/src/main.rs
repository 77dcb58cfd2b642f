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

/// Parse the command line. Help and version go to stdout with exit 0; any
/// other problem clap finds (unknown flag, out-of-range or malformed value,
/// missing argument) is one line naming it on stderr and exit 1, the same
/// as every other bad-input error (exit 2 is reserved for a crashed guest).
fn parse_cli() -> Result<Cli, std::process::ExitCode> {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            Err(std::process::ExitCode::SUCCESS)
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("vmpod: a subcommand is required (see --help)");
            Err(std::process::ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("vmpod: {}", one_line(&e.render().to_string()));
            Err(std::process::ExitCode::FAILURE)
        }
    }
}

/// clap's multi-line error as one line: the message and its details
/// (e.g. the missing flags, a tip) up to the usage text, `error: ` dropped.
fn one_line(rendered: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        parts.push(match line.strip_prefix("tip: ") {
            Some(tip) => format!("({tip})"),
            None => line.to_string(),
        });
    }
    if parts.is_empty() {
        "invalid command line (see vmpod --help)".into()
    } else {
        parts.join(" ")
    }
}

fn main() -> std::process::ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(args: &[&str]) -> String {
        let e = Cli::try_parse_from(args).err().expect("parse error");
        one_line(&e.render().to_string())
    }

    #[test]
    fn clap_errors_become_one_line() {
        let e = parse_err(&["vmpod", "vm", "run", "--kernel", "k", "--vcpus", "300"]);
        assert!(e.contains("--vcpus") && e.contains("300"), "{e}");
        assert!(!e.contains('\n'));
        let e = parse_err(&["vmpod", "vm", "run", "--kernel", "k", "--console-log", "c"]);
        assert!(e.contains("--vsock-uds"), "{e}");
        assert!(!e.starts_with("error"), "{e}");
        let e = parse_err(&["vmpod", "vm", "run", "--frobnicate"]);
        assert!(e.contains("--frobnicate"), "{e}");
    }
}
