//! Host side of a guest's network in tests: a TAP device with an address,
//! deleted on drop, and ping. Needs root, /dev/net/tun, iproute2 and
//! iputils-ping.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Why this host cannot create TAP devices, if it cannot.
pub fn tap_unavailable() -> Option<String> {
    crate::device_unavailable("/dev/net/tun")
}

/// `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TAP device holding the host side of a guest's network; deleted on
/// drop (also when the test panics).
pub struct Tap {
    pub name: String,
}

impl Tap {
    /// Create TAP `name` (a stale one of that name is deleted first), give
    /// it `host_cidr` (e.g. `10.213.7.1/24`) and bring it up.
    pub fn create(name: &str, host_cidr: &str) -> Tap {
        let _ = Command::new("ip").args(["link", "del", name]).output();
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        let tap = Tap {
            name: name.to_string(),
        };
        ip(&["addr", "add", host_cidr, "dev", &tap.name]);
        ip(&["link", "set", &tap.name, "up"]);
        tap
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// Whether a network link `name` exists on the host.
pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Whether `ip` answers ping: up to 5 tries of `ping -c 2 -W 5`, a second
/// apart (the first ARP exchange with a just-booted guest can be slow).
pub fn ping_ok(ip: &str) -> bool {
    for _ in 0..5 {
        let out = Command::new("ping")
            .args(["-c", "2", "-W", "5", ip])
            .output()
            .expect("ping (iputils-ping)");
        if out.status.success() {
            return true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    false
}
