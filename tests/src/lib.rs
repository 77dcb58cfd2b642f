//! Shared helpers for vmpod's end-to-end tests (`tests/tests/*.rs`).
//!
//! Artifacts: the guest kernel and initramfs are in `build/guest/` at the
//! repository root (built by `make guest`).

use std::path::PathBuf;

pub mod agent_vm;
pub mod bench;
pub mod cri_client;
pub mod initramfs;
pub mod net;
pub mod oci_image;
pub mod process;
pub mod registry;
pub mod vm;

/// Repository root (the workspace directory).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `build/` under the repository root.
pub fn build_dir() -> PathBuf {
    repo_root().join("build")
}

/// The `vmpod` binary the tests drive (`make test` builds it first).
pub fn vmpod_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("vmpod");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "vmpod binary not found under {}: run `cargo build -p vmpod` first",
        target.display()
    );
}

/// Why `dev` (e.g. `/dev/kvm`, `/dev/net/tun`) cannot be used by this
/// process, if it cannot: missing, or not openable read-write.
pub fn device_unavailable(dev: &str) -> Option<String> {
    if !std::path::Path::new(dev).exists() {
        return Some(format!("no {dev} on this host"));
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return Some(format!("{dev} is not accessible to this user: {e}"));
    }
    None
}
