//! Root filesystem stage of a container's init: runs in the container's
//! fresh mount namespace, still seeing the guest's root.
//!
//! The container root is bind-mounted onto itself and becomes `/` with
//! `pivot_root` (the agent moved the initramfs onto a tmpfs at boot so this
//! works); on an initial-rootfs root it falls back to move + chroot (runc's
//! `no_pivot`).

use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, MsFlags};

use super::{Context, StageResult};
use crate::container::config::{DeviceConfig, MountConfig, RootfsConfig};

const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

pub fn setup(cfg: &RootfsConfig) -> StageResult<()> {
    let root = Path::new(&cfg.path);
    if !root.is_dir() {
        return Err(format!("rootfs {:?} is not a directory", cfg.path));
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .ctx(|| "make / private".into())?;
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| format!("bind rootfs {}", root.display()))?;
    for m in &cfg.mounts {
        do_mount(root, m)?;
    }
    if cfg.populate_dev {
        populate_dev(root, &cfg.devices)?;
    }
    for d in &cfg.devices {
        make_device(root, d)?;
    }
    std::env::set_current_dir(root).ctx(|| "chdir rootfs".into())?;
    enter_root()?;
    if cfg.rootfs_propagation != 0 {
        // Every mount of this namespace was made private first, so a
        // shared root only makes a peer group inside the container.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::from_bits_truncate(cfg.rootfs_propagation),
            None::<&str>,
        )
        .ctx(|| "rootfs propagation".into())?;
    }

    for (k, v) in &cfg.sysctls {
        let path = format!("/proc/sys/{}", k.replace('.', "/"));
        std::fs::write(&path, v).ctx(|| format!("sysctl {k}={v}"))?;
    }
    for p in &cfg.masked_paths {
        mask(p)?;
    }
    for p in &cfg.readonly_paths {
        readonly(p)?;
    }
    if cfg.readonly {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .ctx(|| "remount rootfs read-only".into())?;
    }
    Ok(())
}

/// Make the current directory (the bind-mounted rootfs) the root:
/// `pivot_root(".", ".")` and detach the old root; where the guest root
/// cannot be pivoted (the agent runs straight from the initial rootfs),
/// move the rootfs over `/` and chroot (runc's `no_pivot`).
fn enter_root() -> StageResult<()> {
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            // The old root is stacked on "."; make it private, then detach.
            mount(
                None::<&str>,
                ".",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .ctx(|| "make old root private".into())?;
            nix::mount::umount2(".", nix::mount::MntFlags::MNT_DETACH)
                .ctx(|| "detach old root".into())?;
        }
        Err(nix::errno::Errno::EINVAL) => {
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .ctx(|| "move rootfs to /".into())?;
            nix::unistd::chroot(".").ctx(|| "chroot".into())?;
        }
        Err(e) => return Err(format!("pivot_root: {e}")),
    }
    std::env::set_current_dir("/").ctx(|| "chdir /".into())
}

/// `dest` inside `root`, lexically (no `..`, validated by the agent).
fn in_root(root: &Path, dest: &str) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in Path::new(dest).components() {
        if let Component::Normal(n) = c {
            p.push(n);
        }
    }
    p
}

fn do_mount(root: &Path, m: &MountConfig) -> StageResult<()> {
    let dest = in_root(root, &m.destination);
    let flags = MsFlags::from_bits_truncate(m.flags);
    let bind = m.fstype == "bind" || flags.contains(MsFlags::MS_BIND);
    if bind {
        let src = Path::new(&m.source);
        let meta = std::fs::metadata(src).ctx(|| format!("bind source {:?}", m.source))?;
        if meta.is_dir() {
            std::fs::create_dir_all(&dest).ctx(|| format!("mkdir {}", dest.display()))?;
        } else {
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).ctx(|| format!("mkdir {}", parent.display()))?;
            }
            if !dest.exists() {
                std::fs::File::create(&dest).ctx(|| format!("create {}", dest.display()))?;
            }
        }
        mount(
            Some(src),
            &dest,
            None::<&str>,
            MsFlags::MS_BIND | (flags & MsFlags::MS_REC),
            None::<&str>,
        )
        .ctx(|| format!("bind {} on {}", m.source, m.destination))?;
        let extra = flags - MsFlags::MS_BIND - MsFlags::MS_REC;
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None::<&str>,
            )
            .ctx(|| format!("remount {} with {extra:?}", m.destination))?;
        }
    } else {
        std::fs::create_dir_all(&dest).ctx(|| format!("mkdir {}", dest.display()))?;
        let fstype = if m.fstype == "cgroup" {
            "cgroup2"
        } else {
            m.fstype.as_str()
        };
        let data = (!m.data.is_empty()).then_some(m.data.as_str());
        mount(Some(m.source.as_str()), &dest, Some(fstype), flags, data)
            .ctx(|| format!("mount {fstype} on {}", m.destination))?;
    }
    if m.propagation != 0 {
        mount(
            None::<&str>,
            &dest,
            None::<&str>,
            MsFlags::from_bits_truncate(m.propagation),
            None::<&str>,
        )
        .ctx(|| format!("propagation of {}", m.destination))?;
    }
    Ok(())
}

/// /dev is a fresh tmpfs: bind the guest's basic device nodes (those the
/// spec does not list itself) and add the usual links.
fn populate_dev(root: &Path, listed: &[DeviceConfig]) -> StageResult<()> {
    let dev = root.join("dev");
    for d in DEVICES {
        if listed.iter().any(|l| l.path == format!("/dev/{d}")) {
            continue;
        }
        let target = dev.join(d);
        if !target.exists() {
            std::fs::File::create(&target).ctx(|| format!("create /dev/{d}"))?;
        }
        let src = format!("/dev/{d}");
        mount(
            Some(src.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .ctx(|| format!("bind {src}"))?;
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    for (name, target) in links {
        let l = dev.join(name);
        if std::fs::symlink_metadata(&l).is_err() {
            symlink(target, &l).ctx(|| format!("symlink /dev/{name}"))?;
        }
    }
    Ok(())
}

/// One `linux.devices` node: mknod with the spec's type, numbers, mode
/// and owner. A node already there (a bind-mounted /dev) must be the same
/// device.
fn make_device(root: &Path, d: &DeviceConfig) -> StageResult<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let path = in_root(root, &d.path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).ctx(|| format!("mkdir for device {}", d.path))?;
    }
    let kind = match d.kind {
        'c' => SFlag::S_IFCHR,
        'b' => SFlag::S_IFBLK,
        'p' => SFlag::S_IFIFO,
        k => return Err(format!("device {}: unknown type {k:?}", d.path)),
    };
    let rdev = makedev(u64::from(d.major), u64::from(d.minor));
    let mode = Mode::from_bits_truncate(d.mode);
    match mknod(&path, kind, mode, rdev) {
        Ok(()) => {}
        Err(nix::errno::Errno::EEXIST) => {
            let m = std::fs::symlink_metadata(&path).ctx(|| format!("device {}", d.path))?;
            let t = m.file_type();
            let same_type = match d.kind {
                'c' => t.is_char_device(),
                'b' => t.is_block_device(),
                _ => t.is_fifo(),
            };
            if !same_type || (d.kind != 'p' && m.rdev() != rdev) {
                return Err(format!(
                    "device {}: a different file is already there",
                    d.path
                ));
            }
        }
        Err(e) => return Err(format!("mknod device {}: {e}", d.path)),
    }
    // mknod's mode went through the umask.
    nix::sys::stat::fchmodat(
        None,
        &path,
        mode,
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .ctx(|| format!("chmod device {}", d.path))?;
    nix::unistd::fchownat(
        None,
        &path,
        Some(nix::unistd::Uid::from_raw(d.uid)),
        Some(nix::unistd::Gid::from_raw(d.gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .ctx(|| format!("chown device {}", d.path))
}

fn mask(p: &str) -> StageResult<()> {
    let Ok(meta) = std::fs::metadata(p) else {
        return Ok(());
    };
    if meta.is_dir() {
        mount(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    }
    .ctx(|| format!("mask {p}"))
}

fn readonly(p: &str) -> StageResult<()> {
    if std::fs::symlink_metadata(p).is_err() {
        return Ok(());
    }
    mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| format!("bind {p} read-only"))?;
    mount(
        None::<&str>,
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )
    .ctx(|| format!("remount {p} read-only"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_stay_inside_the_root() {
        let r = Path::new("/containers/c1");
        assert_eq!(in_root(r, "/proc"), Path::new("/containers/c1/proc"));
        assert_eq!(in_root(r, "/a/./b"), Path::new("/containers/c1/a/b"));
        assert_eq!(in_root(r, "/"), Path::new("/containers/c1"));
    }
}
