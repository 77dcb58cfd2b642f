//! vmpod-rootfs-builder: builds the guest initramfs (see the library docs).

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use vmpod_rootfs_builder::image::{self, Compression, ImageSpec};

#[derive(Parser)]
#[command(
    name = "vmpod-rootfs-builder",
    about = "Build the vmpod guest initramfs (deterministic newc cpio)"
)]
struct Args {
    /// The static vmpod-agent binary (becomes /init).
    #[arg(long)]
    agent: PathBuf,
    /// Output file (e.g. build/guest/initramfs.cpio.gz).
    #[arg(long, short)]
    output: PathBuf,
    /// Add busybox (shell and tools) to the guest root for debugging.
    #[arg(long)]
    debug: bool,
    /// busybox binary used by --debug and --busybox-container.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Add a busybox container rootfs at /containers/NAME (tests).
    #[arg(long, value_name = "NAME")]
    busybox_container: Vec<String>,
    /// Copy a host directory to /containers/NAME (NAME=DIR).
    #[arg(long, value_name = "NAME=DIR")]
    container_dir: Vec<String>,
    /// Output compression.
    #[arg(long, default_value = "gzip", value_parser = ["gzip", "none"])]
    compress: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut container_dirs = Vec::new();
    for cd in &args.container_dir {
        let (n, d) = cd
            .split_once('=')
            .with_context(|| format!("--container-dir {cd:?}: expected NAME=DIR"))?;
        container_dirs.push((n.to_string(), PathBuf::from(d)));
    }
    let compression = if args.compress == "none" {
        Compression::None
    } else {
        Compression::Gzip
    };
    let spec = ImageSpec {
        agent: args.agent.clone(),
        debug_busybox: args.debug.then(|| args.busybox.clone()),
        busybox_containers: args
            .busybox_container
            .iter()
            .map(|n| (n.clone(), args.busybox.clone()))
            .collect(),
        container_dirs,
        compression,
    };
    let archive = image::build(&spec)?;
    image::write(&archive, compression, &args.output)?;
    let size = std::fs::metadata(&args.output)
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "{}: {} entries, {} bytes",
        args.output.display(),
        archive.len(),
        size
    );
    Ok(())
}
