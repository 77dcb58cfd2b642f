//! Disk usage of a directory tree (bytes on disk and inodes), as `du` counts.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use vmpod_images::FsUsage;

/// Walk `root` (not following symlinks, hard links counted once). A missing
/// root is empty.
pub fn usage(root: &Path) -> std::io::Result<FsUsage> {
    let mut seen = HashSet::new();
    let mut used_bytes = 0u64;
    let mut inodes_used = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = match std::fs::symlink_metadata(&p) {
            Ok(md) => md,
            // Raced with a removal, or the root does not exist yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        inodes_used += 1;
        used_bytes += md.blocks() * 512;
        if md.is_dir() {
            for entry in std::fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        }
    }
    let timestamp_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    Ok(FsUsage {
        timestamp_ns,
        used_bytes,
        inodes_used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_files_dirs_and_hardlinks_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/a"), vec![7u8; 64 * 1024]).unwrap();
        std::fs::hard_link(d.path().join("sub/a"), d.path().join("b")).unwrap();
        let u = usage(d.path()).unwrap();
        assert_eq!(u.inodes_used, 3, "root, sub, one file");
        assert!(u.used_bytes >= 64 * 1024, "{u:?}");
        assert!(u.timestamp_ns > 0);
        assert_eq!(usage(&d.path().join("missing")).unwrap().inodes_used, 0);
    }
}
