//! Root filesystem stage of a container's init: runs in the container's
//! fresh mount namespace, still seeing the guest's root.
//!
//! The container root is bind-mounted onto itself and becomes `/` with
//! `pivot_root` (the agent moved the initramfs onto a tmpfs at boot so this
//! works); on an initial-rootfs root it falls back to move + chroot (runc's
//! `no_pivot`).
//!
//! Until then the guest's root is `/`, and the rootfs (an image) must not
//! steer anything out of itself: every path inside it — mount destinations,
//! device nodes, `/dev` links — is resolved with `resolve.rs` and used
//! through its descriptor (`/proc/self/fd/N`), never joined as text.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::mount::{mount, MsFlags};

use super::resolve::{fd_path, open_in_root, parent_in_root, Create};
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
    // The bind mount just made, by descriptor: what every path below is
    // resolved in.
    let rootfd = File::open(root).ctx(|| format!("open rootfs {}", root.display()))?;
    for m in &cfg.mounts {
        do_mount(&rootfd, m)?;
    }
    if cfg.populate_dev {
        populate_dev(&rootfd, &cfg.devices)?;
    }
    for d in &cfg.devices {
        make_device(&rootfd, d)?;
    }
    drop(rootfd);
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

/// `dest` inside the rootfs, created as `create` says.
fn resolve(root: &File, dest: &str, create: Create) -> StageResult<OwnedFd> {
    open_in_root(root, dest, create).ctx(|| format!("resolve {dest:?} in the rootfs"))
}

fn do_mount(root: &File, m: &MountConfig) -> StageResult<()> {
    let flags = MsFlags::from_bits_truncate(m.flags);
    let bind = m.fstype == "bind" || flags.contains(MsFlags::MS_BIND);
    let extra = flags - MsFlags::MS_BIND - MsFlags::MS_REC;
    if bind {
        let src = Path::new(&m.source);
        let meta = std::fs::metadata(src).ctx(|| format!("bind source {:?}", m.source))?;
        let create = if meta.is_dir() {
            Create::Dir
        } else {
            Create::File
        };
        let dest = resolve(root, &m.destination, create)?;
        mount(
            Some(src),
            fd_path(&dest).as_str(),
            None::<&str>,
            MsFlags::MS_BIND | (flags & MsFlags::MS_REC),
            None::<&str>,
        )
        .ctx(|| format!("bind {} on {}", m.source, m.destination))?;
    } else {
        let dest = resolve(root, &m.destination, Create::Dir)?;
        let fstype = if m.fstype == "cgroup" {
            "cgroup2"
        } else {
            m.fstype.as_str()
        };
        let data = (!m.data.is_empty()).then_some(m.data.as_str());
        mount(
            Some(m.source.as_str()),
            fd_path(&dest).as_str(),
            Some(fstype),
            flags,
            data,
        )
        .ctx(|| format!("mount {fstype} on {}", m.destination))?;
    }
    if (bind && !extra.is_empty()) || m.propagation != 0 {
        // The descriptor above is of the directory under the new mount:
        // look again to get the mount itself.
        let top = resolve(root, &m.destination, Create::Nothing)?;
        let target = fd_path(&top);
        if bind && !extra.is_empty() {
            mount(
                None::<&str>,
                target.as_str(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None::<&str>,
            )
            .ctx(|| format!("remount {} with {extra:?}", m.destination))?;
        }
        if m.propagation != 0 {
            mount(
                None::<&str>,
                target.as_str(),
                None::<&str>,
                MsFlags::from_bits_truncate(m.propagation),
                None::<&str>,
            )
            .ctx(|| format!("propagation of {}", m.destination))?;
        }
    }
    Ok(())
}

/// /dev is a fresh tmpfs: bind the guest's basic device nodes (those the
/// spec does not list itself) and add the usual links.
fn populate_dev(root: &File, listed: &[DeviceConfig]) -> StageResult<()> {
    for d in DEVICES {
        let path = format!("/dev/{d}");
        if listed.iter().any(|l| l.path == path) {
            continue;
        }
        let target = resolve(root, &path, Create::File)?;
        mount(
            Some(path.as_str()),
            fd_path(&target).as_str(),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .ctx(|| format!("bind {path}"))?;
    }
    let links = [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ];
    let dev = resolve(root, "/dev", Create::Dir)?;
    for (name, target) in links {
        let (t, n) = (cstr(target)?, cstr(name)?);
        // SAFETY: valid C strings; dev is an open directory descriptor.
        let r = unsafe { libc::symlinkat(t.as_ptr(), dev.as_raw_fd(), n.as_ptr()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("symlink /dev/{name}: {e}"));
            }
        }
    }
    Ok(())
}

fn cstr(s: &str) -> StageResult<std::ffi::CString> {
    std::ffi::CString::new(s).ctx(|| format!("NUL in {s:?}"))
}

/// One `linux.devices` node: mknod with the spec's type, numbers, mode
/// and owner, in its parent directory (resolved in the rootfs) by name. A
/// node already there (a bind-mounted /dev) must be the same device.
fn make_device(root: &File, d: &DeviceConfig) -> StageResult<()> {
    let (dir, name) = parent_in_root(root, &d.path).ctx(|| format!("device {}", d.path))?;
    let (dir, n) = (dir.as_raw_fd(), cstr(&name)?);
    let kind = match d.kind {
        'c' => libc::S_IFCHR,
        'b' => libc::S_IFBLK,
        'p' => libc::S_IFIFO,
        k => return Err(format!("device {}: unknown type {k:?}", d.path)),
    };
    let rdev = libc::makedev(d.major, d.minor);
    let last = || std::io::Error::last_os_error();
    // SAFETY: valid C string and directory descriptor.
    if unsafe { libc::mknodat(dir, n.as_ptr(), kind | (d.mode & 0o7777), rdev) } < 0 {
        let e = last();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("mknod device {}: {e}", d.path));
        }
        // SAFETY: an all-zero stat is a valid out buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; no symlink followed.
        if unsafe { libc::fstatat(dir, n.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } < 0 {
            return Err(format!("device {}: {}", d.path, last()));
        }
        if st.st_mode & libc::S_IFMT != kind || (d.kind != 'p' && st.st_rdev != rdev) {
            return Err(format!(
                "device {}: a different file is already there",
                d.path
            ));
        }
    }
    // mknod's mode went through the umask. The node was just made (or
    // checked) by name in its directory: no symlink is followed here.
    // SAFETY: valid C string and directory descriptor.
    if unsafe { libc::fchmodat(dir, n.as_ptr(), d.mode & 0o7777, 0) } < 0 {
        return Err(format!("chmod device {}: {}", d.path, last()));
    }
    // SAFETY: as above.
    if unsafe { libc::fchownat(dir, n.as_ptr(), d.uid, d.gid, libc::AT_SYMLINK_NOFOLLOW) } < 0 {
        return Err(format!("chown device {}: {}", d.path, last()));
    }
    Ok(())
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
