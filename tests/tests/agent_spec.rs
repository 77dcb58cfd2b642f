//! End-to-end tests of OCI spec fields through the guest agent: device
//! nodes, the device cgroup (BPF filter), rootfs propagation, seccomp
//! architectures and flags, and the fields the guest cannot honour (hooks,
//! block IO and hugepage limits without their controllers), which must be
//! clear errors rather than silently dropped. One real microVM (QEMU
//! backend, TCG where KVM cannot run guest userspace) shared by the tests
//! of this file.
//!
//! Needs `make guest` (kernel, initramfs) and a built `vmpod`.

use serde_json::json;
use vmpod_runtime::agent_client::{AgentClient, Code};
use vmpod_tests::agent_vm::{self, bytes, run};

struct Shared<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a AgentClient,
}

fn fixture() -> Shared<'static> {
    let f = agent_vm::shared("agent-spec");
    Shared {
        rt: &f.rt,
        client: &f.client,
    }
}

fn spec(args: &[&str]) -> serde_json::Value {
    agent_vm::busybox_spec(args)
}

/// `key: value` lines of a script's output.
fn line(out: &str, key: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key:?} line in {out:?}"))
}

#[test]
fn device_nodes_are_created_and_dev_holds_nothing_else() {
    let f = fixture();
    f.rt.block_on(async {
        let mut s = spec(&[
            "sh",
            "-c",
            "echo \"full: $(stat -c '%F %t:%T %a %u:%g' /dev/xfull)\"; \
             echo \"fifo: $(stat -c '%F %a' /dev/sub/xfifo)\"; \
             echo \"null: $(stat -c '%F %t:%T %a' /dev/null)\"; \
             echo \"dev: $(ls /dev | tr '\\n' ' ')\"",
        ]);
        s["linux"]["devices"] = json!([
            {"path": "/dev/xfull", "type": "c", "major": 1, "minor": 7, "fileMode": 0o600, "uid": 1000, "gid": 100},
            {"path": "/dev/sub/xfifo", "type": "p", "fileMode": 0o640},
            // The spec's own /dev/null replaces the default one.
            {"path": "/dev/null", "type": "c", "major": 1, "minor": 3, "fileMode": 0o620}
        ]);
        let (out, err, st) = run(f.client, "devnodes", &s).await;
        assert_eq!(st.exit_code, 0, "{out}\n{err}");
        assert_eq!(
            line(&out, "full"),
            "character special file 1:7 600 1000:100",
            "{out}"
        );
        assert_eq!(line(&out, "fifo"), "fifo 640", "{out}");
        assert_eq!(line(&out, "null"), "character special file 1:3 620", "{out}");
        // The default safe set, the standard links and mounts, and the
        // spec's nodes: nothing of the guest's /dev besides.
        assert_eq!(
            line(&out, "dev"),
            "fd full null ptmx pts random shm stderr stdin stdout sub tty urandom xfull zero",
            "{out}"
        );

        let mut s = spec(&["true"]);
        s["linux"]["devices"] = json!([{"path": "/dev/../x", "type": "c", "major": 1, "minor": 3}]);
        let e = f
            .client
            .create_container("devnodes-bad", bytes(&s), "", None, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT), "{e}");
        assert!(e.to_string().contains("linux.devices"), "{e}");
    });
}

#[test]
fn device_cgroup_list_is_enforced() {
    let f = fixture();
    f.rt.block_on(async {
        // `<name>: ok` or the shell's error (its last words) per open.
        let probe = |name: &str, redir: &str, dev: &str| {
            format!("echo \"{name}: $( (: {redir} {dev}) 2>&1 && echo ok)\"; ")
        };
        let script = [
            probe("null", ">", "/dev/null"),
            probe("zero", "<", "/dev/zero"),
            probe("urandom", "<", "/dev/urandom"),
            probe("tty", "<>", "/dev/tty"),
            probe("ptmx", "<>", "/dev/ptmx"),
            probe("kmsg_r", "<", "/dev/xkmsg"),
            probe("kmsg_w", ">", "/dev/xkmsg"),
            probe("kmsg_rw", "<>", "/dev/xkmsg"),
            probe("mem", "<", "/dev/xmem"),
        ]
        .concat();
        let with = |resources: serde_json::Value| {
            let mut s = spec(&["sh", "-c", &script]);
            // Made by stage 2 with mknod from inside the container's cgroup.
            s["linux"]["devices"] = json!([
                {"path": "/dev/xkmsg", "type": "c", "major": 1, "minor": 11},
                {"path": "/dev/xmem", "type": "c", "major": 1, "minor": 1}
            ]);
            s["linux"]["resources"] = resources;
            s
        };
        let denied = "Operation not permitted";
        // Without a list every device is allowed.
        let (out, err, st) = run(f.client, "devcg-none", &with(json!({}))).await;
        assert_eq!(st.exit_code, 0, "{out}\n{err}");
        assert_eq!(line(&out, "kmsg_rw"), "ok", "{out}");
        // What containerd's CRI sends: deny all, nothing else. The
        // runtime's defaults still let the basic devices through (/dev/tty
        // is allowed, just not the container's controlling terminal), and
        // the spec's own nodes are created but not usable.
        let s = with(json!({"devices": [{"allow": false, "access": "rwm"}]}));
        let (out, err, st) = run(f.client, "devcg-cri", &s).await;
        assert_eq!(st.exit_code, 0, "{out}\n{err}");
        for dev in ["null", "zero", "urandom", "ptmx"] {
            assert_eq!(line(&out, dev), "ok", "{dev}: {out}");
        }
        let tty = line(&out, "tty");
        assert!(
            tty == "ok" || tty.ends_with("No such device or address"),
            "{out}"
        );
        for dev in ["kmsg_r", "kmsg_rw", "mem"] {
            assert!(line(&out, dev).ends_with(denied), "{dev}: {out}");
        }
        // An access is allowed by one rule or not at all: read from one
        // rule and write from another make no read-write open.
        let s = with(json!({"devices": [
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "access": "r"},
            {"allow": true, "type": "c", "minor": 11, "access": "w"}
        ]}));
        let (out, err, st) = run(f.client, "devcg-split", &s).await;
        assert_eq!(st.exit_code, 0, "{out}\n{err}");
        assert_eq!(line(&out, "kmsg_r"), "ok", "{out}");
        assert_eq!(line(&out, "kmsg_w"), "ok", "{out}");
        assert!(line(&out, "kmsg_rw").ends_with(denied), "{out}");
        assert_eq!(line(&out, "zero"), "ok", "{out}");
    });
}

#[test]
fn rootfs_propagation_is_applied() {
    let f = fixture();
    f.rt.block_on(async {
        // The optional fields of the root mount's mountinfo line.
        let script = "echo \"root: $(awk '$5 == \"/\" {for (i = 7; $i != \"-\"; i++) printf \"%s \", $i}' /proc/self/mountinfo)\"; true";
        let (out, _, _) = run(f.client, "prop-default", &spec(&["sh", "-c", script])).await;
        let root = out.lines().find_map(|l| l.strip_prefix("root:")).unwrap_or("?").trim().to_string();
        assert!(!root.contains("shared:") && !root.contains("unbindable"), "private by default: {out}");
        let mut s = spec(&["sh", "-c", script]);
        s["linux"]["rootfsPropagation"] = json!("rshared");
        let (out, err, st) = run(f.client, "prop-shared", &s).await;
        assert_eq!(st.exit_code, 0, "{err}");
        assert!(line(&out, "root").starts_with("shared:"), "{out}");
        s["linux"]["rootfsPropagation"] = json!("unbindable");
        let (out, _, _) = run(f.client, "prop-unbindable", &s).await;
        assert_eq!(line(&out, "root"), "unbindable", "{out}");
        s["linux"]["rootfsPropagation"] = json!("sideways");
        let e = f
            .client
            .create_container("prop-bad", bytes(&s), "", None, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT), "{e}");
        assert!(e.to_string().contains("linux.rootfsPropagation"), "{e}");
    });
}

#[test]
fn seccomp_architectures_and_flags() {
    let f = fixture();
    f.rt.block_on(async {
        let profile = |archs: serde_json::Value, flags: serde_json::Value| {
            json!({
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": archs,
                "flags": flags,
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
            })
        };
        let script = "echo \"mkdir: $(mkdir /tmp/sc 2>&1 && echo ok)\"; rmdir /tmp/sc 2>/dev/null; true";
        // Docker's list (x86_64 with x86 and x32) and the LOG flag: applied.
        let mut s = spec(&["sh", "-c", script]);
        s["linux"]["seccomp"] = profile(
            json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]),
            json!(["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]),
        );
        let (out, err, st) = run(f.client, "sc-ok", &s).await;
        assert_eq!(st.exit_code, 0, "{err}");
        assert_eq!(
            line(&out, "mkdir"),
            "mkdir: can't create directory '/tmp/sc': Operation not permitted",
            "{out}"
        );
        // A profile for other architectures only is refused.
        s["linux"]["seccomp"] = profile(json!(["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]), json!([]));
        let e = f
            .client
            .create_container("sc-arch", bytes(&s), "", None, false)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT), "{e}");
        assert!(e.to_string().contains("linux.seccomp.architectures"), "{e}");
        s["linux"]["seccomp"] = profile(
            json!(["SCMP_ARCH_X86_64"]),
            json!(["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]),
        );
        let e = f
            .client
            .create_container("sc-flag", bytes(&s), "", None, false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("linux.seccomp.flags"), "{e}");
    });
}

#[test]
fn unsupported_fields_are_named_errors() {
    let f = fixture();
    let c = f.client;
    f.rt.block_on(async {
        let cases = [
            ("uf-hook", json!({"hooks": {"prestart": [{"path": "/bin/true"}]}}), "hooks.prestart"),
            ("uf-hook2", json!({"hooks": {"createContainer": [{"path": "/bin/true"}]}}), "hooks.createContainer"),
            // The guest kernel has neither the io nor the hugetlb controller.
            ("uf-blkio", json!({"linux": {"resources": {"blockIO": {"weight": 500}}}}), "linux.resources.blockIO"),
            ("uf-huge", json!({"linux": {"resources": {"hugepageLimits": [{"pageSize": "2MB", "limit": 2097152}]}}}), "linux.resources.hugepageLimits"),
        ];
        for (id, patch, field) in cases {
            let mut s = spec(&["true"]);
            merge(&mut s, &patch);
            let e = c
                .create_container(id, bytes(&s), "", None, false)
                .await
                .unwrap_err();
            assert_eq!(e.code(), Some(Code::INVALID_ARGUMENT), "{id}: {e}");
            assert!(e.to_string().contains(field), "{id}: {e}");
            let d = c.guest_details().await.unwrap();
            assert!(!d.cgroups.contains(&format!("vmpod/{id}")), "{id}: {:?}", d.cgroups);
        }
        // The kubelet's hugepage limits (0 for every page size) need no
        // controller: they create and run.
        let mut s = spec(&["echo", "no huge pages"]);
        s["linux"]["resources"] = json!({"hugepageLimits": [
            {"pageSize": "2MB", "limit": 0}, {"pageSize": "1GB", "limit": 0}
        ]});
        let (out, err, st) = run(c, "uf-huge0", &s).await;
        assert_eq!((out.as_str(), st.exit_code), ("no huge pages\n", 0), "{err}");
        // Security labels the guest cannot apply are accepted and ignored.
        let mut s = spec(&["echo", "labelled"]);
        s["process"]["apparmorProfile"] = json!("cri-containerd.apparmor.d");
        s["process"]["selinuxLabel"] = json!("system_u:system_r:container_t:s0");
        let (out, _, st) = run(c, "uf-labels", &s).await;
        assert_eq!((out.as_str(), st.exit_code), ("labelled\n", 0));
    });
}

/// JSON merge of `patch` into `v` (objects recursively, the rest replaced).
fn merge(v: &mut serde_json::Value, patch: &serde_json::Value) {
    match (v, patch) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, pv) in b {
                merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), pv);
            }
        }
        (v, p) => *v = p.clone(),
    }
}

#[test]
fn mount_destinations_cannot_leave_the_rootfs() {
    let f = fixture();
    let c = f.client;
    f.rt.block_on(async {
        // The (shared, writable) busybox rootfs gets two links that point
        // out of it when read from the guest's root: an absolute one and
        // one that climbs with "..".
        let (out, err, st) = run(
            c,
            "esc-setup",
            &spec(&[
                "sh",
                "-c",
                "ln -s /run/vmpod-escape /escape-abs && \
                 ln -s ../../../../run/vmpod-escape2 /escape-rel && echo linked",
            ]),
        )
        .await;
        assert_eq!((out.as_str(), st.exit_code), ("linked\n", 0), "{err}");

        // Mounts through them land inside the rootfs, where the container
        // sees them at the links' targets.
        let mut s = spec(&[
            "sh",
            "-c",
            "echo \"tmpfs: $(grep -c ' /run/vmpod-escape/sub ' /proc/self/mountinfo)\"; \
             echo \"file: $(cat /run/vmpod-escape2/f)\"",
        ]);
        s["mounts"] = json!([
            {"destination": "/escape-abs/sub", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]},
            {"destination": "/escape-rel/f", "type": "bind",
             "source": format!("{}/etc/hostname", agent_vm::BUSYBOX_ROOTFS), "options": ["bind", "ro"]}
        ]);
        let (out, err, st) = run(c, "esc-mount", &s).await;
        assert_eq!(st.exit_code, 0, "{out}\n{err}");
        assert_eq!(line(&out, "tmpfs"), "1", "{out}");
        assert_eq!(line(&out, "file"), "busybox", "{out}");

        // Nothing was created in the guest's own /run (seen through a
        // read-only bind of it).
        let mut s = spec(&[
            "sh",
            "-c",
            "echo \"run: $(ls -a /guest-run | tr '\\n' ' ')\"; \
             echo \"ro: $( (touch /guest-run/ro-probe) 2>&1)\"",
        ]);
        s["mounts"] = json!([{"destination": "/guest-run", "type": "bind", "source": "/run", "options": ["rbind", "ro"]}]);
        let (out, err, st) = run(c, "esc-check", &s).await;
        assert_eq!(st.exit_code, 0, "{out}\n{err}");
        let run_dir = line(&out, "run");
        assert!(run_dir.starts_with(". .."), "{out}");
        assert!(!run_dir.contains("vmpod-escape"), "created in the guest's /run: {out}");
        // The ro flag is set on the bind before it is attached.
        assert_eq!(line(&out, "ro"), "touch: /guest-run/ro-probe: Read-only file system", "{out}");

        let (_, err, st) = run(
            c,
            "esc-clean",
            &spec(&[
                "sh",
                "-c",
                "rm -rf /escape-abs /escape-rel /run/vmpod-escape /run/vmpod-escape2 /guest-run; \
                 rmdir /run",
            ]),
        )
        .await;
        assert_eq!(st.exit_code, 0, "{err}");
    });
}
