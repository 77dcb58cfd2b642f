//! Teardown and leaks, each test in a VM of its own:
//! - DestroySandbox removes every container (so it cannot share the
//!   agent_e2e VM): sandbox mounts and containers (running and merely
//!   created) are gone afterwards, the agent still answers, and the VM then
//!   stops cleanly;
//! - finished execs and removed containers give back what the agent held
//!   for them (threads, pipes, ptys): counted exactly in the agent's
//!   /proc, which needs a VM where nothing else runs.

use std::time::{Duration, Instant};

use serde_json::json;
use vmpod_runtime::agent_client::agent::{CreateSandboxRequest, Mount};
use vmpod_runtime::agent_client::{AgentClient, Code, ExecSpec, OutputStream};
use vmpod_tests::agent_vm;

#[test]
fn destroy_sandbox_removes_everything() {
    let mut vm = agent_vm::boot("agent-destroy")
        .unwrap_or_else(|e| panic!("booting the agent VM failed: {e}"));
    let c = vm.client.clone();
    let handle = vm.vm.take().expect("vm handle");
    let reason = vm.rt.block_on(async {
        let before = c.guest_details().await.unwrap();
        c.create_sandbox(CreateSandboxRequest {
            sandbox_id: "pod-destroy".into(),
            hostname: "destroy-me".into(),
            mounts: vec![Mount {
                source: "tmpfs".into(),
                target: "/run/sandbox-shared".into(),
                fstype: "tmpfs".into(),
                options: vec!["size=1m".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
        let spec = serde_json::to_vec(&agent_vm::busybox_spec(&[
            "sh",
            "-c",
            "echo up; sleep 1000",
        ]))
        .unwrap();
        c.create_container("running", spec.clone(), "", None, false)
            .await
            .unwrap();
        c.start_container("running").await.unwrap();
        let (up, _) = c
            .read_chunk("running", "", OutputStream::Stdout, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(up, b"up\n");
        c.create_container("created-only", spec, "", None, false)
            .await
            .unwrap();
        let during = c.guest_details().await.unwrap();
        assert_eq!(
            during.container_ids,
            vec!["created-only".to_string(), "running".to_string()]
        );
        assert!(during
            .mount_points
            .contains(&"/run/sandbox-shared".to_string()));
        assert_eq!(during.cgroups.len(), 2, "{:?}", during.cgroups);

        c.destroy_sandbox().await.unwrap();

        let after = c.guest_details().await.unwrap();
        assert!(after.container_ids.is_empty(), "{:?}", after.container_ids);
        assert!(after.cgroups.is_empty(), "{:?}", after.cgroups);
        let (mut a, mut b) = (after.mount_points.clone(), before.mount_points.clone());
        a.sort();
        b.sort();
        assert_eq!(a, b, "guest mounts after destroy");
        assert_eq!(
            after.process_count, before.process_count,
            "no container process left"
        );
        c.check().await.unwrap();

        handle.stop().await.unwrap()
    });
    assert!(reason.is_clean(), "{reason:?}");
}

/// What the agent (guest PID 1) holds: its threads' names and the targets
/// of its open fds, read by a container in the VM's PID namespace with
/// CAP_SYS_PTRACE (needed for another process's /proc/PID/fd).
struct AgentView {
    threads: Vec<String>,
    fds: Vec<String>,
}

async fn agent_view(c: &AgentClient) -> AgentView {
    let mut s = agent_vm::busybox_spec(&[
        "sh",
        "-c",
        "cat /proc/1/task/*/comm; echo ---; ls -l /proc/1/fd",
    ]);
    s["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]);
    for set in ["bounding", "effective", "permitted"] {
        s["process"]["capabilities"][set]
            .as_array_mut()
            .unwrap()
            .push(json!("CAP_SYS_PTRACE"));
    }
    let id = "probe";
    c.create_container(id, serde_json::to_vec(&s).unwrap(), "", None, false)
        .await
        .unwrap();
    c.start_container(id).await.unwrap();
    let out = c.read_to_end(id, "", OutputStream::Stdout).await.unwrap();
    let err = c.read_to_end(id, "", OutputStream::Stderr).await.unwrap();
    assert_eq!(
        c.wait(id, "").await.unwrap().exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&err)
    );
    c.remove_container(id).await.unwrap();
    let out = String::from_utf8(out).unwrap();
    let (threads, fds) = out.split_once("---\n").expect("probe output");
    AgentView {
        threads: threads.lines().map(str::to_string).collect(),
        fds: fds
            .lines()
            .filter_map(|l| l.split_once(" -> ").map(|(_, t)| t.to_string()))
            .collect(),
    }
}

/// A shell loop writing 64 KiB chunks to stdout, counting finished ones
/// in `/dev/shm/<name>` (the guest kernel has no per-task I/O accounting).
fn flood(name: &str) -> String {
    format!("i=0; while :; do head -c 65536 /dev/zero; i=$((i+1)); echo $i > /dev/shm/{name}; done")
}

/// Chunks the floods of container `id` finished, seen from an exec (same
/// mount namespace, so the same /dev/shm).
async fn chunks_written(c: &AgentClient, id: &str) -> String {
    agent_vm::exec_stdout(c, id, &["sh", "-c", "cat /dev/shm/*; true"]).await
}

#[test]
fn finished_processes_release_agent_resources() {
    let vm = agent_vm::boot("agent-leaks")
        .unwrap_or_else(|e| panic!("booting the agent VM failed: {e}"));
    let c = vm.client.clone();
    vm.rt.block_on(async {
        let spec = |args: &[&str]| serde_json::to_vec(&agent_vm::busybox_spec(args)).unwrap();
        c.create_container("long", spec(&["sleep", "1000"]), "", None, false)
            .await
            .unwrap();
        c.start_container("long").await.unwrap();
        let before = agent_view(&c).await;

        // Finished execs (tty ones hold a pty master, stdin ones a pipe)
        // give everything back once waited for and read. Each lists its
        // own fds: the process gets stdio only (3 is ls's directory).
        for i in 0..12 {
            let script = format!("echo run {i}: $(ls /proc/self/fd | tr '\\n' ' ')");
            let e = ExecSpec {
                args: vec!["sh".into(), "-c".into(), script],
                terminal: i % 2 == 0,
                stdin: i % 2 == 1,
                ..Default::default()
            };
            let id = format!("e{i}");
            c.exec("long", &id, &e).await.unwrap();
            let out = c.read_to_end("long", &id, OutputStream::Stdout).await.unwrap();
            let out = String::from_utf8_lossy(&out);
            assert_eq!(out.trim_end(), format!("run {i}: 0 1 2 3"), "{out:?}");
            assert_eq!(c.wait("long", &id).await.unwrap().exit_code, 0);
        }
        let ptmx = |v: &AgentView| v.fds.iter().filter(|f| f.as_str() == "/dev/ptmx").count();
        // (retiring runs just after the wait returns: allow a moment)
        let t = Instant::now();
        loop {
            let after = agent_view(&c).await;
            if ptmx(&after) == ptmx(&before) && after.fds.len() == before.fds.len() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "after 12 finished execs the agent holds {} fds, {} pty masters (before: {}, {}): {:?}",
                after.fds.len(),
                ptmx(&after),
                before.fds.len(),
                ptmx(&before),
                after.fds
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        // A container removed with output nobody read: the init's and an
        // exec's reader threads sit on full buffers; remove must end them
        // and close their pipes.
        c.create_container("flood", spec(&["sh", "-c", &flood("init")]), "", None, false)
            .await
            .unwrap();
        c.start_container("flood").await.unwrap();
        let e = ExecSpec {
            args: vec!["sh".into(), "-c".into(), flood("exec")],
            ..Default::default()
        };
        let exec_pid = c.exec("flood", "fx", &e).await.unwrap();
        let init_pid = c.list_containers().await.unwrap().iter().find(|i| i.container_id == "flood").unwrap().pid;
        // Both writers blocked: 16+ chunks (1 MiB+) written and no more
        // coming. The reader threads only stop reading (parked on full
        // 1 MiB buffers) once the buffers are full.
        let t = Instant::now();
        let mut last = String::new();
        loop {
            let n = chunks_written(&c, "flood").await;
            let counts: Vec<u64> = n.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if n == last && counts.len() == 2 && counts.iter().all(|&n| n >= 16) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "writers never blocked: {n:?}");
            last = n;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let readers: Vec<String> = [init_pid, exec_pid]
            .iter()
            .flat_map(|p| [format!("out-{p}"), format!("err-{p}")])
            .collect();
        let during = agent_view(&c).await;
        assert!(during.threads.contains(&readers[0]), "{:?}", during.threads);
        c.remove_container("flood").await.unwrap();
        // Reader threads end just after remove returns: allow a moment.
        let t = Instant::now();
        let after = loop {
            let v = agent_view(&c).await;
            let left: Vec<&String> = readers.iter().filter(|r| v.threads.contains(r)).collect();
            if left.is_empty() && v.fds.len() == before.fds.len() {
                break v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "after remove the agent still has reader threads {left:?} and {} fds (before: {}): {:?}",
                v.fds.len(),
                before.fds.len(),
                v.fds
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        assert!(!after.fds.iter().any(|f| f == "/dev/ptmx"), "{:?}", after.fds);

        // A retired exec is gone (NotFound) and its id free again.
        let err = c.wait("long", "e0").await.unwrap_err();
        assert_eq!(err.code(), Some(Code::NOT_FOUND), "{err}");
        let e = ExecSpec {
            args: vec!["true".into()],
            ..Default::default()
        };
        let (_, _, st) = c.exec_sync("long", "e0", &e, Duration::from_secs(30)).await.unwrap();
        assert_eq!(st.exit_code, 0);
        c.remove_container("long").await.unwrap();
    });
}
