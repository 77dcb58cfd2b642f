//! PID 1 duties: base mounts, loopback, cgroup v2 parent.

use std::path::Path;

use nix::mount::{mount, MsFlags};

fn mount_one(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    if let Err(e) = std::fs::create_dir_all(target) {
        tracing::warn!(target, error = %e, "mkdir");
    }
    match mount(Some(src), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => tracing::warn!(target, fstype, error = %e, "mount failed"),
    }
}

/// Mount what a guest needs. Safe to call when already mounted.
pub fn mount_base() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if !Path::new("/proc/self").exists() {
        mount_one("proc", "/proc", "proc", nosuid, None);
    }
    if !Path::new("/sys/kernel").exists() {
        mount_one("sysfs", "/sys", "sysfs", nosuid, None);
    }
    if !Path::new("/dev/null").exists() {
        mount_one(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        );
    }
    mount_one(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    );
    mount_one("shm", "/dev/shm", "tmpfs", nosuid, Some("mode=1777"));
    mount_one(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_one(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        mount_one(
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid,
            Some("nsdelegate"),
        );
    }
}

/// The agent holds a few fds per container and exec (stdio pipes, pty
/// masters, pidfds): the kernel's 1024 for PID 1 would cap a pod at a few
/// hundred processes. Containers get [`CONTAINER_NOFILE`] back in stage 2.
pub const AGENT_NOFILE: libc::rlim_t = 1 << 20;

/// Open-file limit (soft, hard) a container starts with unless its spec
/// says otherwise (containerd 2's default: select()-safe soft limit, a hard
/// limit a process may raise itself to).
pub const CONTAINER_NOFILE: (libc::rlim_t, libc::rlim_t) = (1024, 524_288);

pub fn raise_fd_limit() -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: AGENT_NOFILE,
        rlim_max: AGENT_NOFILE,
    };
    // SAFETY: valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `ip link set lo up`.
pub fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket + ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let r = if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        r
    }
}

/// Move the initramfs contents onto a tmpfs mounted over `/` (what
/// switch_root does), so containers can `pivot_root` away from the guest
/// root: the initial rootfs itself can never be pivoted. Runs first thing as
/// PID 1, while nothing else is mounted.
pub fn switch_to_tmpfs_root() -> std::io::Result<()> {
    const NEW: &str = "/.vmpod-root";
    let st = nix::sys::statfs::statfs("/")?;
    let t = st.filesystem_type();
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    if t.0 as i64 != RAMFS_MAGIC && t != nix::sys::statfs::TMPFS_MAGIC {
        return Ok(()); // not an initramfs root
    }
    std::fs::create_dir_all(NEW)?;
    mount(
        Some("rootfs"),
        NEW,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    let new = Path::new(NEW);
    for entry in std::fs::read_dir("/")? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".vmpod-root" {
            continue;
        }
        move_tree(&entry.path(), &new.join(&name))?;
    }
    std::env::set_current_dir(NEW)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// Copy `src` to `dst` (files, dirs, symlinks, device nodes, modes), then
/// remove `src` so the initramfs memory is freed.
fn move_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let meta = std::fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    let perm = std::fs::Permissions::from_mode(meta.mode() & 0o7777);
    if ft.is_dir() {
        std::fs::create_dir(dst)?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            move_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        std::fs::set_permissions(dst, perm)?;
        std::fs::remove_dir(src)?;
    } else if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
        std::fs::remove_file(src)?;
    } else if ft.is_char_device() || ft.is_block_device() {
        let kind = if ft.is_char_device() {
            nix::sys::stat::SFlag::S_IFCHR
        } else {
            nix::sys::stat::SFlag::S_IFBLK
        };
        nix::sys::stat::mknod(
            dst,
            kind,
            nix::sys::stat::Mode::from_bits_truncate(meta.mode() & 0o7777),
            meta.rdev(),
        )?;
        std::fs::remove_file(src)?;
    } else if ft.is_file() {
        std::fs::copy(src, dst)?;
        std::fs::set_permissions(dst, perm)?;
        std::fs::remove_file(src)?;
    }
    Ok(())
}
