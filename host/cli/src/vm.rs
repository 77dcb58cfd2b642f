//! `vmpod vm` (not built yet).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct VmArgs {}

pub fn run(_args: VmArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`vmpod vm` is not implemented yet")
}
