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

/// A PAX extended header carrying `records` for the entry after it.
fn append_pax(b: &mut tar::Builder<Vec<u8>>, records: &[(&str, &[u8])]) {
    let mut data = Vec::new();
    for (k, v) in records {
        let body = [b" ", k.as_bytes(), b"=", v, b"\n"].concat();
        let mut len = body.len() + 1;
        while len.to_string().len() + body.len() != len {
            len += 1;
        }
        data.extend_from_slice(len.to_string().as_bytes());
        data.extend_from_slice(&body);
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(EntryType::XHeader);
    h.set_path("PaxHeaders/x").unwrap();
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, &data[..]).unwrap();
}

/// An entry with explicit mode, owner, mtime and (for nodes) device numbers.
fn append_meta(
    b: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: EntryType,
    mode: u32,
    owner: (u64, u64),
    mtime: u64,
    extra: &str,
) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_path(path).unwrap();
    h.set_mode(mode);
    h.set_uid(owner.0);
    h.set_gid(owner.1);
    h.set_mtime(mtime);
    match kind {
        EntryType::Char | EntryType::Block => {
            let (maj, min) = extra.split_once(',').unwrap();
            h.set_device_major(maj.parse().unwrap()).unwrap();
            h.set_device_minor(min.parse().unwrap()).unwrap();
            h.set_size(0);
        }
        EntryType::Symlink | EntryType::Link => {
            h.set_link_name(extra).unwrap();
            h.set_size(0);
        }
        _ => h.set_size(extra.len() as u64),
    }
    h.set_cksum();
    let data = if kind == EntryType::Regular {
        extra
    } else {
        ""
    };
    b.append(&h, data.as_bytes()).unwrap();
}

#[test]
fn devices_fifos_owners_modes_and_dir_mtimes_are_kept() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: creating device nodes and chown need root");
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    append_meta(
        &mut b,
        "dev/",
        EntryType::Directory,
        0o750,
        (0, 0),
        1_000_000,
        "",
    );
    append_meta(
        &mut b,
        "dev/null",
        EntryType::Char,
        0o666,
        (0, 0),
        1_000_001,
        "1,3",
    );
    append_meta(
        &mut b,
        "dev/loop9",
        EntryType::Block,
        0o640,
        (0, 6),
        1_000_002,
        "7,9",
    );
    append_meta(
        &mut b,
        "run/",
        EntryType::Directory,
        0o1777,
        (0, 0),
        1_000_003,
        "",
    );
    append_meta(
        &mut b,
        "run/fifo",
        EntryType::Fifo,
        0o4620,
        (1234, 5678),
        1_000_004,
        "",
    );
    append_meta(
        &mut b,
        "run/sub/",
        EntryType::Directory,
        0o700,
        (42, 43),
        1_000_005,
        "",
    );
    append_meta(
        &mut b,
        "run/sub/f",
        EntryType::Regular,
        0o644,
        (42, 43),
        7,
        "data",
    );
    let (d, r) = unpack_bytes(&b.into_inner().unwrap());
    r.unwrap();
    let l = d.path().join("layer");
    let st = |p: &str| fs::symlink_metadata(l.join(p)).unwrap();

    let null = st("dev/null");
    assert!(null.file_type().is_char_device(), "{null:?}");
    assert_eq!(null.rdev(), stat::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    let blk = st("dev/loop9");
    assert!(blk.file_type().is_block_device());
    assert_eq!(blk.rdev(), stat::makedev(7, 9));
    assert_eq!((blk.mode() & 0o7777, blk.gid()), (0o640, 6));
    assert_eq!(blk.mtime(), 1_000_002);
    let fifo = st("run/fifo");
    assert!(fifo.file_type().is_fifo());
    assert_eq!((fifo.uid(), fifo.gid()), (1234, 5678));
    assert_eq!(fifo.mode() & 0o7777, 0o4620, "set-id bit kept after chown");
    assert_eq!(fifo.mtime(), 1_000_004);

    // Directories: mode, owner, and the mtime of the tar entry even
    // though entries were created in them afterwards.
    for (p, mode, owner, mtime) in [
        ("dev", 0o750, (0, 0), 1_000_000),
        ("run", 0o1777, (0, 0), 1_000_003),
        ("run/sub", 0o700, (42, 43), 1_000_005),
    ] {
        let m = st(p);
        assert_eq!(m.mode() & 0o7777, mode, "{p}");
        assert_eq!((m.uid(), m.gid()), owner, "{p}");
        assert_eq!(m.mtime(), mtime, "{p}");
    }
    assert_eq!(st("run/sub/f").mtime(), 7);
}

#[test]
fn xattrs_on_dirs_symlinks_files_and_nodes_but_not_overlay_ones() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: trusted.* xattrs need root");
        return;
    }
    let mut b = tar::Builder::new(Vec::new());
    append_pax(&mut b, &[("SCHILY.xattr.user.dir", b"d1")]);
    append_meta(&mut b, "d/", EntryType::Directory, 0o755, (0, 0), 5, "");
    // user.* is not allowed on symlinks by Linux; trusted.* is.
    append_pax(&mut b, &[("SCHILY.xattr.trusted.link", b"l1")]);
    append_meta(
        &mut b,
        "d/link",
        EntryType::Symlink,
        0o777,
        (0, 0),
        5,
        "/nowhere",
    );
    append_pax(
        &mut b,
        &[
            (
                "SCHILY.xattr.security.capability",
                b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            ),
            ("SCHILY.xattr.trusted.overlay.redirect", b"/elsewhere"),
        ],
    );
    append_meta(&mut b, "d/file", EntryType::Regular, 0o755, (0, 0), 5, "x");
    append_pax(&mut b, &[("SCHILY.xattr.trusted.fifo", b"f1")]);
    append_meta(&mut b, "d/fifo", EntryType::Fifo, 0o600, (0, 0), 5, "");
    let (d, r) = unpack_bytes(&b.into_inner().unwrap());
    r.unwrap();
    let l = d.path().join("layer");
    let get = |p: &str, n: &str| xattr::get(l.join(p), n).unwrap();
    assert_eq!(get("d", "user.dir").as_deref(), Some(&b"d1"[..]));
    // On the link itself, not its (missing) target.
    assert_eq!(get("d/link", "trusted.link").as_deref(), Some(&b"l1"[..]));
    assert!(get("d/file", "security.capability").is_some());
    assert_eq!(get("d/file", "trusted.overlay.redirect"), None);
    assert_eq!(get("d/fifo", "trusted.fifo").as_deref(), Some(&b"f1"[..]));
    assert_eq!(fs::symlink_metadata(l.join("d")).unwrap().mtime(), 5);
}

/// `a/`, `a/shadow/`, then `a` replaced by a symlink to a directory outside
/// the layer that has a `shadow` in it: setting the saved directory times
/// at the end must not touch that outside `shadow`.
#[test]
fn dir_times_never_follow_a_parent_replaced_by_a_symlink() {
    let outside = tempfile::tempdir().unwrap();
    let shadow = outside.path().join("shadow");
    fs::create_dir(&shadow).unwrap();
    let t = TimeSpec::new(1_234_567, 0);
    stat::utimensat(None, &shadow, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
    let before = fs::metadata(&shadow).unwrap().mtime();
    assert_eq!(before, 1_234_567);

    let mut b = tar::Builder::new(Vec::new());
    append_meta(&mut b, "a/", EntryType::Directory, 0o755, (0, 0), 7, "");
    append_meta(
        &mut b,
        "a/shadow/",
        EntryType::Directory,
        0o755,
        (0, 0),
        7,
        "",
    );
    let target = outside.path().to_str().unwrap();
    append_meta(&mut b, "a", EntryType::Symlink, 0o777, (0, 0), 7, target);
    append_meta(&mut b, "b/", EntryType::Directory, 0o755, (0, 0), 9, "");
    let (d, r) = unpack_bytes(&b.into_inner().unwrap());
    r.unwrap();
    let l = d.path().join("layer");
    assert_eq!(fs::read_link(l.join("a")).unwrap(), outside.path());
    assert_eq!(
        fs::metadata(&shadow).unwrap().mtime(),
        before,
        "the directory outside the layer got the layer's mtime"
    );
    assert_ne!(
        fs::metadata(outside.path()).unwrap().mtime(),
        7,
        "the symlink's target got a directory mtime"
    );
    // Directories that stayed still get theirs.
    assert_eq!(fs::symlink_metadata(l.join("b")).unwrap().mtime(), 9);
}

/// Drop CAP_MKNOD from this thread's effective set (capabilities are per
/// thread), as in a user namespace or an unprivileged daemon.
fn drop_cap_mknod_in_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_MKNOD: u32 = 27;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: header and two data structs as capget(2)/capset(2) want.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", io::Error::last_os_error());
    d[0].effective &= !(1 << CAP_MKNOD);
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", io::Error::last_os_error());
}

/// Without CAP_MKNOD (even as uid 0) device nodes are skipped, and so is a
/// hard link to one: the rest of the layer unpacks.
#[test]
fn without_cap_mknod_nodes_and_hard_links_to_them_are_skipped() {
    let mut b = tar::Builder::new(Vec::new());
    append_meta(&mut b, "dev/", EntryType::Directory, 0o755, (0, 0), 1, "");
    append_meta(&mut b, "dev/null", EntryType::Char, 0o666, (0, 0), 1, "1,3");
    append_meta(
        &mut b,
        "dev/loop9",
        EntryType::Block,
        0o600,
        (0, 0),
        1,
        "7,9",
    );
    append_meta(
        &mut b,
        "dev/null2",
        EntryType::Link,
        0o666,
        (0, 0),
        1,
        "dev/null",
    );
    append_meta(&mut b, "dev/fifo", EntryType::Fifo, 0o600, (0, 0), 1, "");
    append_meta(&mut b, "etc/", EntryType::Directory, 0o755, (0, 0), 1, "");
    append_meta(&mut b, "etc/ok", EntryType::Regular, 0o644, (0, 0), 1, "ok");
    append_meta(
        &mut b,
        "etc/ok2",
        EntryType::Link,
        0o644,
        (0, 0),
        1,
        "etc/ok",
    );
    // A node replaced by a file: a link to it is a real link again.
    append_meta(&mut b, "dev/zero", EntryType::Char, 0o666, (0, 0), 1, "1,5");
    append_meta(
        &mut b,
        "dev/zero",
        EntryType::Regular,
        0o644,
        (0, 0),
        1,
        "z",
    );
    append_meta(
        &mut b,
        "dev/zero2",
        EntryType::Link,
        0o644,
        (0, 0),
        1,
        "dev/zero",
    );
    let tar = b.into_inner().unwrap();
    let (d, r) = std::thread::spawn(move || {
        drop_cap_mknod_in_this_thread();
        unpack_bytes(&tar)
    })
    .join()
    .unwrap();
    let u = r.expect("the layer unpacks without CAP_MKNOD");
    assert_eq!(u.entries, 11);
    let l = d.path().join("layer");
    for gone in ["dev/null", "dev/loop9", "dev/null2"] {
        assert!(
            fs::symlink_metadata(l.join(gone)).is_err(),
            "{gone} should have been skipped"
        );
    }
    assert!(fs::symlink_metadata(l.join("dev/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(fs::read_to_string(l.join("etc/ok2")).unwrap(), "ok");
    assert_eq!(fs::read_to_string(l.join("dev/zero2")).unwrap(), "z");
}
