//! `vmpod serve` (not built yet).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ServeArgs {}

pub fn run(_args: ServeArgs, _log_level: Option<&str>) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`vmpod serve` is not implemented yet")
}
