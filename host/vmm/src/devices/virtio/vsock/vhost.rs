//! vhost-kernel vsock (`/dev/vhost-vsock`): detection only.
//!
//! The in-kernel back-end would move the data path out of the VMM, but it
//! needs ioeventfds on the QueueNotify register and one irqfd per queue,
//! which the transport does not hand out yet; see docs/vmm.md. Until then
//! the userspace device is always used and this module says why the
//! kernel one is not.

use std::path::Path;

pub const VHOST_VSOCK_DEV: &str = "/dev/vhost-vsock";

/// Why the vhost-kernel vsock back-end is not used on this host.
pub fn unavailable_reason() -> String {
    unavailable_reason_at(Path::new(VHOST_VSOCK_DEV))
}

fn unavailable_reason_at(dev: &Path) -> String {
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!(
                "{} does not exist (vhost_vsock module not loaded)",
                dev.display()
            )
        }
        Err(e) => format!("{} cannot be opened: {e}", dev.display()),
        Ok(_) => format!(
            "{} exists, but the built-in VMM does not drive the vhost-kernel back-end yet",
            dev.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_name_the_device() {
        let missing = unavailable_reason_at(Path::new("/nonexistent/vhost-vsock"));
        assert!(missing.contains("does not exist"), "{missing}");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("vhost-vsock");
        std::fs::write(&f, b"").unwrap();
        assert!(unavailable_reason_at(&f).contains("does not drive"));
        assert!(unavailable_reason().contains(VHOST_VSOCK_DEV));
    }
}
