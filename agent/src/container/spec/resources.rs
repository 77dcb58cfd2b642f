//! OCI `linux.resources` → cgroup v2 interface file writes.

use oci_spec::runtime::{LinuxBlockIo, LinuxHugepageLimit, LinuxResources};

use super::SpecError;

/// cgroup v2 interface files to write for the spec's resources, in order.
/// The same translation serves CreateContainer and UpdateContainer, so an
/// omitted field — or a memory or cpu value of 0 — leaves its setting as
/// it is; -1 means unlimited (`max`). (`pids.limit` 0 is unlimited: the
/// OCI default.)
pub fn cgroup_writes(r: &LinuxResources) -> Result<Vec<(String, String)>, SpecError> {
    let mut w = Vec::new();
    if let Some(mem) = r.memory() {
        let limit = mem.limit().filter(|l| *l != 0);
        if let Some(l) = limit {
            w.push(("memory.max".into(), limit_value(l)));
        }
        // OCI's swap is memory+swap; cgroup v2 wants swap alone.
        match (limit, mem.swap().filter(|s| *s != 0)) {
            (_, None) => {}
            (_, Some(s)) if s < 0 => w.push(("memory.swap.max".into(), "max".into())),
            (Some(l), Some(_)) if l < 0 => w.push(("memory.swap.max".into(), "max".into())),
            (Some(l), Some(s)) if s < l => {
                return Err(SpecError::BadResource(format!(
                    "memory.swap ({s}) lower than memory.limit ({l})"
                )))
            }
            (Some(l), Some(s)) => w.push(("memory.swap.max".into(), (s - l).to_string())),
            (None, Some(s)) => {
                return Err(SpecError::BadResource(format!(
                    "memory.swap ({s}) is memory+swap: it needs memory.limit"
                )))
            }
        }
        if let Some(res) = mem.reservation().filter(|r| *r != 0) {
            w.push(("memory.low".into(), limit_value(res)));
        }
    }
    if let Some(cpu) = r.cpu() {
        if let Some(shares) = cpu.shares() {
            if shares > 0 {
                w.push(("cpu.weight".into(), shares_to_weight(shares).to_string()));
            }
        }
        let quota = cpu.quota().filter(|q| *q != 0);
        let period = cpu.period().filter(|p| *p != 0);
        if quota.is_some() || period.is_some() {
            // "$QUOTA [$PERIOD]" (as runc: a period alone lifts the quota).
            let mut v = match quota {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            if let Some(p) = period {
                v.push_str(&format!(" {p}"));
            }
            w.push(("cpu.max".into(), v));
        }
        if let Some(cpus) = cpu.cpus().as_ref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.cpus".into(), cpus.clone()));
        }
        if let Some(mems) = cpu.mems().as_ref().filter(|s| !s.is_empty()) {
            w.push(("cpuset.mems".into(), mems.clone()));
        }
    }
    if let Some(pids) = r.pids() {
        w.push(("pids.max".into(), limit_value(pids.limit())));
    }
    if let Some(b) = r.block_io() {
        w.extend(block_io_writes(b)?);
    }
    for h in r.hugepage_limits().as_deref().unwrap_or_default() {
        w.push(hugepage_write(h)?);
    }
    if let Some(unified) = r.unified() {
        let mut keys: Vec<_> = unified.iter().collect();
        keys.sort();
        for (k, v) in keys {
            if k.contains('/') || k.starts_with('.') || !k.contains('.') {
                return Err(SpecError::BadResource(format!("unified key {k:?}")));
            }
            // cgroup core files are not limits: `cgroup.procs` would move
            // any process (the agent itself) into the container's cgroup,
            // `cgroup.kill` would kill it, `cgroup.subtree_control`/`type`
            // would break the leaf.
            if k.starts_with("cgroup.") {
                return Err(SpecError::BadResource(format!(
                    "unified key {k:?}: cgroup core files cannot be set"
                )));
            }
            w.push((k.clone(), v.clone()));
        }
    }
    Ok(w)
}

fn field(f: &str, msg: impl Into<String>) -> SpecError {
    SpecError::Field(f.to_string(), msg.into())
}

/// blkio weight (10..1000) → io.weight (1..10000), as runc converts.
fn blkio_to_io_weight(w: u16, f: &str) -> Result<u64, SpecError> {
    if !(10..=1000).contains(&w) {
        return Err(field(f, format!("weight {w} not in 10..1000")));
    }
    Ok(1 + (u64::from(w) - 10) * 9999 / 990)
}

fn dev_num(f: &str, major: i64, minor: i64) -> Result<String, SpecError> {
    if major < 0 || minor < 0 || major > u32::MAX as i64 || minor > u32::MAX as i64 {
        return Err(field(f, format!("device {major}:{minor} out of range")));
    }
    Ok(format!("{major}:{minor}"))
}

/// `linux.resources.blockIO` → `io.weight` and `io.max` (the io
/// controller; cgroup v2 has no leaf weights).
fn block_io_writes(b: &LinuxBlockIo) -> Result<Vec<(String, String)>, SpecError> {
    const F: &str = "linux.resources.blockIO";
    let mut w = Vec::new();
    if b.leaf_weight().is_some() {
        return Err(field(
            &format!("{F}.leafWeight"),
            "cgroup v2 has no leaf weight",
        ));
    }
    if let Some(weight) = b.weight() {
        let v = blkio_to_io_weight(weight, &format!("{F}.weight"))?;
        w.push(("io.weight".to_string(), format!("default {v}")));
    }
    for d in b.weight_device().as_deref().unwrap_or_default() {
        let f = format!("{F}.weightDevice");
        if d.leaf_weight().is_some() {
            return Err(field(&f, "cgroup v2 has no leaf weight"));
        }
        if let Some(weight) = d.weight() {
            let dev = dev_num(&f, d.major(), d.minor())?;
            let v = blkio_to_io_weight(weight, &f)?;
            w.push(("io.weight".to_string(), format!("{dev} {v}")));
        }
    }
    let throttles = [
        (
            "throttleReadBpsDevice",
            "rbps",
            b.throttle_read_bps_device(),
        ),
        (
            "throttleWriteBpsDevice",
            "wbps",
            b.throttle_write_bps_device(),
        ),
        (
            "throttleReadIOPSDevice",
            "riops",
            b.throttle_read_iops_device(),
        ),
        (
            "throttleWriteIOPSDevice",
            "wiops",
            b.throttle_write_iops_device(),
        ),
    ];
    for (name, key, list) in throttles {
        for d in list.as_deref().unwrap_or_default() {
            let dev = dev_num(&format!("{F}.{name}"), d.major(), d.minor())?;
            // 0 lifts the limit.
            let rate = match d.rate() {
                0 => "max".to_string(),
                r => r.to_string(),
            };
            w.push(("io.max".to_string(), format!("{dev} {key}={rate}")));
        }
    }
    Ok(w)
}

/// One `linux.resources.hugepageLimits` entry → `hugetlb.<size>.max`: 0
/// is a limit of 0 (no huge pages; the kubelet sends one for every page
/// size), a negative limit `max`. Where the guest has no hugetlb
/// controller, entries that limit nothing (0 or negative: no huge pages
/// can be had there anyway) are skipped when the cgroup is written.
fn hugepage_write(h: &LinuxHugepageLimit) -> Result<(String, String), SpecError> {
    let size = h.page_size();
    let f = format!("linux.resources.hugepageLimits[{size}]");
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &size[digits.len()..];
    if digits.is_empty()
        || !digits.chars().all(|c| c.is_ascii_digit())
        || !["KB", "MB", "GB"].contains(&unit)
    {
        return Err(field(
            &f,
            "pageSize must be a number and KB, MB or GB (e.g. 2MB)",
        ));
    }
    let v = match h.limit() {
        0 => "0".to_string(),
        l => limit_value(l),
    };
    Ok((format!("hugetlb.{size}.max"), v))
}

/// The cgroup controllers the spec's resources need, each with the OCI
/// field that needs it.
pub fn required_controllers(r: &LinuxResources) -> Vec<(&'static str, String)> {
    let mut need: Vec<(&'static str, String)> = Vec::new();
    let writes_of = |b: &LinuxBlockIo| block_io_writes(b).map(|w| !w.is_empty()).unwrap_or(true);
    if r.block_io().as_ref().is_some_and(writes_of) {
        need.push(("io", "linux.resources.blockIO".into()));
    }
    // Only a positive limit needs the controller: the kubelet sends a 0
    // for every page size.
    if r.hugepage_limits()
        .as_ref()
        .is_some_and(|h| h.iter().any(|h| h.limit() > 0))
    {
        need.push(("hugetlb", "linux.resources.hugepageLimits".into()));
    }
    let mut keys: Vec<&String> = r.unified().iter().flat_map(|u| u.keys()).collect();
    keys.sort();
    for k in keys {
        if let Some((c, _)) = k.split_once('.') {
            if KNOWN_CONTROLLERS.contains(&c) {
                let c = KNOWN_CONTROLLERS
                    .iter()
                    .find(|k| **k == c)
                    .copied()
                    .unwrap_or("");
                need.push((c, format!("linux.resources.unified[{k}]")));
            }
        }
    }
    need
}

const KNOWN_CONTROLLERS: [&str; 8] = [
    "cpu", "cpuset", "io", "memory", "hugetlb", "pids", "rdma", "misc",
];

/// Refuse resources whose controller the container's cgroup does not get
/// (`available`: the pod parent's `cgroup.subtree_control`), naming the
/// field: without it the settings would not exist, let alone apply.
pub fn check_controllers(r: &LinuxResources, available: &str) -> Result<(), SpecError> {
    for (c, f) in required_controllers(r) {
        if !available.split_whitespace().any(|a| a == c) {
            return Err(field(
                &f,
                format!(
                    "the guest's cgroups have no {c} controller (available: {})",
                    available.trim()
                ),
            ));
        }
    }
    Ok(())
}

fn limit_value(v: i64) -> String {
    if v <= 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// cpu.shares (2..262144) → cpu.weight (1..10000), as runc/crun convert.
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9999) / 262_142
}

#[cfg(test)]
mod tests {
    use super::super::tests::{spec, BASE};
    use super::*;

    #[test]
    fn resources_to_cgroup_files() {
        let s = spec(BASE);
        let r = s.linux().as_ref().unwrap().resources().as_ref().unwrap();
        let w = cgroup_writes(r).unwrap();
        let get = |k: &str| w.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("memory.max"), Some("33554432"));
        assert_eq!(get("memory.swap.max"), Some("33554432"));
        assert_eq!(get("cpu.max"), Some("50000 100000"));
        assert_eq!(get("cpu.weight"), Some("39"));
        assert_eq!(get("pids.max"), Some("64"));
    }

    #[test]
    fn resources_unlimited_and_unified() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":-1},"cpu":{"period":100000},"pids":{"limit":0},
                "unified":{"memory.high":"1000000","io.weight":"50"}}"#,
        )
        .unwrap();
        let w = cgroup_writes(&r).unwrap();
        assert_eq!(
            w,
            vec![
                ("memory.max".to_string(), "max".to_string()),
                ("cpu.max".into(), "max 100000".into()),
                ("pids.max".into(), "max".into()),
                ("io.weight".into(), "50".into()),
                ("memory.high".into(), "1000000".into()),
            ]
        );
        for key in [
            "../../etc/passwd",
            "cgroup.procs",
            "cgroup.kill",
            "cgroup.subtree_control",
        ] {
            let bad: LinuxResources =
                serde_json::from_value(serde_json::json!({ "unified": { key: "1" } })).unwrap();
            let err = cgroup_writes(&bad).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn shares_weight_bounds() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1);
    }

    #[test]
    fn block_io() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"blockIO":{"weight":500,
                "weightDevice":[{"major":8,"minor":0,"weight":10}],
                "throttleReadBpsDevice":[{"major":8,"minor":0,"rate":1048576}],
                "throttleWriteIOPSDevice":[{"major":8,"minor":16,"rate":0}]}}"#,
        )
        .unwrap();
        assert_eq!(
            cgroup_writes(&r).unwrap(),
            vec![
                ("io.weight".to_string(), "default 4950".to_string()),
                ("io.weight".into(), "8:0 1".into()),
                ("io.max".into(), "8:0 rbps=1048576".into()),
                ("io.max".into(), "8:16 wiops=max".into()),
            ]
        );
        assert_eq!(
            required_controllers(&r),
            vec![("io", "linux.resources.blockIO".to_string())]
        );
        for bad in [
            r#"{"weight":5}"#,
            r#"{"leafWeight":100}"#,
            r#"{"throttleReadBpsDevice":[{"major":-1,"minor":0,"rate":1}]}"#,
        ] {
            let r: LinuxResources =
                serde_json::from_str(&format!(r#"{{"blockIO":{bad}}}"#)).unwrap();
            let e = cgroup_writes(&r).unwrap_err().to_string();
            assert!(e.contains("linux.resources.blockIO"), "{bad}: {e}");
        }
        // An empty blockIO asks for nothing.
        let r: LinuxResources = serde_json::from_str(r#"{"blockIO":{}}"#).unwrap();
        assert!(cgroup_writes(&r).unwrap().is_empty());
        assert!(required_controllers(&r).is_empty());
    }

    #[test]
    fn hugepages() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"hugepageLimits":[{"pageSize":"2MB","limit":209715200},{"pageSize":"1GB","limit":-1},
                {"pageSize":"64KB","limit":0}]}"#,
        )
        .unwrap();
        assert_eq!(
            cgroup_writes(&r).unwrap(),
            vec![
                ("hugetlb.2MB.max".to_string(), "209715200".to_string()),
                ("hugetlb.1GB.max".into(), "max".into()),
                ("hugetlb.64KB.max".into(), "0".into()),
            ]
        );
        for bad in ["2M", "MB", "2/MB", "x2MB"] {
            let r: LinuxResources = serde_json::from_value(
                serde_json::json!({"hugepageLimits": [{"pageSize": bad, "limit": 1}]}),
            )
            .unwrap();
            let e = cgroup_writes(&r).unwrap_err().to_string();
            assert!(e.contains("hugepageLimits"), "{bad}: {e}");
        }
    }

    #[test]
    fn missing_controllers_name_the_field() {
        let guest = "cpuset cpu memory pids";
        let r: LinuxResources =
            serde_json::from_str(r#"{"hugepageLimits":[{"pageSize":"2MB","limit":1}]}"#).unwrap();
        let e = check_controllers(&r, guest).unwrap_err().to_string();
        assert!(
            e.contains("linux.resources.hugepageLimits") && e.contains("hugetlb"),
            "{e}"
        );
        assert!(check_controllers(&r, "memory hugetlb").is_ok());
        // What the kubelet sends for every page size: no controller needed.
        let r: LinuxResources = serde_json::from_str(
            r#"{"hugepageLimits":[{"pageSize":"2MB","limit":0},{"pageSize":"1GB","limit":0}]}"#,
        )
        .unwrap();
        assert!(check_controllers(&r, guest).is_ok());
        let r: LinuxResources = serde_json::from_str(r#"{"blockIO":{"weight":100}}"#).unwrap();
        let e = check_controllers(&r, guest).unwrap_err().to_string();
        assert!(
            e.contains("linux.resources.blockIO") && e.contains(" io "),
            "{e}"
        );
        assert!(check_controllers(&r, "io memory").is_ok());
        let r: LinuxResources =
            serde_json::from_str(r#"{"unified":{"io.weight":"100","memory.high":"1"}}"#).unwrap();
        let e = check_controllers(&r, guest).unwrap_err().to_string();
        assert!(e.contains("linux.resources.unified[io.weight]"), "{e}");
        // Memory, cpu and pids limits of a plain spec need what the guest has.
        let s = spec(BASE);
        let r = s.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert!(check_controllers(r, guest).is_ok());
    }

    #[test]
    fn zero_leaves_settings_alone_and_minus_one_lifts_them() {
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":0,"reservation":0,"swap":0},"cpu":{"shares":0,"quota":0}}"#,
        )
        .unwrap();
        assert!(cgroup_writes(&r).unwrap().is_empty());
        let r: LinuxResources = serde_json::from_str(
            r#"{"memory":{"limit":-1,"reservation":-1,"swap":-1},"cpu":{"quota":-1}}"#,
        )
        .unwrap();
        assert_eq!(
            cgroup_writes(&r).unwrap(),
            vec![
                ("memory.max".to_string(), "max".to_string()),
                ("memory.swap.max".into(), "max".into()),
                ("memory.low".into(), "max".into()),
                ("cpu.max".into(), "max".into()),
            ]
        );
        // A reservation is a reservation, not unlimited protection.
        let r: LinuxResources =
            serde_json::from_str(r#"{"memory":{"reservation":1048576}}"#).unwrap();
        assert_eq!(
            cgroup_writes(&r).unwrap(),
            vec![("memory.low".to_string(), "1048576".to_string())]
        );
        // A quota alone keeps the period.
        let r: LinuxResources = serde_json::from_str(r#"{"cpu":{"quota":20000}}"#).unwrap();
        assert_eq!(
            cgroup_writes(&r).unwrap(),
            vec![("cpu.max".to_string(), "20000".to_string())]
        );
        // memory+swap needs the memory part.
        let r: LinuxResources = serde_json::from_str(r#"{"memory":{"swap":1048576}}"#).unwrap();
        assert!(cgroup_writes(&r).is_err());
    }
}
