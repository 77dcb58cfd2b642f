//! A booted agent microVM for end-to-end tests: the QEMU backend (TCG where
//! KVM cannot run guest userspace), `build/guest/vmlinux` and the test
//! initramfs (busybox container rootfs at `/containers/busybox`), plus a
//! connected agent client.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmpod_runtime::agent_client::{AgentClient, ExitStatus, OutputStream, AGENT_VSOCK_PORT};
use vmpod_runtime::hypervisor::qemu::{Accel, QemuHypervisor};
use vmpod_runtime::hypervisor::{SharedDirConfig, VmConfig, VmHandle};

/// The busybox container rootfs inside the test initramfs.
pub const BUSYBOX_ROOTFS: &str = "/containers/busybox";

/// virtio-fs tag of [`AgentVm::shared`].
pub const SHARED_TAG: &str = "vmpodshared";

pub struct AgentVm {
    /// Runtime the VM was started on and the client lives on.
    pub rt: tokio::runtime::Runtime,
    pub client: AgentClient,
    pub vm: Option<Box<dyn VmHandle>>,
    pub console: PathBuf,
    /// Host directory shared into the guest with virtio-fs (tag
    /// [`SHARED_TAG`]) when virtiofsd is installed (`make tools`).
    pub shared: Option<PathBuf>,
}

/// Boot a VM whose files live in `target/<name>` (recreated; the console
/// log stays there for post-mortems). The VM's processes are started from a
/// runtime worker thread and die with the test process.
pub fn boot(name: &str) -> Result<AgentVm, String> {
    let g = crate::build_dir().join("guest");
    let (kernel, initrd) = (g.join("vmlinux"), g.join("initramfs-test.cpio.gz"));
    for p in [&kernel, &initrd] {
        if !p.exists() {
            return Err(format!("{} missing: run `make guest` first", p.display()));
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let dir = crate::repo_root().join("target").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    eprintln!("{name}: VM files in {}", dir.display());
    let console = dir.join("console.log");
    let shared = vmpod_runtime::hypervisor::tools::find("virtiofsd").map(|_| dir.join("shared"));
    if let Some(d) = &shared {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    let config = VmConfig {
        kernel,
        initrd: Some(initrd),
        cmdline: "console=ttyS0 reboot=t panic=-1 quiet".into(),
        vcpus: 1,
        memory_mib: 512,
        vsock_uds: dir.join("vsock"),
        guest_cid: 3,
        console_log: console.clone(),
        disks: vec![],
        nets: vec![],
        shared_dirs: shared
            .iter()
            .map(|p| SharedDirConfig {
                tag: SHARED_TAG.into(),
                path: p.clone(),
            })
            .collect(),
        rng: true,
        vsock_backend: Default::default(),
    };
    let console2 = console.clone();
    let booted = rt.block_on(async move {
        // die_with_parent ties QEMU to the spawning thread: use a worker.
        tokio::spawn(async move {
            let hv = QemuHypervisor::discover(Accel::Auto)
                .map_err(|e| e.to_string())?
                .die_with_parent(true);
            let t = Instant::now();
            let vm = hv.start_vm(&config).await.map_err(|e| e.to_string())?;
            let vm: Box<dyn VmHandle> = Box::new(vm);
            let client = AgentClient::connect_retry(
                vm.vsock_uds(),
                AGENT_VSOCK_PORT,
                Duration::from_secs(90),
            )
            .await
            .map_err(|e| {
                let log = std::fs::read_to_string(&console2).unwrap_or_default();
                format!("{e}\nconsole:\n{log}")
            })?;
            eprintln!("agent ready {:?} after VM start", t.elapsed());
            client.sync_time().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((vm, client.with_timeout(Duration::from_secs(60))))
        })
        .await
        .map_err(|e| e.to_string())?
    });
    let (vm, client) = booted?;
    Ok(AgentVm {
        rt,
        client,
        vm: Some(vm),
        console,
        shared,
    })
}

/// A minimal OCI spec running `args` in the busybox rootfs, with a small
/// capability set and the usual masked/read-only paths.
pub fn busybox_spec(args: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin"],
            "cwd": "/",
            "noNewPrivileges": true,
            "capabilities": {
                "bounding": ["CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"],
                "effective": ["CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"],
                "permitted": ["CAP_KILL", "CAP_CHOWN", "CAP_SETUID", "CAP_SETGID"]
            }
        },
        "root": {"path": BUSYBOX_ROOTFS},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"]
        }
    })
}

static SHARED: OnceLock<Result<AgentVm, String>> = OnceLock::new();

/// Statics are never dropped: stop the shared VM when the test process
/// exits, so QEMU's runtime dir and sockets are removed too.
extern "C" fn stop_shared() {
    if let Some(Ok(f)) = SHARED.get() {
        if let Some(vm) = &f.vm {
            let _ = f
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(20), vm.stop()).await });
        }
    }
}

/// The one agent VM of this test binary, booted on first use (files in
/// `target/<name>`) and stopped when the process exits; panics if it
/// cannot boot.
pub fn shared(name: &str) -> &'static AgentVm {
    let vm = SHARED.get_or_init(|| {
        // SAFETY: registers a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(stop_shared) };
        boot(name)
    });
    match vm {
        Ok(f) => f,
        Err(e) => panic!("booting the agent VM failed: {e}"),
    }
}

/// A raw ttrpc agent client on a new connection to `uds`, for what
/// [`AgentClient`] does not expose (e.g. WriteStdin's `written` count).
pub async fn raw_agent(uds: &std::path::Path) -> vmpod_proto::agent_ttrpc::AgentClient {
    let s = vmpod_runtime::agent_client::connect_stream(uds, AGENT_VSOCK_PORT)
        .await
        .unwrap();
    let c = vmpod_proto::ttrpc::r#async::Client::new(
        vmpod_proto::ttrpc::r#async::transport::Socket::from(s),
    );
    vmpod_proto::agent_ttrpc::AgentClient::new(c)
}

/// An OCI spec as the bytes the agent takes.
pub fn bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// create + start + collect output + wait + remove.
pub async fn run(
    c: &AgentClient,
    id: &str,
    spec: &serde_json::Value,
) -> (String, String, ExitStatus) {
    c.create_container(id, bytes(spec), "", None, false)
        .await
        .unwrap();
    c.start_container(id).await.unwrap();
    let (out, err) = tokio::join!(
        c.read_to_end(id, "", OutputStream::Stdout),
        c.read_to_end(id, "", OutputStream::Stderr)
    );
    let st = c.wait(id, "").await.unwrap();
    c.remove_container(id).await.unwrap();
    (
        String::from_utf8_lossy(&out.unwrap()).into(),
        String::from_utf8_lossy(&err.unwrap()).into(),
        st,
    )
}

/// Run `args` in container `id` (CRI ExecSync, 30 s) and return its
/// stdout; each call gets an exec id of its own.
pub async fn exec_stdout(c: &AgentClient, id: &str, args: &[&str]) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let exec_id = format!(
        "probe-{}",
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let e = vmpod_runtime::agent_client::ExecSpec {
        args: args.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let (out, _, _) = c
        .exec_sync(id, &exec_id, &e, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}
