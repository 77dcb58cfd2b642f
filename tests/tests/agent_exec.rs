//! End-to-end tests of processes inside containers through the guest
//! agent: exec (env, cwd, user, tty, stdin), signals, waits, ExecSync, large
//! output, resize, update and stats. One real microVM (QEMU backend, TCG
//! where KVM cannot run guest userspace) shared by the tests in this file;
//! the container basics are in agent_e2e.rs.
//!
//! Needs `make guest` (kernel, initramfs) and a built `vmpod`.

use std::time::{Duration, Instant};

use vmpod_runtime::agent_client::{AgentClient, ExecSpec, OutputStream};
use vmpod_tests::agent_vm::{self, bytes};

struct Shared<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a AgentClient,
    /// The VM's hybrid-vsock socket (for raw ttrpc clients).
    uds: &'a std::path::Path,
}

fn fixture() -> Shared<'static> {
    let f = agent_vm::shared("agent-exec");
    Shared {
        rt: &f.rt,
        client: &f.client,
        uds: f.vm.as_ref().expect("VM running").vsock_uds(),
    }
}

fn spec(args: &[&str]) -> serde_json::Value {
    agent_vm::busybox_spec(args)
}

#[test]
fn exec_signal_and_wait() {
    let f = fixture();
    let c = &f.client;
    f.rt.block_on(async {
        let id = "longrun";
        let s = spec(&[
            "sh",
            "-c",
            "trap 'echo got-term; exit 42' TERM; echo ready; while true; do sleep 0.2; done",
        ]);
        c.create_container(id, bytes(&s), "", None, false)
            .await
            .unwrap();
        c.start_container(id).await.unwrap();
        let (first, _) = c
            .read_chunk(id, "", OutputStream::Stdout, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&first), "ready\n");

        // exec: output, exit code, same namespaces as the container.
        let e = ExecSpec {
            args: vec![
                "sh".into(),
                "-c".into(),
                "echo in-exec $(cat /proc/1/cmdline | tr '\\0' ' '); exit 4".into(),
            ],
            ..Default::default()
        };
        c.exec(id, "e1", &e).await.unwrap();
        let out = c.read_to_end(id, "e1", OutputStream::Stdout).await.unwrap();
        let st = c.wait(id, "e1").await.unwrap();
        assert_eq!(st.exit_code, 4);
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with("in-exec sh -c trap"),
            "exec sees the container's PID 1: {out}"
        );

        // exec_sync (CRI ExecSync): output and exit; a timeout kills it.
        let e = ExecSpec {
            args: vec![
                "sh".into(),
                "-c".into(),
                "echo out; echo err >&2; exit 5".into(),
            ],
            ..Default::default()
        };
        let (o, er, st) = c
            .exec_sync(id, "sync1", &e, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            (o.as_slice(), er.as_slice(), st.exit_code),
            (&b"out\n"[..], &b"err\n"[..], 5)
        );
        let e = ExecSpec {
            args: vec!["sleep".into(), "100".into()],
            ..Default::default()
        };
        let err = c
            .exec_sync(id, "sync2", &e, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                vmpod_runtime::agent_client::AgentClientError::Timeout { .. }
            ),
            "{err}"
        );
        // exec_sync killed and reaped it: no `sleep 100` left, and the
        // agent has retired the exec (or still reports its SIGKILL).
        let ps = ExecSpec {
            args: vec!["ps".into(), "-o".into(), "args".into()],
            ..Default::default()
        };
        let (out, _, _) = c
            .exec_sync(id, "ps1", &ps, Duration::from_secs(30))
            .await
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(
            !out.contains("sleep 100"),
            "timed-out exec is killed: {out}"
        );
        match c.wait(id, "sync2").await {
            Ok(st) => assert_eq!(st.signal, 9, "timed-out exec is killed"),
            Err(e) => assert!(e.to_string().contains("not found"), "{e}"),
        }

        // exec as another user from the container's /etc/passwd.
        let e = ExecSpec {
            args: vec!["id".into()],
            username: Some("user".into()),
            ..Default::default()
        };
        c.exec(id, "e2", &e).await.unwrap();
        let out = c.read_to_end(id, "e2", OutputStream::Stdout).await.unwrap();
        assert!(
            String::from_utf8_lossy(&out).starts_with("uid=1000(user) gid=1000(user)"),
            "{}",
            String::from_utf8_lossy(&out)
        );

        // a failing exec is a clear error, quickly.
        let t = Instant::now();
        let e = ExecSpec {
            args: vec!["/bin/no-such-binary".into()],
            ..Default::default()
        };
        let err = c.exec(id, "e3", &e).await.unwrap_err().to_string();
        assert!(
            err.contains("no-such-binary") && err.contains("not found"),
            "{err}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        let e = ExecSpec {
            args: vec!["true".into()],
            username: Some("ghost".into()),
            ..Default::default()
        };
        let err = c.exec(id, "e4", &e).await.unwrap_err().to_string();
        assert!(err.contains("ghost"), "{err}");

        // Two concurrent execs with one id: exactly one runs, the other is
        // AlreadyExists (both used to pass the id check during the launch).
        let e = ExecSpec {
            args: vec!["sh".into(), "-c".into(), "echo dup".into()],
            ..Default::default()
        };
        let (a, b) = tokio::join!(c.exec(id, "dup", &e), c.exec(id, "dup", &e));
        let errs: Vec<String> = [&a, &b]
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
            .collect();
        assert_eq!(errs.len(), 1, "one of two same-id execs fails: {a:?} {b:?}");
        assert!(errs[0].contains("already exists"), "{}", errs[0]);
        let out = c
            .read_to_end(id, "dup", OutputStream::Stdout)
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out), "dup\n");
        assert_eq!(c.wait(id, "dup").await.unwrap().exit_code, 0);

        // Output beyond the caller's limit is an error, not host memory.
        let e = ExecSpec {
            args: vec![
                "head".into(),
                "-c".into(),
                "200000".into(),
                "/dev/zero".into(),
            ],
            ..Default::default()
        };
        c.exec(id, "big", &e).await.unwrap();
        let err = c
            .read_to_end_max(id, "big", OutputStream::Stdout, 1000)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                vmpod_runtime::agent_client::AgentClientError::OutputTooLarge { limit: 1000, .. }
            ),
            "{err}"
        );
        let rest = c
            .read_to_end(id, "big", OutputStream::Stdout)
            .await
            .unwrap();
        assert!(
            rest.len() < 200000,
            "the first chunk was consumed by the failed read"
        );
        assert_eq!(c.wait(id, "big").await.unwrap().exit_code, 0);

        // SIGTERM reaches the trap; wait reports the exit.
        c.signal(id, "", 15, false).await.unwrap();
        let st = c.wait(id, "").await.unwrap();
        assert_eq!((st.exit_code, st.signal), (42, 0));
        let rest = c.read_to_end(id, "", OutputStream::Stdout).await.unwrap();
        assert!(String::from_utf8_lossy(&rest).contains("got-term"));
        c.remove_container(id).await.unwrap();

        // SIGKILL: reported as a signal.
        let id = "killme";
        c.create_container(id, bytes(&spec(&["sleep", "1000"])), "", None, false)
            .await
            .unwrap();
        c.start_container(id).await.unwrap();
        c.signal(id, "", 9, false).await.unwrap();
        let st = c.wait(id, "").await.unwrap();
        assert_eq!((st.exit_code, st.signal), (137, 9));
        c.remove_container(id).await.unwrap();
    });
}

#[test]
fn stdin_tty_update_and_stats() {
    let f = fixture();
    let c = &f.client;
    f.rt.block_on(async {
        // stdin: cat echoes what we send, and exits on close.
        let id = "stdin";
        c.create_container(id, bytes(&spec(&["cat"])), "", None, true)
            .await
            .unwrap();
        c.start_container(id).await.unwrap();
        c.write_stdin(id, "", b"line one\nline two\n")
            .await
            .unwrap();
        c.close_stdin(id, "").await.unwrap();
        let out = c.read_to_end(id, "", OutputStream::Stdout).await.unwrap();
        assert_eq!(out, b"line one\nline two\n");
        assert_eq!(c.wait(id, "").await.unwrap().exit_code, 0);
        c.remove_container(id).await.unwrap();

        // tty exec, resources update, stats.
        let id = "ttyc";
        c.create_container(id, bytes(&spec(&["sleep", "1000"])), "", None, false)
            .await
            .unwrap();
        c.start_container(id).await.unwrap();
        let e = ExecSpec {
            args: vec![
                "sh".into(),
                "-c".into(),
                "test -t 0 && test -t 1 && echo is-a-tty".into(),
            ],
            terminal: true,
            ..Default::default()
        };
        c.exec(id, "t1", &e).await.unwrap();
        let out = c.read_to_end(id, "t1", OutputStream::Stdout).await.unwrap();
        assert!(
            String::from_utf8_lossy(&out).contains("is-a-tty"),
            "{out:?}"
        );
        assert_eq!(c.wait(id, "t1").await.unwrap().exit_code, 0);

        // resize reaches the process's terminal; sizes over u16 are refused.
        let e = ExecSpec {
            args: vec!["sh".into(), "-c".into(), "read x; stty size".into()],
            terminal: true,
            ..Default::default()
        };
        c.exec(id, "t2", &e).await.unwrap();
        c.resize_tty(id, "t2", 40, 120).await.unwrap();
        let err = c.resize_tty(id, "t2", 70_000, 80).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(vmpod_runtime::agent_client::Code::INVALID_ARGUMENT),
            "{err}"
        );
        c.write_stdin(id, "t2", b"\n").await.unwrap();
        let out = c.read_to_end(id, "t2", OutputStream::Stdout).await.unwrap();
        assert!(String::from_utf8_lossy(&out).contains("40 120"), "{out:?}");
        assert_eq!(c.wait(id, "t2").await.unwrap().exit_code, 0);

        // OCI linux.resources, as in a spec: the same translation as create.
        let res: vmpod_runtime::agent_client::agent::LinuxResources =
            serde_json::from_value(serde_json::json!({
                "memory": {"limit": 64 << 20},
                "pids": {"limit": 20},
                "cpu": {"quota": 50_000, "period": 100_000}
            }))
            .unwrap();
        c.update_container(id, res).await.unwrap();
        let s = c.stats(id).await.unwrap();
        assert_eq!(s.memory.limit_bytes, 64 << 20);
        assert_eq!(s.pids.limit, 20);
        assert!(s.pids.current >= 1);
        assert!(s.memory.current_bytes > 0);
        assert!(s.cpu.usage_usec > 0);
        let list = c.list_containers().await.unwrap();
        assert!(list
            .iter()
            .any(|ci| ci.container_id == id && ci.status == "running"));
        c.remove_container(id).await.unwrap();
    });
}

#[test]
fn stdin_never_read_does_not_block_the_agent() {
    use vmpod_proto::agent::{CloseStdinRequest, WriteStdinRequest};
    use vmpod_proto::ttrpc::context;
    use vmpod_runtime::agent_client::Code;
    let f = fixture();
    let c = f.client;
    f.rt.block_on(async {
        let raw = agent_vm::raw_agent(f.uds).await;
        // Reads nothing for 6 s, then counts what stdin holds until EOF.
        let id = "stdin-unread";
        let s = spec(&["sh", "-c", "sleep 6; wc -c"]);
        c.create_container(id, bytes(&s), "", None, true)
            .await
            .unwrap();
        c.start_container(id).await.unwrap();
        let write = |timeout: Duration, len: usize| {
            let raw = raw.clone();
            async move {
                let req = WriteStdinRequest {
                    container_id: id.into(),
                    data: vec![b'x'; len],
                    ..Default::default()
                };
                raw.write_stdin(context::with_duration(timeout), &req).await
            }
        };
        // More than the pipe holds: a partial count well within the
        // caller's 2 s deadline, not a write stuck until the process reads.
        let t = Instant::now();
        let first = write(Duration::from_secs(2), 256 << 10)
            .await
            .unwrap()
            .written as usize;
        assert!(
            first > 0 && first < 256 << 10,
            "partial write expected: {first}"
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // The pipe is full: a write with a long deadline is now stuck ...
        let stuck = tokio::spawn(write(Duration::from_secs(20), 4096));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!stuck.is_finished(), "write on a full pipe returned early");
        // ... and close does not wait behind it, and cancels it.
        let t = Instant::now();
        let req = CloseStdinRequest {
            container_id: id.into(),
            ..Default::default()
        };
        raw.close_stdin(context::with_duration(Duration::from_secs(5)), &req)
            .await
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "close took {:?}",
            t.elapsed()
        );
        let r = tokio::time::timeout(Duration::from_secs(5), stuck)
            .await
            .expect("stuck write not cancelled by close")
            .unwrap();
        match r {
            Err(vmpod_proto::ttrpc::Error::RpcStatus(st)) => {
                assert_eq!(st.code(), Code::FAILED_PRECONDITION, "{st:?}")
            }
            other => panic!("cancelled write: {other:?}"),
        }
        // The agent keeps serving meanwhile.
        c.check().await.unwrap();
        let (out, _, st) = agent_vm::run(c, "after-stdin", &spec(&["echo", "ok"])).await;
        assert_eq!((out.as_str(), st.exit_code), ("ok\n", 0));
        // The process gets exactly what was reported written, then EOF.
        let out = c.read_to_end(id, "", OutputStream::Stdout).await.unwrap();
        assert_eq!(String::from_utf8_lossy(&out).trim(), first.to_string());
        assert_eq!(c.wait(id, "").await.unwrap().exit_code, 0);
        c.remove_container(id).await.unwrap();
    });
}

#[test]
fn client_stdin_write_resends_what_a_slow_reader_left() {
    let f = fixture();
    f.rt.block_on(async {
        // Reads about 100 KB, then nothing for 5 s: the call in flight
        // then (4 s, so the agent gives up after 3.5 s) gets a partial
        // count, and the client must send the rest of that chunk again.
        let c = f.client.with_timeout(Duration::from_secs(4));
        let id = "stdin-slow";
        let s = spec(&[
            "sh",
            "-c",
            "(dd bs=1000 count=100 2>/dev/null; sleep 5; cat) | wc -c",
        ]);
        c.create_container(id, bytes(&s), "", None, true)
            .await
            .unwrap();
        c.start_container(id).await.unwrap();
        let data = vec![b'y'; 512 << 10];
        c.write_stdin(id, "", &data).await.unwrap();
        c.close_stdin(id, "").await.unwrap();
        let out = f
            .client
            .read_to_end(id, "", OutputStream::Stdout)
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out).trim(),
            (512 << 10).to_string()
        );
        assert_eq!(f.client.wait(id, "").await.unwrap().exit_code, 0);
        f.client.remove_container(id).await.unwrap();
    });
}

#[test]
fn update_applies_cpuset_and_unified_and_leaves_the_rest() {
    let f = fixture();
    let c = &f.client;
    f.rt.block_on(async {
        // The container sees the cgroup tree (cgroup2 mounted, no cgroup
        // namespace) to show its own files.
        let id = "upd";
        let mut s = spec(&["sleep", "1000"]);
        s["mounts"] = serde_json::json!([{"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup"}]);
        s["linux"]["resources"] = serde_json::json!({"memory": {"limit": 64 << 20}});
        c.create_container(id, bytes(&s), "", None, false)
            .await
            .unwrap();
        c.start_container(id).await.unwrap();
        let show = ExecSpec {
            args: vec![
                "sh".into(),
                "-c".into(),
                format!("cd /sys/fs/cgroup/vmpod/{id} && echo $(cat cpuset.cpus) / $(cat memory.high) / $(cat memory.max) / $(cat pids.max)"),
            ],
            ..Default::default()
        };
        let (out, err, _) = c
            .exec_sync(id, "show1", &show, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out).trim(),
            "/ max / 67108864 / max",
            "{}",
            String::from_utf8_lossy(&err)
        );
        // cpuset and unified were not expressible before; memory is
        // omitted and must stay as it is.
        let res = serde_json::from_value(serde_json::json!({
            "cpu": {"cpus": "0"},
            "unified": {"memory.high": "50331648"},
            "pids": {"limit": 30}
        }))
        .unwrap();
        c.update_container(id, res).await.unwrap();
        let (out, _, _) = c
            .exec_sync(id, "show2", &show, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out).trim(), "0 / 50331648 / 67108864 / 30");
        // What the kubelet sends on every update: a 0 limit per page size.
        // The guest has no hugetlb controller; a limit of none is moot.
        let res = serde_json::from_value(serde_json::json!({
            "hugepageLimits": [{"pageSize": "2MB", "limit": 0}, {"pageSize": "1GB", "limit": 0}],
            "pids": {"limit": 31}
        }))
        .unwrap();
        c.update_container(id, res).await.unwrap();
        let (out, _, _) = c
            .exec_sync(id, "show3", &show, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out).trim(), "0 / 50331648 / 67108864 / 31");
        // A limit that would need it is refused by name.
        let res = serde_json::from_value(serde_json::json!({
            "hugepageLimits": [{"pageSize": "2MB", "limit": 2097152}]
        }))
        .unwrap();
        let e = c.update_container(id, res).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(vmpod_runtime::agent_client::Code::INVALID_ARGUMENT),
            "{e}"
        );
        assert!(e.to_string().contains("hugepageLimits"), "{e}");
        // A value the kernel refuses is a clear error naming the file.
        let res = serde_json::from_value(serde_json::json!({"cpu": {"cpus": "7"}})).unwrap();
        let e = c.update_container(id, res).await.unwrap_err();
        assert_eq!(
            e.code(),
            Some(vmpod_runtime::agent_client::Code::INVALID_ARGUMENT),
            "{e}"
        );
        assert!(e.to_string().contains("cpuset.cpus"), "{e}");
        c.remove_container(id).await.unwrap();
    });
}

#[test]
fn signals_report_failures_and_reach_all_processes() {
    use vmpod_runtime::agent_client::Code::{FAILED_PRECONDITION, NOT_FOUND};
    let f = fixture();
    let c = &f.client;
    f.rt.block_on(async {
        let id = "sigs";
        c.create_container(id, bytes(&spec(&["sleep", "999"])), "", None, false)
            .await
            .unwrap();
        // Not running yet: no single process to signal (`all` kills a
        // created container: see kill_all_reaches_created_and_stopped_containers).
        let e = c.signal(id, "", 15, false).await.unwrap_err();
        assert_eq!(e.code(), Some(FAILED_PRECONDITION), "{e}");
        c.start_container(id).await.unwrap();
        for all in [false, true] {
            let e = c.signal(id, "no-such-exec", 15, all).await.unwrap_err();
            assert_eq!(e.code(), Some(NOT_FOUND), "{e}");
        }
        let ps = || agent_vm::exec_stdout(c, id, &["ps", "-o", "args"]);
        // An exec with a child in its process group.
        let group = |secs: &str| ExecSpec {
            args: vec![
                "sh".into(),
                "-c".into(),
                format!("sleep {secs} & echo started; wait"),
            ],
            ..Default::default()
        };
        for (exec_id, secs, all) in [("g1", "777", false), ("g2", "778", true)] {
            c.exec(id, exec_id, &group(secs)).await.unwrap();
            let (first, _) = c
                .read_chunk(id, exec_id, OutputStream::Stdout, Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&first), "started\n");
            c.signal(id, exec_id, 15, all).await.unwrap();
            let st = c.wait(id, exec_id).await.unwrap();
            assert_eq!(st.signal, 15, "{exec_id}: {st:?}");
            let procs = ps().await;
            let child_left = procs.contains(&format!("sleep {secs}"));
            // Without `all` only the exec's own process gets it; with
            // `all`, its whole process group.
            assert_eq!(child_left, !all, "{exec_id}: {procs}");
        }
        // An exited exec is not signalled (or already retired).
        let e = c.signal(id, "g1", 15, false).await.unwrap_err();
        assert!(
            matches!(e.code(), Some(FAILED_PRECONDITION) | Some(NOT_FOUND)),
            "{e}"
        );
        // TERM to all: the orphaned `sleep 777` in the cgroup dies; the
        // init, PID 1 of its namespace without a TERM handler, stays.
        c.signal(id, "", 15, true).await.unwrap();
        let t = Instant::now();
        loop {
            let procs = ps().await;
            if !procs.contains("sleep 777") {
                assert!(procs.contains("sleep 999"), "{procs}");
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "{procs}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // KILL to all: the container stops; then its init alone cannot be
        // signalled, while `all` still reaches its (empty) cgroup.
        c.signal(id, "", 9, true).await.unwrap();
        let st = c.wait(id, "").await.unwrap();
        assert_eq!(st.signal, 9, "{st:?}");
        let e = c.signal(id, "", 9, false).await.unwrap_err();
        assert_eq!(e.code(), Some(FAILED_PRECONDITION), "{e}");
        c.signal(id, "", 9, true).await.unwrap();
        c.remove_container(id).await.unwrap();
    });
}

#[test]
fn kill_all_reaches_created_and_stopped_containers() {
    use vmpod_runtime::agent_client::Code::FAILED_PRECONDITION;
    let f = fixture();
    let c = &f.client;
    f.rt.block_on(async {
        // A created container (its pod deleted during start): kill --all
        // kills its staged init, and its wait reports the signal.
        let id = "kill-created";
        c.create_container(id, bytes(&spec(&["sleep", "999"])), "", None, false)
            .await
            .unwrap();
        c.signal(id, "", 9, true).await.unwrap();
        let st = tokio::time::timeout(Duration::from_secs(20), c.wait(id, ""))
            .await
            .expect("created container's init not killed")
            .unwrap();
        assert_eq!(st.signal, 9, "{st:?}");
        c.remove_container(id).await.unwrap();

        // A pod's shared PID namespace: the joiner's init is not PID 1, so
        // its background children outlive it, in its cgroup.
        let owner = "kill-owner";
        let owner_pid = c
            .create_container(owner, bytes(&spec(&["sleep", "1000"])), "", None, false)
            .await
            .unwrap();
        c.start_container(owner).await.unwrap();
        let joiner = "kill-joiner";
        let mut s = spec(&["sh", "-c", "sleep 555 & sleep 556 & echo started"]);
        s["linux"]["namespaces"] = serde_json::json!([
            {"type": "pid", "path": format!("/proc/{owner_pid}/ns/pid")},
            {"type": "mount"}
        ]);
        c.create_container(joiner, bytes(&s), "", None, false)
            .await
            .unwrap();
        c.start_container(joiner).await.unwrap();
        assert_eq!(c.wait(joiner, "").await.unwrap().exit_code, 0);
        let ps = || agent_vm::exec_stdout(c, owner, &["ps", "-o", "stat,args"]);
        let procs = ps().await;
        assert!(
            procs.contains("sleep 555") && procs.contains("sleep 556"),
            "{procs}"
        );
        // The stopped init alone: refused.
        let e = c.signal(joiner, "", 15, false).await.unwrap_err();
        assert_eq!(e.code(), Some(FAILED_PRECONDITION), "{e}");
        // TERM to all, then KILL to all: the leftovers die.
        c.signal(joiner, "", 15, true).await.unwrap();
        let t = Instant::now();
        loop {
            let procs = ps().await;
            if !procs.contains("sleep 55") {
                assert!(procs.contains("sleep 1000"), "the owner lives: {procs}");
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "{procs}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c.signal(joiner, "", 9, true).await.unwrap();
        c.remove_container(joiner).await.unwrap();
        c.remove_container(owner).await.unwrap();
    });
}

#[test]
fn exec_racing_remove_is_refused_clearly() {
    use vmpod_runtime::agent_client::Code::{FAILED_PRECONDITION, NOT_FOUND};
    let f = fixture();
    let c = &f.client;
    f.rt.block_on(async {
        let e = ExecSpec {
            args: vec!["sleep".into(), "500".into()],
            ..Default::default()
        };
        let mut refused = 0;
        for i in 0..6 {
            let id = format!("race-{i}");
            c.create_container(&id, bytes(&spec(&["sleep", "1000"])), "", None, false)
                .await
                .unwrap();
            c.start_container(&id).await.unwrap();
            // Give the remove a head start of a few ms on some rounds.
            let delay = Duration::from_millis(5 * (i % 3));
            let (removed, exec) = tokio::join!(c.remove_container(&id), async {
                tokio::time::sleep(delay).await;
                c.exec(&id, "late", &e).await
            });
            removed.unwrap();
            match exec {
                // Added before the remove began: removed with it.
                Ok(_) => {}
                Err(err) => {
                    let code = err.code();
                    assert!(
                        code == Some(FAILED_PRECONDITION) || code == Some(NOT_FOUND),
                        "{err}"
                    );
                    if code == Some(FAILED_PRECONDITION) {
                        assert!(err.to_string().contains("removed"), "{err}");
                    }
                    refused += 1;
                }
            }
            let d = c.guest_details().await.unwrap();
            assert!(!d.container_ids.contains(&id), "{:?}", d.container_ids);
            assert!(
                !d.cgroups.contains(&format!("vmpod/{id}")),
                "{:?}",
                d.cgroups
            );
        }
        eprintln!("{refused}/6 racing execs refused");
        c.check().await.unwrap();
    });
}

#[test]
fn exec_env_and_cwd() {
    let f = fixture();
    let c = &f.client;
    f.rt.block_on(async {
        let id = "envcwd";
        let mut s = spec(&["sleep", "1000"]);
        s["process"]["env"] = serde_json::json!(["PATH=/bin", "FROM_SPEC=init"]);
        s["process"]["cwd"] = serde_json::json!("/etc");
        c.create_container(id, bytes(&s), "", None, false)
            .await
            .unwrap();
        c.start_container(id).await.unwrap();
        let show = "echo \"foo=$FOO spec=$FROM_SPEC home=$HOME pwd=$(pwd)\"";
        // Its own env and cwd replace the init's.
        let e = ExecSpec {
            args: vec!["sh".into(), "-c".into(), show.into()],
            env: vec!["PATH=/bin".into(), "FOO=bar baz".into()],
            cwd: "/tmp".into(),
            ..Default::default()
        };
        let (out, err, st) = c
            .exec_sync(id, "env1", &e, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(st.exit_code, 0, "{}", String::from_utf8_lossy(&err));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "foo=bar baz spec= home=/root pwd=/tmp\n"
        );
        // Without them, the init's.
        let e = ExecSpec {
            args: vec!["sh".into(), "-c".into(), show.into()],
            ..Default::default()
        };
        let (out, _, _) = c
            .exec_sync(id, "env2", &e, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            "foo= spec=init home=/root pwd=/etc\n"
        );
        // A cwd that does not exist is a clear error.
        let e = ExecSpec {
            args: vec!["true".into()],
            cwd: "/no/such/dir".into(),
            ..Default::default()
        };
        let err = c.exec(id, "env3", &e).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(vmpod_runtime::agent_client::Code::INVALID_ARGUMENT),
            "{err}"
        );
        assert!(err.to_string().contains("/no/such/dir"), "{err}");
        c.remove_container(id).await.unwrap();
    });
}
