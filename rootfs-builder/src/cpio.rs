//! Deterministic newc ("070701") cpio archives.
//!
//! Entries are kept sorted by path, and every header field that could vary
//! between builds (inode, mtime, uid/gid, device) is fixed, so the same
//! inputs always give the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub node: Node,
    /// Permission bits (e.g. 0o755).
    pub perm: u32,
}

/// An archive under construction: path (no leading `/`) → entry.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
    /// Timestamp written into every header.
    pub mtime: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("invalid archive path {0:?}")]
    BadPath(String),
    #[error("{0:?} is too large for newc cpio")]
    TooLarge(String),
    #[error("writing archive: {0}")]
    Io(#[from] io::Error),
}

fn normalize(path: &str) -> Result<String, CpioError> {
    let p = path.trim_start_matches('/').trim_end_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(CpioError::BadPath(path.to_string()));
    }
    Ok(p.to_string())
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an entry, creating missing parent directories (0755).
    pub fn add(&mut self, path: &str, node: Node, perm: u32) -> Result<(), CpioError> {
        let p = normalize(path)?;
        let mut parent = String::new();
        for comp in p
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, d)| d)
            .unwrap_or(&[])
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            self.entries.entry(parent.clone()).or_insert(Entry {
                node: Node::Dir,
                perm: 0o755,
            });
        }
        self.entries.insert(p, Entry { node, perm });
        Ok(())
    }

    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        self.add(path, Node::Dir, perm)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, path: &str) -> bool {
        normalize(path)
            .map(|p| self.entries.contains_key(&p))
            .unwrap_or(false)
    }

    /// Write the archive (uncompressed) to `w`.
    pub fn write_to(&self, mut w: impl Write) -> Result<(), CpioError> {
        let mut offset = 0usize;
        for (ino, (path, e)) in self.entries.iter().enumerate() {
            let (kind, nlink, data, rmaj, rmin): (u32, u32, &[u8], u32, u32) = match &e.node {
                Node::Dir => (0o040000, 2, &[], 0, 0),
                Node::File(d) => (0o100000, 1, d, 0, 0),
                Node::Symlink(t) => (0o120000, 1, t.as_bytes(), 0, 0),
                Node::CharDev { major, minor } => (0o020000, 1, &[], *major, *minor),
            };
            if data.len() > u32::MAX as usize {
                return Err(CpioError::TooLarge(path.clone()));
            }
            offset += header(
                &mut w,
                path,
                ino as u32 + 1,
                kind | (e.perm & 0o7777),
                nlink,
                self.mtime,
                data,
                (rmaj, rmin),
                offset,
            )?;
        }
        header(&mut w, "TRAILER!!!", 0, 0, 1, 0, &[], (0, 0), offset)?;
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, CpioError> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }
}

fn pad(w: &mut impl Write, len: usize) -> io::Result<usize> {
    let n = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..n])?;
    Ok(n)
}

#[allow(clippy::too_many_arguments)]
fn header(
    w: &mut impl Write,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    data: &[u8],
    rdev: (u32, u32),
    offset: usize,
) -> io::Result<usize> {
    let h = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{mtime:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
        0, // uid
        0, // gid
        data.len(),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() + 1,
        0, // check
    );
    w.write_all(h.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    let mut n = offset + h.len() + name.len() + 1;
    n += pad(w, n)?;
    w.write_all(data)?;
    n += data.len();
    n += pad(w, n)?;
    Ok(n - offset)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Minimal newc reader for tests: (name, mode, data, rdevmajor, rdevminor).
    pub fn parse(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>, u32, u32)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) = (
                field(1),
                field(6) as usize,
                field(9),
                field(10),
                field(11) as usize,
            );
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_string();
            let mut pos = 110 + namesize;
            pos += (4 - (off + pos) % 4) % 4;
            let data = b[pos..pos + size].to_vec();
            pos += size;
            pos += (4 - (off + pos) % 4) % 4;
            off += pos;
            b = &b[pos..];
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode, data, rmaj, rmin));
        }
    }

    fn sample(order: &[usize]) -> Archive {
        let items: Vec<(&str, Node, u32)> = vec![
            ("init", Node::File(b"\x7fELF-agent".to_vec()), 0o755),
            ("dev/console", Node::CharDev { major: 5, minor: 1 }, 0o600),
            ("bin/sh", Node::Symlink("busybox".into()), 0o777),
            (
                "containers/busybox/etc/passwd",
                Node::File(b"root:x:0:0::/root:/bin/sh\n".to_vec()),
                0o644,
            ),
        ];
        let mut a = Archive::new();
        for &i in order {
            let (p, n, m) = &items[i];
            a.add(p, n.clone(), *m).unwrap();
        }
        a
    }

    #[test]
    fn deterministic_regardless_of_insertion_order() {
        let x = sample(&[0, 1, 2, 3]).to_bytes().unwrap();
        let y = sample(&[3, 2, 1, 0]).to_bytes().unwrap();
        assert_eq!(x, y);
        assert_eq!(x.len() % 4, 0);
    }

    #[test]
    fn round_trips_through_reader() {
        let bytes = sample(&[0, 1, 2, 3]).to_bytes().unwrap();
        let entries = parse(&bytes);
        let names: Vec<_> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "containers",
                "containers/busybox",
                "containers/busybox/etc",
                "containers/busybox/etc/passwd",
                "dev",
                "dev/console",
                "init"
            ]
        );
        let init = entries.iter().find(|e| e.0 == "init").unwrap();
        assert_eq!(init.1, 0o100755);
        assert_eq!(init.2, b"\x7fELF-agent");
        let console = entries.iter().find(|e| e.0 == "dev/console").unwrap();
        assert_eq!((console.1, console.3, console.4), (0o020600, 5, 1));
        let sh = entries.iter().find(|e| e.0 == "bin/sh").unwrap();
        assert_eq!((sh.1, sh.2.as_slice()), (0o120777, b"busybox".as_slice()));
    }

    #[test]
    fn system_cpio_reads_it() {
        // Cross-check against GNU cpio where installed (Debian: `cpio`).
        let Ok(out) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("skipping: cpio(1) not installed");
            return;
        };
        assert!(out.status.success());
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.cpio");
        std::fs::write(&f, sample(&[0, 1, 2, 3]).to_bytes().unwrap()).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -it < {}", f.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            listing
                .lines()
                .any(|l| l == "containers/busybox/etc/passwd"),
            "{listing}"
        );
    }

    #[test]
    fn bad_paths() {
        let mut a = Archive::new();
        assert!(a.add("../etc", Node::Dir, 0o755).is_err());
        assert!(a.add("", Node::Dir, 0o755).is_err());
        assert!(a.add("a//b", Node::Dir, 0o755).is_err());
    }
}
