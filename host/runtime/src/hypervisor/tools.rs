//! Finding the helper binaries backends run (`qemu-system-x86_64`,
//! `virtiofsd`, `vmpod` itself).
//!
//! Order: `VMPOD_<NAME>` environment override (e.g. `VMPOD_VIRTIOFSD`),
//! `build/tools/bin/<name>` in the checkout that holds the running
//! executable (where `scripts/install-tools.sh` puts them), then `$PATH`.

use std::path::{Path, PathBuf};

/// Locate `name`; `None` when it is nowhere.
pub fn find(name: &str) -> Option<PathBuf> {
    let var = format!(
        "VMPOD_{}",
        name.to_ascii_uppercase().replace(['-', '.'], "_")
    );
    if let Some(p) = std::env::var_os(&var) {
        let p = PathBuf::from(p);
        return is_executable(&p).then_some(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            let candidate = dir.join("build/tools/bin").join(name);
            if is_executable(&candidate) {
                return Some(candidate);
            }
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        let candidate = cwd.join("build/tools/bin").join(name);
        if is_executable(&candidate) {
            return Some(candidate);
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// The `vmpod` binary itself (backends run its `vm run` and
/// `vm vhost-user-vsock` subcommands): `VMPOD_VMPOD`, else the running
/// executable when it is `vmpod`, else a `vmpod` beside it or one level up
/// (cargo puts test binaries in `target/<profile>/deps/`), else [`find`].
pub fn vmpod() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VMPOD_VMPOD") {
        let p = PathBuf::from(p);
        return is_executable(&p).then_some(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if exe.file_name().is_some_and(|n| n == "vmpod") {
            return Some(exe);
        }
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("vmpod");
            if is_executable(&candidate) {
                return Some(candidate);
            }
        }
    }
    find("vmpod")
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_sh_on_path_and_not_nonsense() {
        assert!(super::find("sh").is_some());
        assert!(super::find("no-such-tool-vmpod-xyz").is_none());
    }

    #[test]
    fn vmpod_is_found_beside_test_binaries() {
        // cargo builds the workspace's binaries before running tests.
        if let Some(p) = super::vmpod() {
            assert!(p.ends_with("vmpod"), "{}", p.display());
        }
    }
}
