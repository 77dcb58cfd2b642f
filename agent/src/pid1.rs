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
