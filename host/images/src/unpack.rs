//! Layer unpacking: one directory per layer, in overlayfs "lowerdir" form.
//!
//! * Compression is detected from the blob's magic bytes (gzip, zstd, or a
//!   plain tar), so mislabeled media types still unpack.
//! * The uncompressed stream is hashed as it is read: the result is the
//!   layer's diff ID, which the caller checks against the image config.
//! * OCI whiteouts become overlayfs whiteouts: `dir/.wh.name` -> a character
//!   device 0/0 at `dir/name`; `dir/.wh..wh..opq` -> xattr
//!   `trusted.overlay.opaque=y` on `dir`.
//! * Paths are sanitised: a leading `/` is stripped (as containerd and GNU tar
//!   do), `..` components are refused, and nothing is ever written through a
//!   symlink (a parent component that is a symlink is refused), so an entry
//!   cannot land outside the layer directory. Hard-link targets get the same
//!   checks.
//! * Every entry keeps its type, owner (when we are root), mode and mtime:
//!   character and block devices and FIFOs become real device nodes and
//!   FIFOs (`mknod`), directories get their mtime after the whole layer is
//!   written (creating entries in them would change it), and `SCHILY.xattr.*`
//!   extended attributes are set on files, directories, symlinks and nodes
//!   alike (`lsetxattr`, never through a symlink). `trusted.overlay.*`
//!   attributes from the image are dropped: only we decide what overlayfs
//!   sees (opaque directories come from `.wh..wh..opq`).
//! * Directory mtimes are set at the end through a handle opened beneath
//!   the layer root with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`,
//!   never by path: a later entry may have replaced a parent with a
//!   symlink (`a/`, `a/x/`, then `a -> /etc`), and a path walk would then
//!   touch `/etc/x` on the host. Saved directories that a later entry
//!   removed or replaced are dropped before that.
//! * Without CAP_MKNOD (unprivileged, or root in a user namespace) device
//!   nodes are skipped with a warning, as containerd does there, and so
//!   are hard links to a skipped node.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufReader, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{self, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use sha2::{Digest as _, Sha256};
use tar::EntryType;
use tracing::{debug, warn};

use crate::error::{ImageError, Result, StoreContext};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const PAX_XATTR: &[u8] = b"SCHILY.xattr.";
const OVERLAY_XATTRS: &[u8] = b"trusted.overlay.";

/// What an unpack produced.
#[derive(Debug, Clone)]
pub struct Unpacked {
    /// `sha256:` of the uncompressed tar stream.
    pub diff_id: String,
    /// Uncompressed bytes read.
    pub tar_bytes: u64,
    pub entries: u64,
}

/// Make a (possibly absolute) tar path relative and free of `..`.
/// `Ok(None)` for the archive root (`.` or `/`).
pub fn sanitize_path(raw: &Path) -> std::result::Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                return Err(format!("tar entry {} contains '..'", raw.display()));
            }
            Component::Prefix(_) => {
                return Err(format!("tar entry {} has a path prefix", raw.display()));
            }
        }
    }
    Ok(if out.as_os_str().is_empty() {
        None
    } else {
        Some(out)
    })
}

/// Create the parents of `root/rel` as real directories, refusing to pass
/// through a symlink or a non-directory.
fn ensure_parents(
    root: &Path,
    rel: &Path,
    state: &mut LayerState,
) -> std::result::Result<(), String> {
    let mut cur = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        cur.push(c);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "entry {} would be written through symlink {}",
                    rel.display(),
                    cur.display()
                ));
            }
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                // A file (or whiteout) where a directory is needed: replace.
                fs::remove_file(&cur).map_err(|e| format!("replace {}: {e}", cur.display()))?;
                state.forget(cur.strip_prefix(root).unwrap_or(&cur));
                fs::create_dir(&cur).map_err(|e| format!("mkdir {}: {e}", cur.display()))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&cur).map_err(|e| format!("mkdir {}: {e}", cur.display()))?;
            }
            Err(e) => return Err(format!("stat {}: {e}", cur.display())),
        }
    }
    Ok(())
}

/// Remove whatever is at `path` (not following symlinks); directories only
/// when `keep_dir` is false.
fn clear_path(path: &Path, keep_dir: bool) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            if keep_dir {
                Ok(())
            } else {
                fs::remove_dir_all(path)
            }
        }
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What an unpack remembers across entries.
#[derive(Default)]
struct LayerState {
    /// Directories (relative to the layer root) and their mtimes, set once
    /// the whole layer is written.
    dir_times: Vec<(PathBuf, i64)>,
    /// Device nodes (relative) left out for lack of CAP_MKNOD.
    skipped: HashSet<PathBuf>,
}

impl LayerState {
    /// `rel` and everything under it was removed or replaced: forget what
    /// we saved about it.
    fn forget(&mut self, rel: &Path) {
        self.dir_times.retain(|(d, _)| !d.starts_with(rel));
        self.skipped.retain(|d| !d.starts_with(rel));
    }
}

/// Hashes everything read through it.
struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    n: u64,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

/// Open `blob` and return a reader over the uncompressed tar stream.
fn decompressed(blob: &Path) -> Result<Box<dyn Read + Send>> {
    let mut f = fs::File::open(blob).ctx(|| format!("open layer {}", blob.display()))?;
    let mut magic = [0u8; 4];
    let n = read_full(&mut f, &mut magic).ctx(|| format!("read {}", blob.display()))?;
    let f = io::Cursor::new(magic[..n].to_vec()).chain(f);
    let r: Box<dyn Read + Send> = if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f)))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(
            zstd::stream::read::Decoder::new(f)
                .ctx(|| format!("zstd decoder for {}", blob.display()))?,
        )
    } else {
        Box::new(BufReader::new(f))
    };
    Ok(r)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Unpack the layer blob at `blob` into the (empty or absent) directory `dest`.
pub fn unpack_layer(blob: &Path, dest: &Path) -> Result<Unpacked> {
    let op = || format!("unpack {} into {}", blob.display(), dest.display());
    fs::create_dir_all(dest).ctx(op)?;
    let mut hr = HashReader {
        inner: decompressed(blob)?,
        hasher: Sha256::new(),
        n: 0,
    };
    let is_root = nix::unistd::geteuid().is_root();
    let mut entries = 0u64;
    let mut state = LayerState::default();
    {
        let mut archive = tar::Archive::new(&mut hr);
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        // Ours, for every entry type (the tar crate only does regular files).
        archive.set_unpack_xattrs(false);
        archive.set_preserve_ownerships(is_root);
        archive.set_overwrite(true);
        for entry in archive.entries().ctx(op)? {
            let mut entry = entry.ctx(op)?;
            apply_entry(&mut entry, dest, is_root, &mut state)
                .map_err(|e| ImageError::store(op(), e))?;
            entries += 1;
        }
    }
    // Directory mtimes last: every entry written into a directory changed it.
    set_dir_times(dest, &state.dir_times).map_err(|e| ImageError::store(op(), e))?;
    // Hash any trailing padding after the end-of-archive blocks as well.
    io::copy(&mut hr, &mut io::sink()).ctx(op)?;
    Ok(Unpacked {
        diff_id: format!("sha256:{}", hex::encode(hr.hasher.finalize())),
        tar_bytes: hr.n,
        entries,
    })
}

fn apply_entry<R: Read>(
    entry: &mut tar::Entry<R>,
    root: &Path,
    is_root: bool,
    state: &mut LayerState,
) -> std::result::Result<(), String> {
    let kind = entry.header().entry_type();
    if kind.is_pax_global_extensions()
        || kind.is_pax_local_extensions()
        || kind.is_gnu_longname()
        || kind.is_gnu_longlink()
    {
        return Ok(()); // metadata for other entries, nothing to create
    }
    let raw = entry
        .path()
        .map_err(|e| format!("bad entry path: {e}"))?
        .into_owned();
    let Some(rel) = sanitize_path(&raw)? else {
        return Ok(()); // the archive root itself
    };
    ensure_parents(root, &rel, state)?;
    let target = root.join(&rel);
    let name = rel
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();

    if name == OPAQUE_MARKER {
        let dir = target.parent().unwrap_or(root);
        xattr::set(dir, OPAQUE_XATTR, b"y")
            .map_err(|e| format!("set {OPAQUE_XATTR} on {}: {e}", dir.display()))?;
        return Ok(());
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        if hidden.starts_with(WHITEOUT_PREFIX) || hidden.is_empty() {
            return Ok(()); // other AUFS metadata (.wh..wh.plnk etc.): ignore
        }
        let wh = target.with_file_name(hidden);
        clear_path(&wh, false).map_err(|e| format!("clear {}: {e}", wh.display()))?;
        state.forget(&rel.with_file_name(hidden));
        nix::sys::stat::mknod(
            &wh,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .map_err(|e| format!("whiteout {}: {e}", wh.display()))?;
        return Ok(());
    }

    clear_path(&target, kind == EntryType::Directory)
        .map_err(|e| format!("replace {}: {e}", target.display()))?;
    if kind == EntryType::Directory {
        // A directory already there is kept, with what is in it.
        state.skipped.remove(&rel);
    } else {
        state.forget(&rel);
    }
    if kind == EntryType::Link {
        let link = entry
            .link_name()
            .map_err(|e| format!("hard link name of {}: {e}", raw.display()))?
            .ok_or_else(|| format!("hard link {} without target", raw.display()))?;
        let link_rel = sanitize_path(&link)?
            .ok_or_else(|| format!("hard link {} to the root", raw.display()))?;
        if state.skipped.contains(&link_rel) {
            warn!(
                path = %raw.display(),
                target = %link.display(),
                "hard link to a skipped device node skipped"
            );
            return Ok(());
        }
        let src = root.join(&link_rel);
        ensure_parents(root, &link_rel, state)?;
        let m = fs::symlink_metadata(&src)
            .map_err(|e| format!("hard link {} -> {}: {e}", raw.display(), link.display()))?;
        if m.is_dir() {
            return Err(format!("hard link {} to a directory", raw.display()));
        }
        fs::hard_link(&src, &target).map_err(|e| format!("hard link {}: {e}", target.display()))?;
        return Ok(());
    }
    match kind {
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            if !make_node(entry.header(), &target, is_root)? {
                state.skipped.insert(rel);
                return Ok(());
            }
        }
        _ => {
            entry
                .unpack(&target)
                .map_err(|e| format!("unpack {}: {e}", raw.display()))?;
        }
    }
    apply_xattrs(entry, &target)?;
    if kind == EntryType::Directory {
        let mtime = entry
            .header()
            .mtime()
            .map_err(|e| format!("mtime of {}: {e}", raw.display()))?;
        state
            .dir_times
            .push((rel, i64::try_from(mtime).unwrap_or(i64::MAX)));
    }
    Ok(())
}

/// A character or block device or a FIFO, with the entry's owner (when we
/// are root), mode and mtime. `Ok(false)` when skipped: device nodes need
/// CAP_MKNOD, so an unpack without it (unprivileged, or root in a user
/// namespace) leaves them out, as containerd does in a user namespace.
fn make_node(h: &tar::Header, target: &Path, is_root: bool) -> std::result::Result<bool, String> {
    let what = |e: &dyn std::fmt::Display| format!("create node {}: {e}", target.display());
    let kind = match h.entry_type() {
        EntryType::Char => SFlag::S_IFCHR,
        EntryType::Block => SFlag::S_IFBLK,
        _ => SFlag::S_IFIFO,
    };
    let dev = if kind == SFlag::S_IFIFO {
        0
    } else {
        let major = h.device_major().map_err(|e| what(&e))?.unwrap_or(0);
        let minor = h.device_minor().map_err(|e| what(&e))?.unwrap_or(0);
        stat::makedev(u64::from(major), u64::from(minor))
    };
    let mode = h.mode().map_err(|e| what(&e))? & 0o7777;
    match stat::mknod(target, kind, Mode::empty(), dev) {
        Ok(()) => {}
        Err(Errno::EPERM) if kind != SFlag::S_IFIFO => {
            warn!(path = %target.display(), "device node skipped: no CAP_MKNOD");
            return Ok(false);
        }
        Err(e) => return Err(what(&e)),
    }
    if is_root {
        let uid = h.uid().map_err(|e| what(&e))?;
        let gid = h.gid().map_err(|e| what(&e))?;
        let id = |v: u64| u32::try_from(v).map_err(|_| what(&format!("id {v} too large")));
        nix::unistd::fchownat(
            None,
            target,
            Some(nix::unistd::Uid::from_raw(id(uid)?)),
            Some(nix::unistd::Gid::from_raw(id(gid)?)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| what(&e))?;
    }
    // After the chown (which clears set-id bits), like the tar crate does.
    fs::set_permissions(target, fs::Permissions::from_mode(mode)).map_err(|e| what(&e))?;
    let mtime = h.mtime().map_err(|e| what(&e))?;
    set_mtime(target, i64::try_from(mtime).unwrap_or(i64::MAX))?;
    Ok(true)
}

/// atime = mtime = `secs`, on the entry itself (never through a symlink).
/// A path gone or replaced since (a later entry removed it) is fine.
fn set_mtime(path: &Path, secs: i64) -> std::result::Result<(), String> {
    let t = TimeSpec::new(secs, 0);
    match stat::utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink) {
        Ok(()) | Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => Ok(()),
        Err(e) => Err(format!("set mtime of {}: {e}", path.display())),
    }
}

/// Set each saved directory's atime = mtime through a handle opened
/// beneath `root` without following any symlink (see the module docs).
/// A directory gone or replaced since is fine.
fn set_dir_times(root: &Path, dirs: &[(PathBuf, i64)]) -> std::result::Result<(), String> {
    if dirs.is_empty() {
        return Ok(());
    }
    let root_fd = open_fd(
        None,
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
    )
    .map_err(|e| format!("open {}: {e}", root.display()))?;
    let how = |flags: OFlag| {
        OpenHow::new()
            .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS)
    };
    let open_beneath = |rel: &Path, flags: OFlag| {
        nix::fcntl::openat2(root_fd.as_raw_fd(), rel, how(flags))
            // SAFETY: openat2 just returned this descriptor; nothing else owns it.
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
    };
    for (rel, secs) in dirs {
        let t = TimeSpec::new(*secs, 0);
        let res = match open_beneath(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
            Ok(fd) => stat::futimens(fd.as_raw_fd(), &t, &t),
            // A directory we may not read (unprivileged unpack): its parent
            // is opened the same safe way and the last component is never
            // followed.
            Err(Errno::EACCES) => {
                let parent = rel.parent().unwrap_or(Path::new(""));
                let name = rel.file_name().unwrap_or_default();
                let pfd = if parent.as_os_str().is_empty() {
                    root_fd.try_clone().map_err(|_| Errno::EBADF)
                } else {
                    open_beneath(parent, OFlag::O_PATH | OFlag::O_DIRECTORY)
                };
                pfd.and_then(|p| {
                    stat::utimensat(
                        Some(p.as_raw_fd()),
                        name,
                        &t,
                        &t,
                        UtimensatFlags::NoFollowSymlink,
                    )
                })
            }
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => {}
            // Gone, or no longer a directory beneath the root reachable
            // without symlinks: a later entry replaced it.
            Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP | Errno::EXDEV) => {
                debug!(path = %rel.display(), "directory mtime not set: replaced");
            }
            Err(e) => return Err(format!("set mtime of {}: {e}", root.join(rel).display())),
        }
    }
    Ok(())
}

fn open_fd(dir: Option<&OwnedFd>, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let fd = nix::fcntl::openat(dir.map(|d| d.as_raw_fd()), path, flags, Mode::empty())?;
    // SAFETY: openat just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The entry's `SCHILY.xattr.*` PAX records, set with `lsetxattr`.
/// `trusted.overlay.*` is dropped (it would steer overlayfs). A file system
/// without xattr support, or one refusing a namespace on this file type
/// (`user.*` on a symlink), gets a warning, as containerd does.
fn apply_xattrs<R: Read>(
    entry: &mut tar::Entry<R>,
    target: &Path,
) -> std::result::Result<(), String> {
    let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| format!("PAX header of {}: {e}", target.display()))?
    else {
        return Ok(());
    };
    for ext in exts {
        let ext = ext.map_err(|e| format!("PAX record of {}: {e}", target.display()))?;
        let Some(name) = ext.key_bytes().strip_prefix(PAX_XATTR) else {
            continue;
        };
        if name.starts_with(OVERLAY_XATTRS) {
            debug!(path = %target.display(), "dropped an image's trusted.overlay xattr");
            continue;
        }
        let name = OsStr::from_bytes(name);
        match xattr::set(target, name, ext.value_bytes()) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.raw_os_error().map(Errno::from_raw),
                    Some(Errno::ENOTSUP | Errno::EPERM)
                ) =>
            {
                warn!(path = %target.display(), xattr = ?name, error = %e, "xattr not set");
            }
            Err(e) => {
                return Err(format!("set xattr {name:?} on {}: {e}", target.display()));
            }
        }
    }
    Ok(())
}

/// Size (bytes by allocated blocks) and inode count of a tree, counting hard
/// links once.
pub fn tree_usage(root: &Path) -> io::Result<(u64, u64)> {
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if seen.insert((m.dev(), m.ino())) {
            bytes += m.blocks() * 512;
            inodes += 1;
        }
        if m.is_dir() {
            match fs::read_dir(&p) {
                Ok(rd) => {
                    for e in rd.flatten() {
                        stack.push(e.path());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests;
