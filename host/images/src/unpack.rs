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

use std::fs;
use std::io::{self, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};
use tar::EntryType;

use crate::error::{ImageError, Result, StoreContext};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

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
fn ensure_parents(root: &Path, rel: &Path) -> std::result::Result<(), String> {
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
    {
        let mut archive = tar::Archive::new(&mut hr);
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(true);
        archive.set_preserve_ownerships(is_root);
        archive.set_overwrite(true);
        for entry in archive.entries().ctx(op)? {
            let mut entry = entry.ctx(op)?;
            apply_entry(&mut entry, dest).map_err(|e| ImageError::store(op(), e))?;
            entries += 1;
        }
    }
    // Hash any trailing padding after the end-of-archive blocks as well.
    io::copy(&mut hr, &mut io::sink()).ctx(op)?;
    Ok(Unpacked {
        diff_id: format!("sha256:{}", hex::encode(hr.hasher.finalize())),
        tar_bytes: hr.n,
        entries,
    })
}

fn apply_entry<R: Read>(entry: &mut tar::Entry<R>, root: &Path) -> std::result::Result<(), String> {
    let raw = entry
        .path()
        .map_err(|e| format!("bad entry path: {e}"))?
        .into_owned();
    let Some(rel) = sanitize_path(&raw)? else {
        return Ok(()); // the archive root itself
    };
    ensure_parents(root, &rel)?;
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
        nix::sys::stat::mknod(
            &wh,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            nix::sys::stat::makedev(0, 0),
        )
        .map_err(|e| format!("whiteout {}: {e}", wh.display()))?;
        return Ok(());
    }

    let kind = entry.header().entry_type();
    clear_path(&target, kind == EntryType::Directory)
        .map_err(|e| format!("replace {}: {e}", target.display()))?;
    if kind == EntryType::Link {
        let link = entry
            .link_name()
            .map_err(|e| format!("hard link name of {}: {e}", raw.display()))?
            .ok_or_else(|| format!("hard link {} without target", raw.display()))?;
        let link_rel = sanitize_path(&link)?
            .ok_or_else(|| format!("hard link {} to the root", raw.display()))?;
        let src = root.join(&link_rel);
        ensure_parents(root, &link_rel)?;
        let m = fs::symlink_metadata(&src)
            .map_err(|e| format!("hard link {} -> {}: {e}", raw.display(), link.display()))?;
        if m.is_dir() {
            return Err(format!("hard link {} to a directory", raw.display()));
        }
        fs::hard_link(&src, &target).map_err(|e| format!("hard link {}: {e}", target.display()))?;
        return Ok(());
    }
    entry
        .unpack(&target)
        .map_err(|e| format!("unpack {}: {e}", raw.display()))?;
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
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn sanitize() {
        let s = |p: &str| sanitize_path(Path::new(p));
        assert_eq!(s("etc/passwd").unwrap(), Some(PathBuf::from("etc/passwd")));
        assert_eq!(s("/etc/passwd").unwrap(), Some(PathBuf::from("etc/passwd")));
        assert_eq!(s("./a/./b/").unwrap(), Some(PathBuf::from("a/b")));
        assert_eq!(s("./").unwrap(), None);
        assert_eq!(s("/").unwrap(), None);
        assert!(s("../etc/passwd").is_err());
        assert!(s("a/../../b").is_err());
        assert!(s("/a/..").is_err());
    }

    /// Build a tar in memory; `(path, kind, data_or_link)`.
    fn tar_of(entries: &[(&str, EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            h.set_mtime(1);
            h.set_uid(0);
            h.set_gid(0);
            // Write the name raw so that `..` and absolute paths survive.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            match kind {
                EntryType::Symlink | EntryType::Link => {
                    h.set_size(0);
                    let l = data.as_bytes();
                    h.as_old_mut().linkname[..l.len()].copy_from_slice(l);
                    h.set_cksum();
                    b.append(&h, io::empty()).unwrap();
                }
                _ => {
                    h.set_size(data.len() as u64);
                    h.set_cksum();
                    b.append(&h, data.as_bytes()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn unpack_bytes(tar: &[u8]) -> (tempfile::TempDir, Result<Unpacked>) {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("blob");
        fs::write(&blob, tar).unwrap();
        let dest = dir.path().join("layer");
        let r = unpack_layer(&blob, &dest);
        (dir, r)
    }

    #[test]
    fn plain_and_compressed_give_same_diff_id() {
        let tar = tar_of(&[
            ("bin/", EntryType::Directory, ""),
            ("bin/hello", EntryType::Regular, "hi\n"),
            ("bin/link", EntryType::Symlink, "/bin/hello"),
            ("bin/hard", EntryType::Link, "bin/hello"),
        ]);
        let want = crate::content::sha256_digest(&tar);
        let (d, r) = unpack_bytes(&tar);
        let u = r.unwrap();
        assert_eq!(u.diff_id, want);
        assert_eq!(u.entries, 4);
        let l = d.path().join("layer");
        assert_eq!(fs::read_to_string(l.join("bin/hello")).unwrap(), "hi\n");
        assert_eq!(
            fs::read_link(l.join("bin/link")).unwrap(),
            Path::new("/bin/hello")
        );
        assert_eq!(
            fs::metadata(l.join("bin/hard")).unwrap().ino(),
            fs::metadata(l.join("bin/hello")).unwrap().ino()
        );

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        let (_d, r) = unpack_bytes(&gz.finish().unwrap());
        assert_eq!(r.unwrap().diff_id, want);
        let zs = zstd::encode_all(&tar[..], 3).unwrap();
        let (_d, r) = unpack_bytes(&zs);
        assert_eq!(r.unwrap().diff_id, want);
    }

    #[test]
    fn traversal_is_refused() {
        for entries in [
            vec![("../evil", EntryType::Regular, "x")],
            vec![("a/../../evil", EntryType::Regular, "x")],
            // Write through a symlink that points outside.
            vec![
                ("escape", EntryType::Symlink, "/tmp"),
                ("escape/evil", EntryType::Regular, "x"),
            ],
            vec![
                ("escape", EntryType::Symlink, "../../.."),
                ("escape/evil", EntryType::Regular, "x"),
            ],
            vec![("hl", EntryType::Link, "../../etc/passwd")],
        ] {
            let (d, r) = unpack_bytes(&tar_of(&entries));
            assert!(r.is_err(), "{entries:?} should be refused");
            assert!(!d.path().join("evil").exists());
        }
        // Absolute paths land inside the layer.
        let (d, r) = unpack_bytes(&tar_of(&[("/abs/file", EntryType::Regular, "x")]));
        r.unwrap();
        assert!(d.path().join("layer/abs/file").is_file());
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: creating 0/0 char devices and trusted.* xattrs needs root");
            return;
        }
        let tar = tar_of(&[
            ("etc/", EntryType::Directory, ""),
            ("etc/.wh.removed", EntryType::Regular, ""),
            ("opaque/", EntryType::Directory, ""),
            ("opaque/.wh..wh..opq", EntryType::Regular, ""),
            ("opaque/new", EntryType::Regular, "n"),
        ]);
        let (d, r) = unpack_bytes(&tar);
        r.unwrap();
        let l = d.path().join("layer");
        let m = fs::symlink_metadata(l.join("etc/removed")).unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), 0);
        assert!(!l.join("etc/.wh.removed").exists());
        assert_eq!(
            xattr::get(l.join("opaque"), OPAQUE_XATTR)
                .unwrap()
                .as_deref(),
            Some(&b"y"[..])
        );
        assert!(!l.join("opaque/.wh..wh..opq").exists());
        assert!(l.join("opaque/new").is_file());
    }
}
