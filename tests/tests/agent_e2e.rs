//! End-to-end tests of the guest agent: one real microVM (the QEMU backend;
//! TCG on hosts whose KVM cannot run guest userspace) with the repo's guest
//! kernel and the test initramfs (`build/guest/initramfs-test.cpio.gz`,
//! which carries a busybox container rootfs at /containers/busybox), shared
//! by every test in this file; everything goes over vsock with the agent
//! client.
//!
//! Needs `make guest` (kernel, initramfs) and a built `vmpod` (its vsock back-end).

use std::time::{Duration, Instant};

use serde_json::json;
use vmpod_runtime::agent_client::{AgentClient, OutputStream};
use vmpod_tests::agent_vm::{self, BUSYBOX_ROOTFS as ROOTFS};
use vmpod_tests::agent_vm::{bytes, run};

struct Shared<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a AgentClient,
    shared: Option<&'a std::path::Path>,
}

fn fixture() -> Shared<'static> {
    let f = agent_vm::shared("agent-e2e");
    Shared {
        rt: &f.rt,
        client: &f.client,
        shared: f.shared.as_deref(),
    }
}

fn spec(args: &[&str]) -> serde_json::Value {
    agent_vm::busybox_spec(args)
}

#[test]
fn health_version_and_details() {
    let f = fixture();
    f.rt.block_on(async {
        f.client.check().await.unwrap();
        let v = f.client.version().await.unwrap();
        assert_eq!(v.protocol_version, vmpod_proto::PROTOCOL_VERSION);
        assert!(!v.agent_version.is_empty());
        let d = f.client.guest_details().await.unwrap();
        assert!(d.kernel_release.starts_with("6."), "{}", d.kernel_release);
        assert!(d.cpus >= 1);
        assert!(d.mem_total_bytes > 100 << 20, "{}", d.mem_total_bytes);
        assert!(
            d.mount_points.iter().any(|m| m == "/sys/fs/cgroup"),
            "{:?}",
            d.mount_points
        );
    });
}

#[test]
fn echo_output_and_exit_code() {
    let f = fixture();
    f.rt.block_on(async {
        let s = spec(&[
            "sh",
            "-c",
            "echo hello from the guest; echo oops >&2; exit 3",
        ]);
        let (out, err, st) = run(f.client, "echo", &s).await;
        assert_eq!(out, "hello from the guest\n");
        assert_eq!(err, "oops\n");
        assert_eq!((st.exit_code, st.signal, st.oom_killed), (3, 0, false));
        assert!(
            st.finished_at_unix_nanos >= st.started_at_unix_nanos && st.started_at_unix_nanos > 0
        );
    });
}

#[test]
fn default_open_file_limit_is_not_the_agents() {
    let f = fixture();
    f.rt.block_on(async {
        // The agent raises its own limit; a container without rlimits in
        // its spec gets 1024 soft / 524288 hard, not the agent's.
        let s = spec(&["sh", "-c", "ulimit -Sn; ulimit -Hn"]);
        let (out, err, st) = run(f.client, "nofile", &s).await;
        assert_eq!(st.exit_code, 0, "{err}");
        assert_eq!(out, "1024\n524288\n");
    });
}

#[test]
fn large_output_is_not_lost() {
    let f = fixture();
    f.rt.block_on(async {
        // 2 MiB through the 1 MiB agent buffer and 64 KiB chunks.
        let s = spec(&["sh", "-c", "head -c 2097152 /dev/zero | tr '\\0' x"]);
        let (out, _, st) = run(f.client, "bigout", &s).await;
        assert_eq!(st.exit_code, 0);
        assert_eq!(out.len(), 2 << 20);
        assert!(out.bytes().all(|b| b == b'x'));
    });
}

#[test]
fn memory_limit_oom_kill() {
    let f = fixture();
    f.rt.block_on(async {
        let mut s = spec(&["sh", "-c", "tail /dev/zero; echo survived"]);
        s["linux"]["resources"] = json!({"memory": {"limit": 32 << 20, "swap": 32 << 20}});
        let id = "oom";
        f.client
            .create_container(id, bytes(&s), "", None, false)
            .await
            .unwrap();
        let stats = f.client.stats(id).await.unwrap();
        assert_eq!(stats.memory.limit_bytes, 32 << 20, "memory.max written");
        f.client.start_container(id).await.unwrap();
        let st = f.client.wait(id, "").await.unwrap();
        let stats = f.client.stats(id).await.unwrap();
        assert!(st.oom_killed, "{st:?}");
        assert!(
            stats.memory.oom_kill_events >= 1,
            "memory.events oom_kill: {:?}",
            stats.memory
        );
        f.client.remove_container(id).await.unwrap();
    });
}

#[test]
fn pid_namespace_and_hostname() {
    let f = fixture();
    f.rt.block_on(async {
        let mut s = spec(&["sh", "-c", "echo $$; hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'"]);
        s["hostname"] = json!("ctr-host");
        let (out, err, st) = run(f.client, "pidns", &s).await;
        assert_eq!(st.exit_code, 0, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "1", "the container's process is PID 1: {out}");
        assert_eq!(lines[1], "ctr-host");
        assert!(lines[2].starts_with("sh -c echo"), "{out}");
        // only the shell and its children are visible
        let visible: u32 = lines[3].trim().parse().unwrap();
        assert!(visible <= 4, "container sees {visible} processes");
        // The guest's hostname is untouched: a container sharing the VM's
        // UTS namespace (none of its own) sees the guest's, not ctr-host.
        let mut s = spec(&["hostname"]);
        s["linux"]["namespaces"] = json!([{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}]);
        let (out, err, st) = run(f.client, "pidns-guest-uts", &s).await;
        assert_eq!(st.exit_code, 0, "{err}");
        assert!(!out.trim().is_empty(), "no guest hostname: {out:?}");
        assert_ne!(out.trim(), "ctr-host", "the container's hostname leaked into the guest");
    });
}

#[test]
fn remove_leaves_no_cgroup_or_mount() {
    let f = fixture();
    let c = &f.client;
    f.rt.block_on(async {
        let before = c.guest_details().await.unwrap();
        let id = "cleanup";
        let mut s = spec(&["sh", "-c", "mount -t tmpfs extra /tmp && sleep 1000"]);
        s["mounts"] = json!([{"destination": "/mnt/data", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}]);
        s["process"]["capabilities"]["bounding"].as_array_mut().unwrap().push(json!("CAP_SYS_ADMIN"));
        s["process"]["capabilities"]["effective"].as_array_mut().unwrap().push(json!("CAP_SYS_ADMIN"));
        s["process"]["capabilities"]["permitted"].as_array_mut().unwrap().push(json!("CAP_SYS_ADMIN"));
        c.create_container(id, bytes(&s), "", None, false).await.unwrap();
        c.start_container(id).await.unwrap();
        let during = c.guest_details().await.unwrap();
        assert!(during.cgroups.contains(&format!("vmpod/{id}")), "{:?}", during.cgroups);
        assert!(during.container_ids.contains(&id.to_string()));
        // the container's mounts are in its own namespace, never the guest's
        assert!(!during.mount_points.iter().any(|m| m.contains("/mnt/data") || m.starts_with(ROOTFS)), "{:?}", during.mount_points);
        c.remove_container(id).await.unwrap();
        let after = c.guest_details().await.unwrap();
        assert!(!after.cgroups.iter().any(|g| g == &format!("vmpod/{id}")), "{:?}", after.cgroups);
        assert!(!after.container_ids.contains(&id.to_string()));
        // (sandbox mounts other tests add meanwhile do not count)
        let norm = |v: &[String]| {
            let mut v: Vec<String> = v.iter().filter(|m| !m.starts_with("/run/vmpod/")).cloned().collect();
            v.sort();
            v
        };
        let (a, b) = (norm(&after.mount_points), norm(&before.mount_points));
        assert_eq!(a, b, "guest mount table changed");
        let err = c.wait(id, "").await.unwrap_err();
        assert_eq!(err.code(), Some(vmpod_runtime::agent_client::Code::NOT_FOUND), "{err}");
    });
}

#[test]
fn bad_specs_are_clear_errors_and_agent_keeps_serving() {
    let f = fixture();
    let c = &f.client;
    f.rt.block_on(async {
        use vmpod_runtime::agent_client::Code::{INVALID_ARGUMENT, NOT_FOUND};
        let mut s = spec(&["true"]);
        s["root"]["path"] = json!("/containers/does-not-exist");
        let e = c
            .create_container("bad1", bytes(&s), "", None, false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("does-not-exist"), "{e}");
        assert_eq!(e.code(), Some(INVALID_ARGUMENT));

        let t = Instant::now();
        let e = c
            .create_container(
                "bad2",
                bytes(&spec(&["true"])),
                "",
                Some("nosuchuser"),
                false,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("nosuchuser"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));

        let e = c
            .create_container(
                "bad3",
                bytes(&spec(&["/bin/missing-binary"])),
                "",
                None,
                false,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("missing-binary"), "{e}");

        let e = c
            .create_container("bad4", b"{not json".to_vec(), "", None, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(INVALID_ARGUMENT), "{e}");
        let e = c
            .create_container("../x", bytes(&spec(&["true"])), "", None, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(INVALID_ARGUMENT), "{e}");
        let e = c.start_container("never-created").await.unwrap_err();
        assert_eq!(e.code(), Some(NOT_FOUND), "{e}");

        // nothing left behind, and the agent still runs containers
        let d = c.guest_details().await.unwrap();
        for id in ["bad1", "bad2", "bad3", "bad4"] {
            assert!(
                !d.cgroups.contains(&format!("vmpod/{id}")),
                "{:?}",
                d.cgroups
            );
            assert!(!d.container_ids.contains(&id.to_string()));
        }
        c.check().await.unwrap();
        let (out, _, st) = run(c, "after-bad", &spec(&["echo", "still serving"])).await;
        assert_eq!((out.as_str(), st.exit_code), ("still serving\n", 0));
    });
}

#[test]
fn isolation_settings_applied() {
    let f = fixture();
    f.rt.block_on(async {
        // Identity and process settings, as a non-root user. /tmp is a
        // tmpfs the user can write (touch), so the failing mkdir can only
        // be seccomp's doing.
        let script = "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; id; pwd; ulimit -n; \
             touch /tmp/f && echo touch-ok; echo \"mkdir: $(mkdir /tmp/d 2>&1 && echo ok)\"; true";
        let mut s = spec(&["sh", "-c", script]);
        s["mounts"] = json!([{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1m"]}]);
        s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [100]});
        s["process"]["cwd"] = json!("/tmp");
        s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 200, "soft": 100}]);
        s["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
        let (out, err, st) = run(f.client, "isolated", &s).await;
        assert_eq!(st.exit_code, 0, "{out}\n{err}");
        let has = |needle: &str| out.lines().any(|l| l.replace('\t', " ").trim() == needle);
        // Bounding set = CAP_CHOWN(0) CAP_KILL(5) CAP_SETGID(6) CAP_SETUID(7)
        // = 0xe1; the non-root user has no effective capabilities.
        assert!(has("CapEff: 0000000000000000"), "{out}");
        assert!(has("CapBnd: 00000000000000e1"), "{out}");
        assert!(has("NoNewPrivs: 1"), "{out}");
        assert!(has("uid=1000(user) gid=1000(user) groups=100(users)"), "{out}");
        assert!(has("/tmp"), "cwd: {out}");
        assert!(has("100"), "RLIMIT_NOFILE soft: {out}");
        assert!(has("touch-ok"), "/tmp is writable for the user: {out}");
        assert!(
            has("mkdir: mkdir: can't create directory '/tmp/d': Operation not permitted"),
            "seccomp must deny mkdir: {out}"
        );
    });
}

/// Read-only rootfs, read-only paths and masked paths, each checked on
/// its own by root with CAP_DAC_OVERRIDE (so permissions cannot be why a
/// write fails), against a control container that runs the same script
/// without those settings.
#[test]
fn readonly_and_masked_paths_applied() {
    let f = fixture();
    f.rt.block_on(async {
        let script = "echo \"rootfs: $(touch /iso-probe 2>&1 && echo writable)\"; \
             echo \"sysctl: $( (echo iso > /proc/sys/kernel/domainname) 2>&1 && echo writable)\"; \
             echo \"masked-file: $(wc -c < /etc/hostname)\"; \
             echo \"masked-dir: $(ls /opt/bin | wc -l)\"; rm -f /iso-probe; true";
        let base = || {
            let mut s = spec(&["sh", "-c", script]);
            for set in ["bounding", "effective", "permitted"] {
                s["process"]["capabilities"][set]
                    .as_array_mut()
                    .unwrap()
                    .push(json!("CAP_DAC_OVERRIDE"));
            }
            // A directory with content (the rootfs's /bin, bound in), to mask.
            s["mounts"] = json!([{"destination": "/opt/bin", "type": "bind",
                "source": format!("{ROOTFS}/bin"), "options": ["rbind", "ro"]}]);
            s["linux"]["maskedPaths"] = json!([]);
            s["linux"]["readonlyPaths"] = json!([]);
            s
        };
        let line = |out: &str, key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}: ")))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {key:?} line in {out:?}"))
        };

        let (out, err, st) = run(f.client, "iso-control", &base()).await;
        assert_eq!(st.exit_code, 0, "{out}\n{err}");
        assert_eq!(line(&out, "rootfs"), "writable", "{out}");
        assert_eq!(line(&out, "sysctl"), "writable", "{out}");
        assert_eq!(
            line(&out, "masked-file"),
            "8",
            "/etc/hostname is busybox\\n: {out}"
        );
        let bins: u32 = line(&out, "masked-dir").parse().unwrap();
        assert!(bins > 10, "{out}");

        let mut s = base();
        s["root"]["readonly"] = json!(true);
        s["linux"]["readonlyPaths"] = json!(["/proc/sys"]);
        s["linux"]["maskedPaths"] = json!(["/etc/hostname", "/opt/bin", "/proc/kcore"]);
        let (out, err, st) = run(f.client, "iso-fs", &s).await;
        assert_eq!(st.exit_code, 0, "{out}\n{err}");
        assert_eq!(
            line(&out, "rootfs"),
            "touch: /iso-probe: Read-only file system",
            "{out}"
        );
        assert_eq!(
            line(&out, "sysctl"),
            "sh: can't create /proc/sys/kernel/domainname: Read-only file system",
            "{out}"
        );
        assert_eq!(line(&out, "masked-file"), "0", "{out}");
        assert_eq!(line(&out, "masked-dir"), "0", "{out}");
    });
}

#[test]
fn sandbox_setup() {
    let f = fixture();
    let c = &f.client;
    f.rt.block_on(async {
        use vmpod_runtime::agent_client::agent::{CreateSandboxRequest, Sysctl};
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        c.create_sandbox(CreateSandboxRequest {
            sandbox_id: "pod1".into(),
            hostname: "pod-one".into(),
            dns_servers: vec!["10.96.0.10".into()],
            dns_searches: vec!["default.svc.cluster.local".into()],
            sysctls: vec![Sysctl { key: "net.ipv4.ip_forward".into(), value: "1".into(), ..Default::default() }],
            host_time_unix_nanos: now.as_nanos() as i64,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut s = spec(&["sh", "-c", "hostname; cat /etc/resolv.conf; cat /proc/sys/net/ipv4/ip_forward; date +%s"]);
        s["mounts"] = json!([{"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf", "options": ["rbind", "ro"]}]);
        let (out, err, st) = run(c, "sbx", &s).await;
        assert_eq!(st.exit_code, 0, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "pod-one", "containers inherit the pod hostname: {out}");
        assert!(out.contains("nameserver 10.96.0.10") && out.contains("search default.svc.cluster.local"), "{out}");
        assert_eq!(lines[lines.len() - 2], "1", "{out}");
        let guest_now: i64 = lines[lines.len() - 1].parse().unwrap();
        assert!((guest_now - now.as_secs() as i64).abs() < 60, "guest clock {guest_now} vs host {}", now.as_secs());

        let e = c
            .create_sandbox(CreateSandboxRequest {
                sysctls: vec![Sysctl { key: "../../etc".into(), value: "x".into(), ..Default::default() }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(vmpod_runtime::agent_client::Code::INVALID_ARGUMENT), "{e}");
    });
}

#[test]
fn pod_shared_pid_and_ipc_namespaces() {
    let f = fixture();
    let c = f.client;
    f.rt.block_on(async {
        // The first container owns the namespaces; the second joins them by
        // path, as a pod's containers share the sandbox's.
        let owner = c
            .create_container(
                "ns-owner",
                bytes(&spec(&["sleep", "1000"])),
                "",
                None,
                false,
            )
            .await
            .unwrap();
        c.start_container("ns-owner").await.unwrap();
        let mut s = spec(&["sh", "-c", "ps -o pid,args; hostname"]);
        s["hostname"] = json!("joiner");
        s["linux"]["namespaces"] = json!([
            {"type": "pid", "path": format!("/proc/{owner}/ns/pid")},
            {"type": "ipc", "path": format!("/proc/{owner}/ns/ipc")},
            {"type": "uts"},
            {"type": "mount"}
        ]);
        let (out, err, st) = run(c, "ns-joiner", &s).await;
        assert_eq!(st.exit_code, 0, "{err}");
        assert!(
            out.lines().any(|l| l.trim() == "1 sleep 1000"),
            "joiner sees the owner's PID 1: {out}"
        );
        assert!(out.lines().any(|l| l.trim() == "joiner"), "{out}");
        c.remove_container("ns-owner").await.unwrap();

        let mut s = spec(&["true"]);
        s["linux"]["namespaces"] =
            json!([{"type": "pid", "path": "/proc/999999/ns/pid"}, {"type": "mount"}]);
        let e = c
            .create_container("ns-bad", bytes(&s), "", None, false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/proc/999999/ns/pid"), "{e}");
    });
}

#[test]
fn rootfs_shared_from_the_host_over_virtiofs() {
    let f = fixture();
    let c = f.client;
    let shared = f
        .shared
        .expect("virtiofsd not installed: run `make tools` (scripts/install-tools.sh)");
    // A busybox rootfs prepared on the host, seen by the guest live.
    let root = shared.join("rootfs-a");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for app in ["sh", "cat", "echo"] {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(app));
    }
    std::fs::write(root.join("etc/motd"), "written on the host\n").unwrap();
    f.rt.block_on(async {
        use vmpod_runtime::agent_client::agent::{CreateSandboxRequest, Mount};
        c.create_sandbox(CreateSandboxRequest {
            sandbox_id: "pod-fs".into(),
            mounts: vec![Mount {
                source: agent_vm::SHARED_TAG.into(),
                target: "/run/vmpod/shared".into(),
                fstype: "virtiofs".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
        let s = spec(&["sh", "-c", "cat /etc/motd; echo from-guest > /out.txt"]);
        c.create_container("vfs", bytes(&s), "/run/vmpod/shared/rootfs-a", None, false)
            .await
            .unwrap();
        c.start_container("vfs").await.unwrap();
        let out = c
            .read_to_end("vfs", "", OutputStream::Stdout)
            .await
            .unwrap();
        let st = c.wait("vfs", "").await.unwrap();
        c.remove_container("vfs").await.unwrap();
        assert_eq!(
            (String::from_utf8_lossy(&out).as_ref(), st.exit_code),
            ("written on the host\n", 0)
        );
    });
    assert_eq!(
        std::fs::read_to_string(root.join("out.txt")).unwrap(),
        "from-guest\n"
    );
}

#[test]
fn bad_resource_value_fails_create_and_leaves_no_cgroup() {
    let f = fixture();
    let c = f.client;
    f.rt.block_on(async {
        // The kernel refuses these at write time (no such file; a CPU the
        // 1-vCPU guest lacks): the leaf made just before must go again.
        let cases = [
            (
                "badres1",
                json!({"unified": {"memory.bogus": "1"}}),
                "memory.bogus",
            ),
            ("badres2", json!({"cpu": {"cpus": "7"}}), "cpuset.cpus"),
        ];
        for (id, res, file) in cases {
            let mut s = spec(&["true"]);
            s["linux"]["resources"] = res;
            let e = c
                .create_container(id, bytes(&s), "", None, false)
                .await
                .unwrap_err();
            assert_eq!(
                e.code(),
                Some(vmpod_runtime::agent_client::Code::INVALID_ARGUMENT),
                "{e}"
            );
            assert!(e.to_string().contains(file), "{e}");
            let d = c.guest_details().await.unwrap();
            assert!(
                !d.cgroups.contains(&format!("vmpod/{id}")),
                "{id}: {:?}",
                d.cgroups
            );
            assert!(!d.container_ids.contains(&id.to_string()));
        }
        // the id is free again
        let (out, _, st) = run(c, "badres1", &spec(&["echo", "ok"])).await;
        assert_eq!((out.as_str(), st.exit_code), ("ok\n", 0));
    });
}

#[test]
fn create_cut_short_by_its_deadline_leaves_a_removable_container() {
    let f = fixture();
    let c = f.client;
    f.rt.block_on(async {
        use vmpod_runtime::agent_client::Code;
        let id = "short-deadline";
        // The agent drops the handler after 5 ms, long before a create
        // (clone, stage 2, rootfs) is done under TCG.
        let r = c
            .with_timeout(Duration::from_millis(5))
            .create_container(id, bytes(&spec(&["sleep", "1000"])), "", None, false)
            .await;
        eprintln!("create with a 5 ms deadline: {r:?}");
        // The create finishes anyway: the container shows up as created,
        // never stuck half-made (id reserved: remove refused, create
        // AlreadyExists, cgroup leaked).
        let t = Instant::now();
        loop {
            let list = c.list_containers().await.unwrap();
            if list
                .iter()
                .any(|i| i.container_id == id && i.status == "created")
            {
                break;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let r = c.remove_container(id).await;
                panic!("container never appeared; remove says {r:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        c.remove_container(id).await.unwrap();
        let d = c.guest_details().await.unwrap();
        assert!(
            !d.cgroups.contains(&format!("vmpod/{id}")),
            "{:?}",
            d.cgroups
        );
        let e = c.wait(id, "").await.unwrap_err();
        assert_eq!(e.code(), Some(Code::NOT_FOUND), "{e}");
        let (out, _, st) = run(c, id, &spec(&["echo", "again"])).await;
        assert_eq!((out.as_str(), st.exit_code), ("again\n", 0));
    });
}
