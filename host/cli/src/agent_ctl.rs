//! `vmpod agent_ctl` (not built yet).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct AgentCtlArgs {}

pub fn run(_args: AgentCtlArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`vmpod agent_ctl` is not implemented yet")
}
