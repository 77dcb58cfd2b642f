//! The CRI daemon itself, over its real socket: Version, Status,
//! RuntimeConfig, Unimplemented RPCs, config errors, socket handling and
//! shutdown. (Images: `cri_images.rs`.)

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use tonic::Code;
use vmpod_tests::cri_client::{
    cri, serve_command, serve_command_with, serve_expect_exit, CriClient, Daemon,
};

/// A config whose CNI dir is an empty temp dir (so NetworkReady is
/// deterministic whatever the host has in /etc/cni/net.d).
fn config_no_cni(dir: &Path) -> String {
    let cni = dir.join("cni-empty");
    std::fs::create_dir_all(&cni).unwrap();
    format!("[cni]\nconf_dir = \"{}\"\n", cni.display())
}

fn condition<'a>(s: &'a cri::StatusResponse, t: &str) -> &'a cri::RuntimeCondition {
    s.status
        .as_ref()
        .expect("status")
        .conditions
        .iter()
        .find(|c| c.r#type == t)
        .unwrap_or_else(|| panic!("no {t} condition in {s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_names_vmpod_and_v1() {
    let d = Daemon::start("").unwrap();
    let mut c = d.client().await.unwrap();
    let v = c
        .runtime
        .version(cri::VersionRequest {
            version: "0.1.0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "vmpod");
    assert_eq!(v.runtime_api_version, "v1");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.version, "0.1.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_the_truth_and_verbose_returns_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[runtimes.vmpod]\nvcpus = 3\n\n[runtimes.fast]\nhypervisor = \"qemu\"\nmemory_mib = 512\n",
        config_no_cni(tmp.path())
    );
    let d = Daemon::start(&config).unwrap();
    let mut c = d.client().await.unwrap();

    let s = c
        .runtime
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let rt = condition(&s, "RuntimeReady");
    assert!(
        !rt.status,
        "no sandbox can start yet, so RuntimeReady must be false"
    );
    assert_eq!(rt.reason, "SandboxesNotImplemented");
    assert!(rt.message.contains("RunPodSandbox"), "{}", rt.message);
    let net = condition(&s, "NetworkReady");
    assert!(!net.status);
    assert_eq!(net.reason, "NetworkPluginNotReady");
    assert!(net.message.contains("no CNI config"), "{}", net.message);
    assert!(s.info.is_empty(), "info only when verbose");
    let names: Vec<_> = s.runtime_handlers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(
        names,
        ["", "fast", "vmpod"],
        "default handler first, under the empty name"
    );

    let s = c
        .runtime
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let cfg: serde_json::Value = serde_json::from_str(&s.info["config"]).unwrap();
    assert_eq!(cfg["runtimes"]["vmpod"]["vcpus"], 3);
    assert_eq!(cfg["runtimes"]["fast"]["hypervisor"], "qemu");
    assert_eq!(cfg["runtimes"]["fast"]["memory_mib"], 512);
    assert_eq!(cfg["default_runtime"], "vmpod");
    let cni: serde_json::Value = serde_json::from_str(&s.info["cni"]).unwrap();
    assert_eq!(cni["ready"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_ready_with_a_real_cni_config_and_plugins() {
    let bin = Path::new("/usr/lib/cni");
    if !bin.join("bridge").exists() || !bin.join("host-local").exists() {
        eprintln!("skipping: CNI plugins not in /usr/lib/cni (Debian containernetworking-plugins; scripts/install-deps.sh)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let net_d = tmp.path().join("net.d");
    std::fs::create_dir_all(&net_d).unwrap();
    std::fs::write(
        net_d.join("10-vmpod.conflist"),
        r#"{"cniVersion":"1.0.0","name":"vmpod-test","plugins":[
            {"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":true,
             "ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]]}},
            {"type":"portmap","capabilities":{"portMappings":true}}]}"#,
    )
    .unwrap();
    let config = format!(
        "[cni]\nconf_dir = \"{}\"\nbin_dirs = [\"{}\"]\n",
        net_d.display(),
        bin.display()
    );
    let d = Daemon::start(&config).unwrap();
    let mut c = d.client().await.unwrap();
    let s = c
        .runtime
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let net = condition(&s, "NetworkReady");
    assert!(net.status, "{net:?}");
    let cni: serde_json::Value = serde_json::from_str(&s.info["cni"]).unwrap();
    assert_eq!(cni["network"], "vmpod-test");
    assert_eq!(cni["plugins"], serde_json::json!(["bridge", "portmap"]));

    // A plugin the bin dirs do not have: not ready, and the message says which.
    std::fs::write(
        net_d.join("05-broken.conflist"),
        r#"{"cniVersion":"1.0.0","name":"broken","plugins":[{"type":"no-such-plugin"}]}"#,
    )
    .unwrap();
    let s = c
        .runtime
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let net = condition(&s, "NetworkReady");
    assert!(!net.status);
    assert!(net.message.contains("no-such-plugin"), "{}", net.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_config_reports_the_configured_cgroup_driver() {
    for (config, want) in [
        ("", cri::CgroupDriver::Cgroupfs),
        ("cgroup_driver = \"systemd\"\n", cri::CgroupDriver::Systemd),
    ] {
        let d = Daemon::start(config).unwrap();
        let mut c = d.client().await.unwrap();
        let r = c
            .runtime
            .runtime_config(cri::RuntimeConfigRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.linux.unwrap().cgroup_driver, want as i32, "{config:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbuilt_rpcs_answer_unimplemented_naming_themselves() {
    let d = Daemon::start("").unwrap();
    let mut c: CriClient = d.client().await.unwrap();
    // RPC name, client method, request type.
    macro_rules! expect_unimplemented {
        ($($name:literal => $method:ident($req:ty)),+ $(,)?) => {$(
            let e = c.runtime.$method(<$req>::default()).await.map(|_| ()).expect_err($name);
            assert_eq!(e.code(), Code::Unimplemented, "{}: {e:?}", $name);
            assert!(e.message().contains($name), "{}: {}", $name, e.message());
        )+};
    }
    expect_unimplemented!(
        "RunPodSandbox" => run_pod_sandbox(cri::RunPodSandboxRequest),
        "ListPodSandbox" => list_pod_sandbox(cri::ListPodSandboxRequest),
        "ListContainers" => list_containers(cri::ListContainersRequest),
        "ExecSync" => exec_sync(cri::ExecSyncRequest),
        "UpdateRuntimeConfig" => update_runtime_config(cri::UpdateRuntimeConfigRequest),
        "GetContainerEvents" => get_container_events(cri::GetEventsRequest),
    );
    // Still serving.
    c.runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap();
}

#[test]
fn unknown_config_key_stops_the_daemon_naming_key_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = serve_expect_exit(
        tmp.path(),
        "log_level = \"info\"\n[runtimes.vmpod]\nvcpus = 2\nhypervisr = \"qemu\"\n",
    )
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hypervisr"), "{err}");
    assert!(err.contains("line 4"), "{err}");
    assert!(
        err.contains(&tmp.path().join("config.toml").display().to_string()),
        "{err}"
    );
    assert!(
        !tmp.path().join("vmpod.sock").exists(),
        "no socket left behind"
    );

    // A bad value is named too.
    let out = serve_expect_exit(tmp.path(), "[runtimes.vmpod]\nvcpus = 0\n").unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("runtimes.vmpod.vcpus"), "{err}");
}

#[test]
fn explicit_missing_config_file_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = serve_command(tmp.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.toml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_0660_and_removed_on_sigterm() {
    let mut d = Daemon::start("").unwrap();
    let md = std::fs::metadata(d.socket()).unwrap();
    assert!(md.file_type().is_socket());
    assert_eq!(md.permissions().mode() & 0o777, 0o660);
    // A connected client (as kubelet keeps one) does not hold up shutdown.
    let mut c = d.client().await.unwrap();
    c.runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap();
    let st = d.stop().unwrap();
    assert!(st.success(), "exit status {st}: {}", d.log());
    assert!(!d.socket().exists(), "socket removed on shutdown");
    assert!(d.log().contains("SIGTERM"), "{}", d.log());
    assert!(
        !d.log().contains("stopping anyway"),
        "an idle client connection must not stall the drain: {}",
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_daemon_is_not_displaced_but_a_stale_socket_is_replaced() {
    let mut first = Daemon::start("").unwrap();
    // Second daemon, same socket, own state dir: refused with a clear error.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("config.toml"), "").unwrap();
    let other_config = other.path().join("config.toml");
    let out = serve_command_with(&first.socket(), &other.path().join("state"), &other_config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another vmpod daemon is listening"), "{err}");
    // The first one still answers.
    let mut c = first.client().await.unwrap();
    c.runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap();

    // Same state dir, other socket: refused (the state is locked).
    let out = serve_command_with(
        &other.path().join("x.sock"),
        &first.state_dir(),
        &other_config,
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by another vmpod daemon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Kill -9 leaves a stale socket behind; the next start replaces it.
    let pid = first.pid().unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let _ = first.stop(); // reaps it
    assert!(first.socket().exists(), "SIGKILL leaves the socket file");
    let dir = first.dir().to_path_buf();
    let second = Daemon::start_in(&dir, "").unwrap();
    assert!(
        second.log().contains("removing stale socket"),
        "{}",
        second.log()
    );
    let mut c = second.client().await.unwrap();
    c.runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap();
}

/// grpc-go clients dialling a unix socket with the passthrough resolver
/// (crictl ≤ 1.26, kubelet ≤ 1.26) send the socket path as `:authority`.
/// Speak raw HTTP/2 like they do: two Version calls on one connection, the
/// second referring to the HPACK dynamic table entry holding the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_go_style_socket_path_authority_is_accepted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let l = (payload.len() as u32).to_be_bytes();
        let mut f = vec![l[1], l[2], l[3], kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    let d = Daemon::start("").unwrap();
    let path = d.socket().display().to_string();
    let mut sock = tokio::net::UnixStream::connect(d.socket()).await.unwrap();
    let mut enc = loona_hpack::Encoder::new();
    let mut out = PREFACE.to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    for stream in [1u32, 3] {
        let headers: [(&[u8], &[u8]); 6] = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/runtime.v1.RuntimeService/Version"),
            (b":authority", path.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ];
        let block = enc.encode(headers);
        out.extend(frame(0x1, 0x4, stream, &block)); // HEADERS, END_HEADERS
        out.extend(frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0])); // empty VersionRequest, END_STREAM
    }
    sock.write_all(&out).await.unwrap();

    let mut dec = loona_hpack::Decoder::new();
    let mut data = Vec::new();
    let mut statuses = Vec::new();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while statuses.len() < 2 {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, sock.read(&mut chunk))
            .await
            .expect("daemon answered in time")
            .unwrap();
        assert!(n > 0, "connection closed; got {statuses:?}");
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match kind {
                0x3 => panic!("RST_STREAM {payload:?}: :authority rejected"),
                0x7 => panic!("GOAWAY {payload:?}"),
                0x4 if flags & 0x1 == 0 => {
                    sock.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(); // SETTINGS ACK
                }
                0x0 => data.extend_from_slice(&payload),
                0x1 => {
                    for (n, v) in dec.decode(&payload).unwrap() {
                        if n == b"grpc-status" {
                            statuses.push(String::from_utf8(v).unwrap());
                        }
                    }
                }
                _ => {}
            }
        }
    }
    assert_eq!(statuses, ["0", "0"]);
    let text = String::from_utf8_lossy(&data);
    assert_eq!(text.matches("vmpod").count(), 2, "{text:?}");
}
