//! Paths inside a container's rootfs, resolved as the container will see
//! them — before `pivot_root`, while the guest's root is still `/`.
//!
//! A rootfs comes from an image: its symlinks must not take a mount
//! destination out of it. The walk goes one component at a time with
//! `openat(O_PATH | O_NOFOLLOW)` from a descriptor of the rootfs, so
//! nothing is looked up by a path the image controls: a symlink is read
//! and its target walked instead, an absolute target from the rootfs, and
//! `..` never goes above the rootfs. Missing directories (and a missing
//! last file, for file bind mounts) are created on the way with
//! `mkdirat`/`openat` relative to their parent's descriptor. The caller
//! uses the resulting descriptor through `/proc/self/fd/N`.

use std::collections::VecDeque;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path};

/// Symlinks followed at most in one walk (the kernel's limit too).
const MAX_LINKS: usize = 40;

/// What to create when the path (or part of it) is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    Nothing,
    /// Directories all the way.
    Dir,
    /// Directories, and an empty file as the last component.
    File,
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `openat(dir, name, O_PATH | O_NOFOLLOW | O_CLOEXEC)`.
fn open_path(dir: RawFd, name: &str) -> io::Result<OwnedFd> {
    let n = cstr(name)?;
    // SAFETY: valid C string; on success the fd is new and ours.
    let fd = check(unsafe {
        libc::openat(
            dir,
            n.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid out buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is writable.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// The target of the symlink `fd` refers to (an O_PATH descriptor).
fn read_link(fd: RawFd) -> io::Result<String> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: empty path with an O_PATH symlink fd reads that link; buf is
    // writable for its length.
    let n = unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    String::from_utf8(buf)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "symlink target is not UTF-8"))
}

fn components(p: &str) -> impl Iterator<Item = String> + '_ {
    Path::new(p).components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
        Component::ParentDir => Some("..".to_string()),
        _ => None,
    })
}

/// Open `path` (as the container sees it) inside the rootfs `root`,
/// creating what `create` asks for. Returns an `O_PATH` descriptor.
pub fn open_in_root(root: &File, path: &str, create: Create) -> io::Result<OwnedFd> {
    // Directories walked so far (the rootfs first), for "..".
    let mut dirs: Vec<OwnedFd> = vec![root.try_clone()?.into()];
    let mut rest: VecDeque<String> = components(path).collect();
    let mut links = 0;
    let mut made = 0;
    let mut last_fd: Option<OwnedFd> = None;
    while let Some(c) = rest.pop_front() {
        if let Some(fd) = last_fd.take() {
            dirs.push(fd);
        }
        if c == ".." {
            if dirs.len() > 1 {
                dirs.pop();
            }
            continue;
        }
        let cur = dirs.last().map(AsRawFd::as_raw_fd).unwrap_or(-1);
        let is_last = rest.is_empty();
        let fd = match open_path(cur, &c) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create != Create::Nothing => {
                made += 1;
                if made > 4096 {
                    return Err(io::Error::other("path keeps disappearing while created"));
                }
                make(cur, &c, is_last && create == Create::File)?;
                // Walk it like anything else (it may have been replaced).
                rest.push_front(c);
                continue;
            }
            Err(e) => return Err(e),
        };
        let st = fstat(fd.as_raw_fd())?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFLNK => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = read_link(fd.as_raw_fd())?;
                if target.starts_with('/') {
                    dirs.truncate(1);
                }
                for (i, t) in components(&target).enumerate() {
                    rest.insert(i, t);
                }
            }
            libc::S_IFDIR => last_fd = Some(fd),
            _ if is_last => last_fd = Some(fd),
            _ => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
        }
    }
    match last_fd {
        Some(fd) => Ok(fd),
        // The path was the rootfs itself (or walked back to it).
        None => dirs
            .pop()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT)),
    }
}

/// Create `name` in `dir`: an empty file or a directory (one that appeared
/// meanwhile is fine).
fn make(dir: RawFd, name: &str, file: bool) -> io::Result<()> {
    let n = cstr(name)?;
    let r = if file {
        // SAFETY: valid C string; the fd is closed right away.
        unsafe {
            let fd = libc::openat(
                dir,
                n.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o644,
            );
            if fd >= 0 {
                libc::close(fd);
            }
            fd
        }
    } else {
        // SAFETY: valid C string.
        unsafe { libc::mkdirat(dir, n.as_ptr(), 0o755) }
    };
    match check(r) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The parent directory of `path` inside the rootfs (created if missing)
/// and the last component's name, for `*at` calls that must not follow a
/// symlink in that last place.
pub fn parent_in_root(root: &File, path: &str) -> io::Result<(OwnedFd, String)> {
    let mut parts: Vec<String> = components(path).collect();
    let name = parts
        .pop()
        .filter(|n| n != "..")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let parent = open_in_root(root, &parts.join("/"), Create::Dir)?;
    Ok((parent, name))
}

/// `/proc/self/fd/N`: the path mount(2) and friends can take for `fd`.
pub fn fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Where `fd` really is (its /proc/self/fd link).
    fn real(fd: &OwnedFd) -> std::path::PathBuf {
        std::fs::read_link(fd_path(fd)).unwrap()
    }

    fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("rootfs");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        (t, root, outside)
    }

    #[test]
    fn absolute_symlinks_stay_inside() {
        let (_t, root, outside) = setup();
        // An image link to an absolute path that exists outside too.
        symlink(&outside, root.join("escape")).unwrap();
        symlink("/", root.join("slash")).unwrap();
        let r = File::open(&root).unwrap();
        let fd = open_in_root(&r, "/escape/sub/dir", Create::Dir).unwrap();
        let expected = root
            .join(outside.strip_prefix("/").unwrap())
            .join("sub/dir");
        assert_eq!(real(&fd), expected);
        assert!(!outside.join("sub").exists(), "created outside the rootfs");
        let fd = open_in_root(&r, "/slash/etc", Create::Nothing).unwrap();
        assert_eq!(real(&fd), root.join("etc"));
    }

    #[test]
    fn dotdot_never_leaves_the_root() {
        let (_t, root, outside) = setup();
        symlink("../../../../..", root.join("etc/up")).unwrap();
        let r = File::open(&root).unwrap();
        let fd = open_in_root(&r, "/etc/up/outside/x", Create::Dir).unwrap();
        assert_eq!(real(&fd), root.join("outside/x"));
        assert!(!outside.join("x").exists());
        let fd = open_in_root(&r, "/../../etc", Create::Nothing).unwrap();
        assert_eq!(real(&fd), root.join("etc"));
        let fd = open_in_root(&r, "/", Create::Nothing).unwrap();
        assert_eq!(real(&fd), root);
    }

    #[test]
    fn files_links_loops_and_errors() {
        let (_t, root, outside) = setup();
        std::fs::write(outside.join("secret"), "x").unwrap();
        symlink(outside.join("secret"), root.join("etc/hosts")).unwrap();
        let r = File::open(&root).unwrap();
        // A file bind target behind an absolute link is created inside.
        let fd = open_in_root(&r, "/etc/hosts", Create::File).unwrap();
        let inside = root.join(outside.strip_prefix("/").unwrap()).join("secret");
        assert_eq!(real(&fd), inside);
        assert_eq!(std::fs::read_to_string(&inside).unwrap(), "");
        assert_eq!(
            std::fs::read_to_string(outside.join("secret")).unwrap(),
            "x"
        );
        // Loops end.
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        let e = open_in_root(&r, "/loop1/x", Create::Dir).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        // A file in the middle of a path.
        std::fs::write(root.join("etc/passwd"), "").unwrap();
        let e = open_in_root(&r, "/etc/passwd/x", Create::Dir).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
        // Missing without create.
        let e = open_in_root(&r, "/nope", Create::Nothing).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // Parent + name for *at calls.
        let (p, name) = parent_in_root(&r, "/escape-dir/dev/fuse").unwrap();
        assert_eq!(
            (real(&p), name.as_str()),
            (root.join("escape-dir/dev"), "fuse")
        );
    }
}
