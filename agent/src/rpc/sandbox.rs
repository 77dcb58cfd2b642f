//! Sandbox RPCs: guest set-up (hostname, DNS, sysctls, mounts, clock),
//! details, destroy.

use std::sync::Arc;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use vmpod_proto::agent::*;

use crate::container::cgroup::POD_PARENT;
use crate::container::delete;
use crate::container::spec::parse_mount_options;
use crate::error::{AgentError, Result};
use crate::state::Agent;

pub fn resolv_conf(servers: &[String], searches: &[String], options: &[String]) -> String {
    let mut s = String::new();
    for ns in servers {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    if !searches.is_empty() {
        s.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        s.push_str(&format!("options {}\n", options.join(" ")));
    }
    s
}

fn valid_sysctl(key: &str) -> bool {
    !key.is_empty()
        && key
            .split('.')
            .all(|c| !c.is_empty() && c != ".." && !c.contains('/'))
}

/// Sandbox set-up makes blocking syscalls (mount(2) of virtio-fs can take
/// long): it runs on a blocking thread, which also finishes (recording
/// every mount it made, for destroy) if the caller's deadline drops the
/// handler.
pub async fn create_sandbox(
    agent: &Arc<Agent>,
    req: CreateSandboxRequest,
) -> Result<CreateSandboxResponse> {
    let a = agent.clone();
    tokio::task::spawn_blocking(move || set_up_sandbox(&a, req))
        .await
        .map_err(|e| AgentError::internal("sandbox set-up task", e))??;
    Ok(CreateSandboxResponse::default())
}

fn set_up_sandbox(agent: &Agent, req: CreateSandboxRequest) -> Result<()> {
    if req.host_time_unix_nanos > 0 {
        set_clock(req.host_time_unix_nanos)?;
    }
    if !req.hostname.is_empty() {
        nix::unistd::sethostname(&req.hostname).map_err(|e| {
            AgentError::InvalidArgument(format!("hostname {:?}: {e}", req.hostname))
        })?;
    }
    if !req.dns_servers.is_empty() || !req.dns_searches.is_empty() {
        std::fs::create_dir_all("/etc").map_err(|e| AgentError::internal("mkdir /etc", e))?;
        std::fs::write(
            "/etc/resolv.conf",
            resolv_conf(&req.dns_servers, &req.dns_searches, &req.dns_options),
        )
        .map_err(|e| AgentError::internal("write /etc/resolv.conf", e))?;
    }
    for s in &req.sysctls {
        if !valid_sysctl(&s.key) {
            return Err(AgentError::InvalidArgument(format!(
                "invalid sysctl {:?}",
                s.key
            )));
        }
        std::fs::write(format!("/proc/sys/{}", s.key.replace('.', "/")), &s.value).map_err(
            |e| AgentError::InvalidArgument(format!("sysctl {}={}: {e}", s.key, s.value)),
        )?;
    }
    for m in &req.mounts {
        if !m.target.starts_with('/') || m.target.split('/').any(|c| c == "..") {
            return Err(AgentError::InvalidArgument(format!(
                "mount target {:?} must be absolute",
                m.target
            )));
        }
        std::fs::create_dir_all(&m.target)
            .map_err(|e| AgentError::internal(format!("mkdir {}", m.target), e))?;
        let (flags, _, data) = parse_mount_options(&m.options);
        let data = (!data.is_empty()).then_some(data.as_str());
        mount(
            Some(m.source.as_str()),
            m.target.as_str(),
            Some(m.fstype.as_str()),
            MsFlags::from_bits_truncate(flags),
            data,
        )
        .map_err(|e| {
            AgentError::InvalidArgument(format!(
                "mount {} ({}) on {}: {e}",
                m.source, m.fstype, m.target
            ))
        })?;
        agent
            .sandbox_mounts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(m.target.clone());
    }
    tracing::info!(sandbox = %req.sandbox_id, hostname = %req.hostname, "sandbox set up");
    Ok(())
}

fn set_clock(nanos: i64) -> Result<()> {
    let ts = nix::sys::time::TimeSpec::new(nanos / 1_000_000_000, nanos % 1_000_000_000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
        .map_err(|e| AgentError::internal("set guest clock", e))
}

pub async fn set_time(_agent: &Arc<Agent>, req: SetTimeRequest) -> Result<SetTimeResponse> {
    if req.unix_nanos <= 0 {
        return Err(AgentError::InvalidArgument("time must be positive".into()));
    }
    set_clock(req.unix_nanos)?;
    Ok(SetTimeResponse::default())
}

/// How long DestroySandbox waits for container creates in flight.
const CREATE_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs as a task of its own (a dropped handler must not stop a teardown
/// half-way); unmount and sync(2) run on a blocking thread.
pub async fn destroy_sandbox(
    agent: &Arc<Agent>,
    _req: DestroySandboxRequest,
) -> Result<DestroySandboxResponse> {
    let a = agent.clone();
    tokio::spawn(async move { destroy(&a).await })
        .await
        .map_err(|e| AgentError::internal("destroy sandbox task", e))??;
    Ok(DestroySandboxResponse::default())
}

async fn destroy(agent: &Arc<Agent>) -> Result<()> {
    // No new containers; those being created finish (or fail) first, so
    // none is left behind. Then remove every container and unmount
    // everything even if one removal fails; report the first failure.
    agent.begin_destroy();
    let t = std::time::Instant::now();
    while agent.creating() > 0 {
        if t.elapsed() > CREATE_DRAIN_TIMEOUT {
            tracing::warn!(pending = agent.creating(), "destroy: creates still running");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut first_err = None;
    for c in agent.list() {
        if let Err(e) = delete::remove(agent, &c.id).await {
            tracing::warn!(container = %c.id, error = %e, "remove on destroy");
            first_err.get_or_insert(e);
        }
    }
    let a = agent.clone();
    tokio::task::spawn_blocking(move || {
        let mounts: Vec<String> =
            std::mem::take(&mut *a.sandbox_mounts.lock().unwrap_or_else(|p| p.into_inner()));
        for m in mounts.iter().rev() {
            if let Err(e) = umount2(m.as_str(), MntFlags::MNT_DETACH) {
                tracing::warn!(mount = %m, error = %e, "unmount on destroy");
            }
        }
        nix::unistd::sync();
    })
    .await
    .map_err(|e| AgentError::internal("unmount task", e))?;
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Mount points of the agent's namespace (field 5 of mountinfo).
pub fn mount_points(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect()
}

pub async fn guest_details(
    agent: &Arc<Agent>,
    _req: GuestDetailsRequest,
) -> Result<GuestDetailsResponse> {
    let uts = nix::sys::utsname::uname().map_err(|e| AgentError::internal("uname", e))?;
    let mem_total_bytes = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    let parent = agent.cgroups.root().join(POD_PARENT);
    let mut cgroups: Vec<String> = std::fs::read_dir(&parent)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| format!("{POD_PARENT}/{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    cgroups.sort();
    let me = std::process::id().to_string();
    let process_count = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.chars().all(|c| c.is_ascii_digit()) && n != me.as_str() && is_user_process(&n)
                })
                .count()
        })
        .unwrap_or(0) as u32;
    Ok(GuestDetailsResponse {
        kernel_release: uts.release().to_string_lossy().into_owned(),
        mem_total_bytes,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        container_ids: agent.list().iter().map(|c| c.id.clone()).collect(),
        mount_points: mount_points(
            &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        ),
        cgroups,
        process_count,
        ..Default::default()
    })
}

/// Kernel threads have an empty cmdline.
fn is_user_process(pid: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| !c.is_empty())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv() {
        let s = resolv_conf(
            &["10.0.0.2".into()],
            &["svc.local".into(), "local".into()],
            &["ndots:5".into()],
        );
        assert_eq!(
            s,
            "nameserver 10.0.0.2\nsearch svc.local local\noptions ndots:5\n"
        );
    }

    #[test]
    fn sysctl_keys() {
        assert!(valid_sysctl("net.ipv4.ip_forward"));
        assert!(!valid_sysctl("net/../../x"));
        assert!(!valid_sysctl(""));
        assert!(!valid_sysctl("a..b"));
    }

    #[test]
    fn mountinfo_points() {
        let mi =
            "22 1 0:20 / / rw - rootfs rootfs rw\n23 22 0:21 / /proc rw,nosuid - proc proc rw\n";
        assert_eq!(mount_points(mi), vec!["/", "/proc"]);
    }
}
