//! CRI `RuntimeService`. Version, Status and RuntimeConfig are real; every
//! sandbox/container RPC answers `Unimplemented` naming itself until the
//! sandbox manager lands — never a fake success.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_server::RuntimeService;
use tonic::{Request, Response, Status};

use crate::config::{CgroupDriver, Config};
use crate::{cni, status};

/// `VersionResponse.version`: the kubelet runtime API version we speak.
const KUBELET_API_VERSION: &str = "0.1.0";
pub const RUNTIME_NAME: &str = "vmpod";
pub const RUNTIME_API_VERSION: &str = "v1";

/// Why `RuntimeReady` is false: told plainly to kubelet and `crictl info`.
pub const RUNTIME_NOT_READY_REASON: &str = "SandboxesNotImplemented";
pub const RUNTIME_NOT_READY_MESSAGE: &str = "vmpod cannot start pod sandboxes yet: \
    RunPodSandbox and the container RPCs are not implemented in this build; \
    the image service is fully available";
pub const NETWORK_NOT_READY_REASON: &str = "NetworkPluginNotReady";

pub struct RuntimeSvc {
    config: Arc<Config>,
}

impl RuntimeSvc {
    pub fn new(config: Arc<Config>) -> Self {
        RuntimeSvc { config }
    }

    fn conditions(&self, cni: &Result<cni::CniNetwork, String>) -> Vec<cri::RuntimeCondition> {
        let runtime = cri::RuntimeCondition {
            r#type: "RuntimeReady".into(),
            status: false,
            reason: RUNTIME_NOT_READY_REASON.into(),
            message: RUNTIME_NOT_READY_MESSAGE.into(),
        };
        let network = match cni {
            Ok(_) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                ..Default::default()
            },
            Err(why) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: NETWORK_NOT_READY_REASON.into(),
                message: format!("Network plugin returns error: {why}"),
            },
        };
        vec![runtime, network]
    }

    /// `verbose` info: every value is a JSON document (crictl parses them).
    fn verbose_info(&self, cni: &Result<cni::CniNetwork, String>) -> HashMap<String, String> {
        let cni = match cni {
            Ok(n) => serde_json::json!({
                "ready": true, "network": n.name, "file": n.file, "plugins": n.plugins,
            }),
            Err(e) => serde_json::json!({ "ready": false, "error": e }),
        };
        HashMap::from([
            ("config".to_string(), self.config.to_json().to_string()),
            ("cni".to_string(), cni.to_string()),
        ])
    }

    /// The default handler under the empty name (as kubelet looks it up),
    /// then every named one. No optional features yet.
    fn handlers(&self) -> Vec<cri::RuntimeHandler> {
        let features = Some(cri::RuntimeHandlerFeatures {
            recursive_read_only_mounts: false,
            user_namespaces: false,
        });
        std::iter::once(String::new())
            .chain(self.config.runtimes.keys().cloned())
            .map(|name| cri::RuntimeHandler { name, features })
            .collect()
    }
}

type EventStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>>;

/// Expands to the `RuntimeService` impl: the hand-written handlers plus one
/// `Unimplemented` handler per listed RPC.
macro_rules! runtime_service {
    (
        implemented { $($body:tt)* }
        not_built { $($rpc:literal => $name:ident($req:ident) -> $resp:ident;)* }
    ) => {
        #[tonic::async_trait]
        impl RuntimeService for RuntimeSvc {
            $($body)*
            $(
                async fn $name(
                    &self,
                    _req: Request<cri::$req>,
                ) -> Result<Response<cri::$resp>, Status> {
                    Err(status::unimplemented($rpc))
                }
            )*
        }
    };
}

runtime_service! {
    implemented {
        async fn version(
            &self,
            _req: Request<cri::VersionRequest>,
        ) -> Result<Response<cri::VersionResponse>, Status> {
            Ok(Response::new(cri::VersionResponse {
                version: KUBELET_API_VERSION.into(),
                runtime_name: RUNTIME_NAME.into(),
                runtime_version: env!("CARGO_PKG_VERSION").into(),
                runtime_api_version: RUNTIME_API_VERSION.into(),
            }))
        }

        async fn status(
            &self,
            req: Request<cri::StatusRequest>,
        ) -> Result<Response<cri::StatusResponse>, Status> {
            let verbose = req.into_inner().verbose;
            // File I/O (a slow or hung disk): on the blocking pool.
            let cni_cfg = self.config.cni.clone();
            let cni = tokio::task::spawn_blocking(move || cni::check(&cni_cfg))
                .await
                .map_err(status::join_error)?;
            Ok(Response::new(cri::StatusResponse {
                status: Some(cri::RuntimeStatus {
                    conditions: self.conditions(&cni),
                }),
                info: if verbose { self.verbose_info(&cni) } else { HashMap::new() },
                runtime_handlers: self.handlers(),
                features: Some(cri::RuntimeFeatures {
                    supplemental_groups_policy: false,
                }),
            }))
        }

        async fn runtime_config(
            &self,
            _req: Request<cri::RuntimeConfigRequest>,
        ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
            let driver = match self.config.cgroup_driver {
                CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
                CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
            };
            Ok(Response::new(cri::RuntimeConfigResponse {
                linux: Some(cri::LinuxRuntimeConfiguration {
                    cgroup_driver: driver as i32,
                }),
            }))
        }

        type GetContainerEventsStream = EventStream;

        async fn get_container_events(
            &self,
            _req: Request<cri::GetEventsRequest>,
        ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
            Err(status::unimplemented("GetContainerEvents"))
        }
    }
    not_built {
        "RunPodSandbox" => run_pod_sandbox(RunPodSandboxRequest) -> RunPodSandboxResponse;
        "StopPodSandbox" => stop_pod_sandbox(StopPodSandboxRequest) -> StopPodSandboxResponse;
        "RemovePodSandbox" => remove_pod_sandbox(RemovePodSandboxRequest) -> RemovePodSandboxResponse;
        "PodSandboxStatus" => pod_sandbox_status(PodSandboxStatusRequest) -> PodSandboxStatusResponse;
        "ListPodSandbox" => list_pod_sandbox(ListPodSandboxRequest) -> ListPodSandboxResponse;
        "CreateContainer" => create_container(CreateContainerRequest) -> CreateContainerResponse;
        "StartContainer" => start_container(StartContainerRequest) -> StartContainerResponse;
        "StopContainer" => stop_container(StopContainerRequest) -> StopContainerResponse;
        "RemoveContainer" => remove_container(RemoveContainerRequest) -> RemoveContainerResponse;
        "ListContainers" => list_containers(ListContainersRequest) -> ListContainersResponse;
        "ContainerStatus" => container_status(ContainerStatusRequest) -> ContainerStatusResponse;
        "UpdateContainerResources" => update_container_resources(UpdateContainerResourcesRequest) -> UpdateContainerResourcesResponse;
        "ReopenContainerLog" => reopen_container_log(ReopenContainerLogRequest) -> ReopenContainerLogResponse;
        "ExecSync" => exec_sync(ExecSyncRequest) -> ExecSyncResponse;
        "Exec" => exec(ExecRequest) -> ExecResponse;
        "Attach" => attach(AttachRequest) -> AttachResponse;
        "PortForward" => port_forward(PortForwardRequest) -> PortForwardResponse;
        "ContainerStats" => container_stats(ContainerStatsRequest) -> ContainerStatsResponse;
        "ListContainerStats" => list_container_stats(ListContainerStatsRequest) -> ListContainerStatsResponse;
        "PodSandboxStats" => pod_sandbox_stats(PodSandboxStatsRequest) -> PodSandboxStatsResponse;
        "ListPodSandboxStats" => list_pod_sandbox_stats(ListPodSandboxStatsRequest) -> ListPodSandboxStatsResponse;
        "UpdateRuntimeConfig" => update_runtime_config(UpdateRuntimeConfigRequest) -> UpdateRuntimeConfigResponse;
        "CheckpointContainer" => checkpoint_container(CheckpointContainerRequest) -> CheckpointContainerResponse;
        "ListMetricDescriptors" => list_metric_descriptors(ListMetricDescriptorsRequest) -> ListMetricDescriptorsResponse;
        "ListPodSandboxMetrics" => list_pod_sandbox_metrics(ListPodSandboxMetricsRequest) -> ListPodSandboxMetricsResponse;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn runtime_config_reports_the_configured_cgroup_driver() {
        for (text, want) in [
            ("", cri::CgroupDriver::Cgroupfs),
            ("cgroup_driver = \"cgroupfs\"", cri::CgroupDriver::Cgroupfs),
            ("cgroup_driver = \"systemd\"", cri::CgroupDriver::Systemd),
        ] {
            let config = Config::parse(text, std::path::Path::new("/t.toml")).unwrap();
            let svc = RuntimeSvc::new(Arc::new(config));
            let r = svc
                .runtime_config(Request::new(cri::RuntimeConfigRequest {}))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.linux.unwrap().cgroup_driver, want as i32, "{text:?}");
        }
        let err = Config::parse(
            "cgroup_driver = \"cgroupv2\"",
            std::path::Path::new("/t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cgroup_driver") && err.contains("systemd"),
            "{err}"
        );
    }

    /// The CNI config is a FIFO: reading it hangs (like a stuck disk) until
    /// a writer comes. The writer only comes after a timer on the runtime's
    /// one worker fires, so if `Status` read it on that worker, nothing
    /// could make progress (a rescue thread then unblocks it and the test
    /// fails instead of hanging).
    #[tokio::test(flavor = "current_thread")]
    async fn status_reads_the_cni_config_off_the_async_worker() {
        let d = tempfile::tempdir().unwrap();
        let conf_dir = d.path().join("net.d");
        std::fs::create_dir(&conf_dir).unwrap();
        let fifo = conf_dir.join("10-pods.conf");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut config = Config::default();
        config.cni.conf_dir = conf_dir;
        config.cni.bin_dirs = vec![d.path().join("bin")];
        let svc = RuntimeSvc::new(Arc::new(config));

        // Open the FIFO's write end without blocking (ENXIO while no reader).
        let open_writer = |p: &std::path::Path| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(p)
        };
        let done = Arc::new(AtomicBool::new(false));
        let rescued = Arc::new(AtomicBool::new(false));
        {
            let (done, rescued, fifo) = (done.clone(), rescued.clone(), fifo.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(10));
                if !done.load(Ordering::SeqCst) {
                    rescued.store(true, Ordering::SeqCst);
                    let _ = open_writer(&fifo); // the reader sees EOF
                }
            });
        }
        let status = tokio::spawn(async move {
            svc.status(Request::new(cri::StatusRequest { verbose: false }))
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                if let Ok(mut f) = open_writer(&fifo) {
                    f.write_all(br#"{"name":"pods","type":"bridge"}"#).unwrap();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .await
        .unwrap();
        let resp = status.await.unwrap().unwrap().into_inner();
        done.store(true, Ordering::SeqCst);
        assert!(
            !rescued.load(Ordering::SeqCst),
            "Status blocked the async worker"
        );
        let net = &resp.status.unwrap().conditions[1];
        // The config was read (plugin missing is what it reports).
        assert!(net.message.contains("\"bridge\""), "{net:?}");
    }
}
