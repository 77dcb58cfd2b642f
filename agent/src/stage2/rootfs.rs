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
        // A detached copy of the source gets its flags and is then moved
        // onto the resolved destination's descriptor: nothing is looked up
        // by name after the destination was resolved, so a rename in a
        // shared volume cannot redirect the read-only remount.
        let tree = bind_tree(src, flags.contains(MsFlags::MS_REC))
            .ctx(|| format!("open_tree {}", m.source))?;
        set_attrs(&tree, extra, 0).ctx(|| format!("set {extra:?} on bind of {}", m.destination))?;
        attach(&tree, &dest).ctx(|| format!("bind {} on {}", m.source, m.destination))?;
        if m.propagation != 0 {
            // The descriptor now names the attached mount itself.
            set_attrs(&tree, MsFlags::empty(), m.propagation)
                .ctx(|| format!("propagation of {}", m.destination))?;
        }
        return Ok(());
    }
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
    if m.propagation != 0 {
        // The descriptor above is of the directory under the new mount:
        // look again to get the mount itself.
        let top = resolve(root, &m.destination, Create::Nothing)?;
        mount(
            None::<&str>,
            fd_path(&top).as_str(),
            None::<&str>,
            MsFlags::from_bits_truncate(m.propagation),
            None::<&str>,
        )
        .ctx(|| format!("propagation of {}", m.destination))?;
    }
    Ok(())
}

// The new mount API (Linux 5.12 for mount_setattr; the guest runs 6.1).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_ATIME: u64 = 0x70;
const MOUNT_ATTR_RELATIME: u64 = 0x0;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;

/// `struct mount_attr` (MOUNT_ATTR_SIZE_VER0).
#[repr(C)]
#[derive(Debug, Default, PartialEq, Eq)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn sys(r: libc::c_long) -> std::io::Result<libc::c_long> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A detached copy of the mount at `src` (and those below it if `rec`).
fn bind_tree(src: &Path, rec: bool) -> std::io::Result<OwnedFd> {
    let c = std::ffi::CString::new(src.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    if rec {
        flags |= AT_RECURSIVE;
    }
    // SAFETY: c is a NUL-terminated path that outlives the call.
    let fd = sys(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) })?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// The `mount_setattr` argument for the per-mount `MS_*` flags in
/// `flags` (others — sync, dirsync, ... — are the filesystem's, which a
/// bind cannot change) and `propagation` (`MS_SHARED`, ..., with
/// `MS_REC` for all mounts below too).
fn mount_attr(flags: MsFlags, propagation: u64) -> (MountAttr, bool) {
    let mut a = MountAttr::default();
    for (ms, attr) in [
        (MsFlags::MS_RDONLY, MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, MOUNT_ATTR_NOEXEC),
        (MsFlags::MS_NODIRATIME, MOUNT_ATTR_NODIRATIME),
    ] {
        if flags.contains(ms) {
            a.attr_set |= attr;
        }
    }
    for (ms, attr) in [
        (MsFlags::MS_NOATIME, MOUNT_ATTR_NOATIME),
        (MsFlags::MS_STRICTATIME, MOUNT_ATTR_STRICTATIME),
        (MsFlags::MS_RELATIME, MOUNT_ATTR_RELATIME),
    ] {
        if flags.contains(ms) {
            a.attr_clr |= MOUNT_ATTR_ATIME;
            a.attr_set |= attr;
        }
    }
    let p = MsFlags::from_bits_truncate(propagation);
    a.propagation = (p - MsFlags::MS_REC).bits();
    (a, p.contains(MsFlags::MS_REC))
}

/// Set `flags` and `propagation` on the mount `tree` names.
fn set_attrs(tree: &OwnedFd, flags: MsFlags, propagation: u64) -> std::io::Result<()> {
    let (attr, rec) = mount_attr(flags, propagation);
    if attr == MountAttr::default() {
        return Ok(());
    }
    let mut at = libc::AT_EMPTY_PATH as libc::c_uint;
    if rec {
        at |= AT_RECURSIVE;
    }
    // SAFETY: attr is a live struct mount_attr of the size passed; the
    // path is an empty C string.
    sys(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            at,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// Attach the detached `tree` on the resolved destination `dest`.
fn attach(tree: &OwnedFd, dest: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: both descriptors are live; the paths are empty C strings.
    sys(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            dest.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
    .map(drop)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_flags_become_mount_attrs() {
        let (a, rec) = mount_attr(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID, 0);
        assert_eq!(
            (a.attr_set, a.attr_clr, a.propagation, rec),
            (MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, false)
        );
        // atime modes replace each other: the whole field is cleared.
        let (a, _) = mount_attr(MsFlags::MS_NOATIME | MsFlags::MS_NODEV, 0);
        assert_eq!(a.attr_set, MOUNT_ATTR_NOATIME | MOUNT_ATTR_NODEV);
        assert_eq!(a.attr_clr, MOUNT_ATTR_ATIME);
        // Filesystem flags a bind cannot change set nothing.
        let (a, _) = mount_attr(MsFlags::MS_SYNCHRONOUS | MsFlags::MS_DIRSYNC, 0);
        assert_eq!(a, MountAttr::default());
        // Propagation, recursive for the r- forms.
        let p = (MsFlags::MS_REC | MsFlags::MS_SLAVE).bits();
        let (a, rec) = mount_attr(MsFlags::empty(), p);
        assert_eq!((a.propagation, rec), (MsFlags::MS_SLAVE.bits(), true));
        assert_eq!(std::mem::size_of::<MountAttr>(), 32);
    }
}
