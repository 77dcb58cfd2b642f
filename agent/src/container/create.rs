//! Create: translate the spec, make the cgroup, clone the staged init and
//! wait until it is ready to exec.

use std::sync::{Arc, Mutex};

use oci_spec::runtime::Spec;

use super::cgroup::{leaf_controllers, Cgroup};
use super::config::StageMode;
use super::process::{launch, Launch};
use super::{spec, validate_id, Container};
use crate::error::{AgentError, Result};
use crate::state::Agent;

pub struct CreateRequest {
    pub id: String,
    pub spec_json: Vec<u8>,
    pub rootfs: String,
    /// `user[:group]` resolved in the container, overriding the spec's ids.
    pub username: Option<String>,
    pub stdin: bool,
}

pub async fn create(agent: &Arc<Agent>, req: CreateRequest) -> Result<u32> {
    validate_id("container", &req.id)?;
    let a = agent.clone();
    // Reserve, create and insert (or release the id) all on the blocking
    // thread: ttrpc drops this future when the caller's deadline passes,
    // and the blocking task still runs to its end, so the id is never left
    // reserved and a failure always cleans up. A create that finishes
    // after its caller gave up leaves a created container to remove.
    tokio::task::spawn_blocking(move || {
        let reservation = a.reserve(&req.id)?;
        let c = create_blocking(&a, req)?;
        let pid = c.init.pid as u32;
        reservation.fill(c);
        Ok(pid)
    })
    .await
    .map_err(|e| AgentError::internal("create task", e))?
}

fn create_blocking(agent: &Arc<Agent>, req: CreateRequest) -> Result<Arc<Container>> {
    let id = &req.id;
    let bad = |e: spec::SpecError| AgentError::InvalidArgument(format!("container {id:?}: {e}"));
    let oci: Spec = serde_json::from_slice(&req.spec_json).map_err(|e| {
        AgentError::InvalidArgument(format!("container {id:?}: invalid OCI spec JSON: {e}"))
    })?;
    let mut stage =
        spec::init_stage(&oci, Some(req.rootfs.as_str()).filter(|r| !r.is_empty())).map_err(bad)?;
    if let Some(u) = req.username.filter(|u| !u.is_empty()) {
        stage.process.user.username = Some(u);
    }
    let ns = spec::namespaces(&oci).map_err(bad)?;
    let ignored = spec::ignored_fields(&oci);
    if !ignored.is_empty() {
        tracing::info!(container = %id, fields = ?ignored, "security labels ignored: the guest has no AppArmor or SELinux");
    }
    let (writes, devices) = match oci.linux().as_ref().and_then(|l| l.resources().as_ref()) {
        Some(r) => {
            if let Some(available) = leaf_controllers(agent.cgroups.as_ref()) {
                spec::check_controllers(r, &available).map_err(bad)?;
            }
            (
                spec::cgroup_writes(r).map_err(bad)?,
                spec::device_rules(r).map_err(bad)?,
            )
        }
        None => (Vec::new(), None),
    };
    let StageMode::Init(root) = &stage.mode else {
        return Err(AgentError::Internal("init stage expected".into()));
    };
    if !std::path::Path::new(&root.path).is_dir() {
        return Err(AgentError::InvalidArgument(format!(
            "container {id:?}: rootfs {:?} does not exist or is not a directory",
            root.path
        )));
    }
    let new_cgroupns = root.new_cgroupns;
    let cgroup = Cgroup::for_container(id);
    let cgfs = agent.cgroups.as_ref();
    cgroup
        .create(cgfs, &writes, devices.as_deref())
        .map_err(|e| e.to_agent(&format!("container {id:?}")))?;
    let init_process = stage.process.clone();
    let pid_ns = match &ns.pid_path {
        Some(p) => match std::fs::File::open(p) {
            Ok(f) => Some(f),
            Err(e) => {
                let _ = cgroup.destroy(cgfs);
                return Err(AgentError::InvalidArgument(format!(
                    "container {id:?}: PID namespace {p}: {e}"
                )));
            }
        },
        None => None,
    };
    let launched = launch(
        agent,
        Launch {
            config: stage,
            clone_flags: ns.clone_flags,
            stdin: req.stdin,
            cgroup: &cgroup,
            pid_ns,
            what: format!("container {id:?}"),
        },
    );
    let init = match launched {
        Ok(p) => p,
        Err(e) => {
            if let Err(ce) = cgroup.destroy(cgfs) {
                tracing::warn!(container = %id, error = %ce, "cgroup cleanup after failed create");
            }
            return Err(e);
        }
    };
    tracing::info!(container = %id, pid = init.pid, "container created");
    Ok(Arc::new(Container {
        id: id.clone(),
        cgroup,
        init,
        init_process,
        new_cgroupns,
        execs: Mutex::new(Default::default()),
    }))
}
