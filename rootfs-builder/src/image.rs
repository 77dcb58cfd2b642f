//! What goes into the initramfs.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::cpio::{Archive, CpioError, Node};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("listing busybox applets with {path}: {msg}")]
    Applets { path: PathBuf, msg: String },
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    None,
}

#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub agent: PathBuf,
    /// Add busybox at /bin (debug shell on the console).
    pub debug_busybox: Option<PathBuf>,
    /// (name, busybox binary): test container rootfs at /containers/<name>.
    pub busybox_containers: Vec<(String, PathBuf)>,
    /// Host directories copied to /containers/<name>.
    pub container_dirs: Vec<(String, PathBuf)>,
    pub compression: Compression,
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(|source| ImageError::Read {
        path: path.into(),
        source,
    })
}

/// Applet names of a busybox binary (`busybox --list`), sorted.
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let out = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(|e| ImageError::Applets {
            path: busybox.into(),
            msg: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ImageError::Applets {
            path: busybox.into(),
            msg: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('/'))
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

/// busybox at `<prefix>/bin/busybox` with every applet linked in /bin.
fn add_busybox(
    a: &mut Archive,
    prefix: &str,
    bin: &[u8],
    applets: &[String],
) -> Result<(), ImageError> {
    a.add(
        &format!("{prefix}/bin/busybox"),
        Node::File(bin.to_vec()),
        0o755,
    )?;
    for app in applets {
        if app != "busybox" {
            a.add(
                &format!("{prefix}/bin/{app}"),
                Node::Symlink("busybox".into()),
                0o777,
            )?;
        }
    }
    Ok(())
}

fn add_dir_tree(a: &mut Archive, prefix: &str, dir: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let rd = std::fs::read_dir(dir).map_err(|source| ImageError::Read {
        path: dir.into(),
        source,
    })?;
    for e in rd {
        let e = e.map_err(|source| ImageError::Read {
            path: dir.into(),
            source,
        })?;
        let p = e.path();
        let name = format!("{prefix}/{}", e.file_name().to_string_lossy());
        let meta = std::fs::symlink_metadata(&p).map_err(|source| ImageError::Read {
            path: p.clone(),
            source,
        })?;
        let perm = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let t = std::fs::read_link(&p).map_err(|source| ImageError::Read {
                path: p.clone(),
                source,
            })?;
            a.add(&name, Node::Symlink(t.to_string_lossy().into()), 0o777)?;
        } else if meta.is_dir() {
            a.dir(&name, perm)?;
            add_dir_tree(a, &name, &p)?;
        } else if meta.is_file() {
            a.add(&name, Node::File(read(&p)?), perm)?;
        }
    }
    Ok(())
}

/// Base layout every initramfs has.
fn base(a: &mut Archive) -> Result<(), CpioError> {
    for d in ["dev", "proc", "sys", "tmp", "run", "etc", "containers"] {
        a.dir(d, 0o755)?;
    }
    a.dir("tmp", 0o1777)?;
    // The kernel opens /dev/console for init's stdio before devtmpfs exists.
    a.add("dev/console", Node::CharDev { major: 5, minor: 1 }, 0o600)?;
    Ok(())
}

/// A minimal container rootfs: busybox, passwd/group, mount points.
fn busybox_container(
    a: &mut Archive,
    name: &str,
    bin: &[u8],
    applets: &[String],
) -> Result<(), ImageError> {
    let p = format!("containers/{name}");
    add_busybox(a, &p, bin, applets)?;
    for d in ["dev", "proc", "sys", "tmp", "etc", "root", "home"] {
        a.dir(&format!("{p}/{d}"), if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    a.add(
        &format!("{p}/etc/passwd"),
        Node::File(b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\nuser:x:1000:1000:user:/home:/bin/sh\n".to_vec()),
        0o644,
    )?;
    a.add(
        &format!("{p}/etc/group"),
        Node::File(b"root:x:0:\nnogroup:x:65534:\nusers:x:100:user\nuser:x:1000:\n".to_vec()),
        0o644,
    )?;
    a.add(
        &format!("{p}/etc/hostname"),
        Node::File(b"busybox\n".to_vec()),
        0o644,
    )?;
    Ok(())
}

pub fn build(spec: &ImageSpec) -> Result<Archive, ImageError> {
    let mut a = Archive::new();
    base(&mut a)?;
    a.add("init", Node::File(read(&spec.agent)?), 0o755)?;
    let mut cache: Vec<(PathBuf, Vec<u8>, Vec<String>)> = Vec::new();
    let mut busybox = |path: &Path| -> Result<(Vec<u8>, Vec<String>), ImageError> {
        if let Some((_, b, l)) = cache.iter().find(|(p, _, _)| p == path) {
            return Ok((b.clone(), l.clone()));
        }
        let b = read(path)?;
        let l = busybox_applets(path)?;
        cache.push((path.into(), b.clone(), l.clone()));
        Ok((b, l))
    };
    if let Some(bb) = &spec.debug_busybox {
        let (b, l) = busybox(bb)?;
        add_busybox(&mut a, "", &b, &l)?;
    }
    for (name, bb) in &spec.busybox_containers {
        let (b, l) = busybox(bb)?;
        busybox_container(&mut a, name, &b, &l)?;
    }
    for (name, dir) in &spec.container_dirs {
        a.dir(&format!("containers/{name}"), 0o755)?;
        add_dir_tree(&mut a, &format!("containers/{name}"), dir)?;
    }
    Ok(a)
}

/// Write the (compressed) archive atomically to `out`.
pub fn write(a: &Archive, compression: Compression, out: &Path) -> Result<(), ImageError> {
    let werr = |source| ImageError::Write {
        path: out.into(),
        source,
    };
    let raw = a.to_bytes()?;
    let bytes = match compression {
        Compression::None => raw,
        Compression::Gzip => {
            // GzEncoder writes mtime 0 and no file name: deterministic.
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            enc.write_all(&raw).map_err(werr)?;
            enc.finish().map_err(werr)?
        }
    };
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(werr)?;
    }
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, &bytes).map_err(werr)?;
    std::fs::rename(&tmp, out).map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_agent(dir: &Path) -> PathBuf {
        let p = dir.join("agent");
        std::fs::write(&p, b"\x7fELF fake agent").unwrap();
        p
    }

    #[test]
    fn product_image_is_minimal() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ImageSpec {
            agent: fake_agent(dir.path()),
            debug_busybox: None,
            busybox_containers: vec![],
            container_dirs: vec![],
            compression: Compression::Gzip,
        };
        let a = build(&spec).unwrap();
        let names: Vec<String> = crate::cpio::tests::parse(&a.to_bytes().unwrap())
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            names,
            [
                "containers",
                "dev",
                "dev/console",
                "etc",
                "init",
                "proc",
                "run",
                "sys",
                "tmp"
            ]
        );
    }

    #[test]
    fn same_inputs_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).unwrap();
        std::fs::write(tree.join("etc/motd"), "hi").unwrap();
        let spec = ImageSpec {
            agent: fake_agent(dir.path()),
            debug_busybox: None,
            busybox_containers: vec![],
            container_dirs: vec![("t".into(), tree)],
            compression: Compression::Gzip,
        };
        let (o1, o2) = (dir.path().join("a.cpio.gz"), dir.path().join("b.cpio.gz"));
        write(&build(&spec).unwrap(), Compression::Gzip, &o1).unwrap();
        write(&build(&spec).unwrap(), Compression::Gzip, &o2).unwrap();
        assert_eq!(std::fs::read(&o1).unwrap(), std::fs::read(&o2).unwrap());
        let a = build(&spec).unwrap();
        assert!(a.contains("containers/t/etc/motd"));
    }

    #[test]
    fn busybox_container_when_available() {
        let bb = Path::new("/bin/busybox");
        if !bb.exists() {
            eprintln!("skipping: /bin/busybox (Debian busybox-static) not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = ImageSpec {
            agent: fake_agent(dir.path()),
            debug_busybox: None,
            busybox_containers: vec![("busybox".into(), bb.into())],
            container_dirs: vec![],
            compression: Compression::None,
        };
        let a = build(&spec).unwrap();
        for p in [
            "containers/busybox/bin/sh",
            "containers/busybox/bin/echo",
            "containers/busybox/etc/passwd",
            "containers/busybox/proc",
        ] {
            assert!(a.contains(p), "{p}");
        }
        assert!(
            !a.contains("bin/busybox"),
            "no busybox in the guest root without --debug"
        );
    }

    #[test]
    fn missing_agent_is_clear() {
        let spec = ImageSpec {
            agent: "/nonexistent/agent".into(),
            debug_busybox: None,
            busybox_containers: vec![],
            container_dirs: vec![],
            compression: Compression::Gzip,
        };
        let e = build(&spec).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/agent"), "{e}");
    }
}
