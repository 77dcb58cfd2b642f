//! Devices: `linux.devices` (nodes to create in the container's /dev) and
//! `linux.resources.devices` (the device cgroup allow/deny list).

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType, LinuxResources, Spec};

use super::SpecError;
use crate::container::config::DeviceConfig;
use crate::container::devfilter::{
    default_rules, DevKind, DevRule, ACC_MKNOD, ACC_READ, ACC_WRITE,
};

fn field(f: &str, msg: impl Into<String>) -> SpecError {
    SpecError::Field(f.to_string(), msg.into())
}

/// `linux.devices`: what stage 2 creates with mknod(2).
pub fn devices(spec: &Spec) -> Result<Vec<DeviceConfig>, SpecError> {
    let Some(devs) = spec.linux().as_ref().and_then(|l| l.devices().as_ref()) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<DeviceConfig> = Vec::new();
    for d in devs {
        let path = d.path().to_string_lossy().into_owned();
        let f = format!("linux.devices[{path}]");
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") || path == "/" {
            return Err(field(&f, "path must be absolute, below / and without '..'"));
        }
        if out.iter().any(|o| o.path == path) {
            return Err(field(&f, "listed twice"));
        }
        let kind = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => 'c',
            LinuxDeviceType::B => 'b',
            LinuxDeviceType::P => 'p',
            LinuxDeviceType::A => return Err(field(&f, "type \"a\" is not a device node type")),
        };
        let num = |what: &str, v: i64| {
            u32::try_from(v).map_err(|_| field(&f, format!("{what} {v} out of range")))
        };
        let (major, minor) = if kind == 'p' {
            (0, 0)
        } else {
            (num("major", d.major())?, num("minor", d.minor())?)
        };
        let mode = d.file_mode().unwrap_or(0o666);
        if mode & !0o7777 != 0 {
            return Err(field(
                &f,
                format!("fileMode {mode:#o} has bits beyond permissions"),
            ));
        }
        out.push(DeviceConfig {
            path,
            kind,
            major,
            minor,
            mode,
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }
    Ok(out)
}

fn rule(i: usize, d: &LinuxDeviceCgroup) -> Result<DevRule, SpecError> {
    let f = format!("linux.resources.devices[{i}]");
    let kind = match d.typ() {
        None | Some(LinuxDeviceType::A) => None,
        Some(LinuxDeviceType::C) => Some(DevKind::Char),
        Some(LinuxDeviceType::B) => Some(DevKind::Block),
        Some(t) => return Err(field(&f, format!("type {:?} is not a, b or c", t.as_str()))),
    };
    let num = |what: &str, v: Option<i64>| match v {
        None | Some(-1) => Ok(None),
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|n| *n <= i32::MAX as u32)
            .map(Some)
            .ok_or_else(|| field(&f, format!("{what} {n} out of range"))),
    };
    let access = match d.access().as_deref() {
        None | Some("") => ACC_MKNOD | ACC_READ | ACC_WRITE,
        Some(a) => {
            let mut bits = 0;
            for c in a.chars() {
                bits |= match c {
                    'r' => ACC_READ,
                    'w' => ACC_WRITE,
                    'm' => ACC_MKNOD,
                    _ => return Err(field(&f, format!("access {a:?}: only r, w and m"))),
                };
            }
            bits
        }
    };
    Ok(DevRule {
        allow: d.allow(),
        kind,
        major: num("major", d.major())?,
        minor: num("minor", d.minor())?,
        access,
    })
}

/// `linux.resources.devices` as filter rules, in spec order (the last
/// matching rule decides), followed by the runtime's default allow list
/// (null, zero, tty, pts, mknod, ...: see [`default_rules`]) as runc
/// appends it; `None` when the spec has none (no filter: the cgroup v2
/// default lets every device through).
pub fn device_rules(r: &LinuxResources) -> Result<Option<Vec<DevRule>>, SpecError> {
    match r.devices().as_deref() {
        None | Some([]) => Ok(None),
        Some(list) => {
            let mut rules = list
                .iter()
                .enumerate()
                .map(|(i, d)| rule(i, d))
                .collect::<Result<Vec<_>, _>>()?;
            rules.extend(default_rules());
            Ok(Some(rules))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;

    #[test]
    fn device_nodes() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","linux":{"devices":[
                {"path":"/dev/fuse","type":"c","major":10,"minor":229,"fileMode":438,"uid":0,"gid":0},
                {"path":"/dev/sda","type":"b","major":8,"minor":0,"fileMode":384,"uid":1000,"gid":6},
                {"path":"/dev/myfifo","type":"p"}]}}"#,
        );
        let d = devices(&s).unwrap();
        assert_eq!(
            d[0],
            DeviceConfig {
                path: "/dev/fuse".into(),
                kind: 'c',
                major: 10,
                minor: 229,
                mode: 0o666,
                uid: 0,
                gid: 0
            }
        );
        assert_eq!(
            (d[1].kind, d[1].mode, d[1].uid, d[1].gid),
            ('b', 0o600, 1000, 6)
        );
        assert_eq!((d[2].kind, d[2].major, d[2].mode), ('p', 0, 0o666));
        for bad in [
            r#"{"path":"/dev/../etc/x","type":"c","major":1,"minor":3}"#,
            r#"{"path":"dev/null","type":"c","major":1,"minor":3}"#,
            r#"{"path":"/dev/x","type":"a"}"#,
            r#"{"path":"/dev/x","type":"c","major":-5,"minor":3}"#,
            r#"{"path":"/dev/x","type":"c","major":1,"minor":3,"fileMode":65535}"#,
        ] {
            let s = spec(&format!(
                r#"{{"ociVersion":"1.0.2","linux":{{"devices":[{bad}]}}}}"#
            ));
            let e = devices(&s).unwrap_err().to_string();
            assert!(e.contains("linux.devices["), "{bad}: {e}");
        }
    }

    #[test]
    fn cgroup_rules() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"devices":[{"allow":false,"access":"rwm"},
                {"allow":true,"type":"c","major":1,"minor":3,"access":"rw"},
                {"allow":true,"type":"c","major":136,"access":"rwm"},
                {"allow":true,"type":"b","access":"m"}]}"#,
        )
        .unwrap();
        let rules = device_rules(&r).unwrap().unwrap();
        // The spec's rules, then the defaults after them.
        assert_eq!(rules.len(), 4 + default_rules().len());
        assert_eq!(rules[4..], default_rules()[..]);
        assert_eq!(
            rules[0],
            DevRule {
                allow: false,
                kind: None,
                major: None,
                minor: None,
                access: ACC_MKNOD | ACC_READ | ACC_WRITE
            }
        );
        assert_eq!(
            rules[1],
            DevRule {
                allow: true,
                kind: Some(DevKind::Char),
                major: Some(1),
                minor: Some(3),
                access: ACC_READ | ACC_WRITE
            }
        );
        assert_eq!((rules[2].major, rules[2].minor), (Some(136), None));
        assert_eq!(
            (rules[3].kind, rules[3].access),
            (Some(DevKind::Block), ACC_MKNOD)
        );
        let none: LinuxResources = serde_json::from_str(r#"{"devices":[]}"#).unwrap();
        assert_eq!(device_rules(&none).unwrap(), None);
        for bad in [
            r#"{"allow":true,"type":"p"}"#,
            r#"{"allow":true,"access":"rx"}"#,
            r#"{"allow":true,"type":"c","major":4294967296}"#,
        ] {
            let r: LinuxResources =
                serde_json::from_str(&format!(r#"{{"devices":[{bad}]}}"#)).unwrap();
            let e = device_rules(&r).unwrap_err().to_string();
            assert!(e.contains("linux.resources.devices[0]"), "{bad}: {e}");
        }
    }
}
