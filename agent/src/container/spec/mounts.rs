//! OCI mounts → [`MountConfig`]: options become `MS_*` flags, propagation
//! flags and the remaining data string.

use nix::mount::MsFlags;
use oci_spec::runtime::Mount;

use super::SpecError;
use crate::container::config::MountConfig;

pub(super) fn default_mount(dest: &str, source: &str, fstype: &str, data: &str) -> MountConfig {
    MountConfig {
        destination: dest.into(),
        source: source.into(),
        fstype: fstype.into(),
        flags: (MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV).bits()
            & if fstype == "tmpfs" && dest == "/dev" {
                !MsFlags::MS_NODEV.bits() & !MsFlags::MS_NOEXEC.bits()
            } else if fstype == "devpts" {
                !MsFlags::MS_NODEV.bits()
            } else {
                u64::MAX
            },
        propagation: 0,
        data: data.into(),
    }
}

/// Translate one OCI mount; options become `MS_*` flags, propagation flags
/// and the remaining data string.
pub fn mount_config(m: &Mount) -> Result<MountConfig, SpecError> {
    let dest = m.destination().to_string_lossy().into_owned();
    if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
        return Err(SpecError::BadMountDestination(dest));
    }
    let mut fstype = m.typ().clone().unwrap_or_default();
    let (flags, propagation, data) =
        parse_mount_options(m.options().as_deref().unwrap_or_default());
    if fstype.is_empty() && flags & MsFlags::MS_BIND.bits() != 0 {
        fstype = "bind".into();
    }
    Ok(MountConfig {
        destination: dest,
        source: m
            .source()
            .as_ref()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        fstype,
        flags,
        propagation,
        data,
    })
}

/// `[r]shared`, `[r]slave`, `[r]private`, `[r]unbindable` → `MS_*`
/// propagation flags (`MS_REC` for the `r` forms).
pub fn propagation_flags(name: &str) -> Option<u64> {
    let (rec, base) = match name.strip_prefix('r') {
        Some(b) if !b.is_empty() => (MsFlags::MS_REC, b),
        _ => (MsFlags::empty(), name),
    };
    let p = match base {
        "private" => MsFlags::MS_PRIVATE,
        "shared" => MsFlags::MS_SHARED,
        "slave" => MsFlags::MS_SLAVE,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        _ => return None,
    };
    Some((p | rec).bits())
}

pub fn parse_mount_options(opts: &[String]) -> (u64, u64, String) {
    let mut flags = MsFlags::empty();
    let mut prop = MsFlags::empty();
    let mut data: Vec<&str> = Vec::new();
    for o in opts {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                prop = MsFlags::from_bits_truncate(propagation_flags(o).unwrap_or(0));
                continue;
            }
            other => {
                data.push(other);
                continue;
            }
        };
        flags |= set;
        flags &= !clear;
    }
    (flags.bits(), prop.bits(), data.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options() {
        let (f, p, d) = parse_mount_options(&[
            "rbind".into(),
            "ro".into(),
            "nosuid".into(),
            "rslave".into(),
            "size=10m".into(),
            "mode=755".into(),
        ]);
        let f = MsFlags::from_bits_truncate(f);
        assert!(f.contains(
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID
        ));
        assert_eq!(
            MsFlags::from_bits_truncate(p),
            MsFlags::MS_SLAVE | MsFlags::MS_REC
        );
        assert_eq!(d, "size=10m,mode=755");
        let (f, _, _) = parse_mount_options(&["ro".into(), "rw".into()]);
        assert!(!MsFlags::from_bits_truncate(f).contains(MsFlags::MS_RDONLY));
    }

    #[test]
    fn bad_mount_destination() {
        let m: Mount = serde_json::from_str(
            r#"{"destination":"/a/../../etc","type":"tmpfs","source":"tmpfs"}"#,
        )
        .unwrap();
        assert!(matches!(
            mount_config(&m),
            Err(SpecError::BadMountDestination(_))
        ));
        let m: Mount =
            serde_json::from_str(r#"{"destination":"rel","type":"tmpfs","source":"tmpfs"}"#)
                .unwrap();
        assert!(mount_config(&m).is_err());
    }

    #[test]
    fn propagation_names() {
        let f = |n| propagation_flags(n).map(MsFlags::from_bits_truncate);
        assert_eq!(f("shared"), Some(MsFlags::MS_SHARED));
        assert_eq!(f("rslave"), Some(MsFlags::MS_SLAVE | MsFlags::MS_REC));
        assert_eq!(
            f("runbindable"),
            Some(MsFlags::MS_UNBINDABLE | MsFlags::MS_REC)
        );
        assert_eq!(f("private"), Some(MsFlags::MS_PRIVATE));
        for bad in ["", "r", "rr", "rshare", "Shared"] {
            assert_eq!(f(bad), None, "{bad}");
        }
    }
}
