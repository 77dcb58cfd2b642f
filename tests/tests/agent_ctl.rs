//! `vmpod agent-ctl` end to end, as the README example drives it by hand:
//! the real `vmpod` binary against a booted microVM (QEMU backend, TCG
//! where KVM cannot run guest userspace) with the test initramfs.
//!
//! Needs `make guest` (kernel, initramfs) and a built `vmpod`
//! (`cargo build -p vmpod`; `make test` builds it first).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vmpod_tests::agent_vm;

struct Ctl {
    uds: PathBuf,
    dir: tempfile::TempDir,
}

impl Ctl {
    fn new() -> Ctl {
        let f = agent_vm::shared("agent-ctl");
        Ctl {
            uds: f.vm.as_ref().expect("VM running").vsock_uds().to_path_buf(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// `vmpod agent-ctl --uds UDS ARGS...`
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(vmpod_tests::vmpod_bin())
            .arg("agent-ctl")
            .arg("--uds")
            .arg(&self.uds)
            .args(["--wait-ready", "60"])
            .args(args)
            .output()
            .unwrap();
        eprintln!(
            "agent-ctl {args:?} -> {:?}\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Succeeds; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "agent-ctl {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `agent-ctl spec ARGS` written to a file in the temp dir.
    fn spec(&self, name: &str, args: &[&str]) -> PathBuf {
        let json = self.ok(&[&["spec"], args].concat());
        let path = self.dir.path().join(name);
        std::fs::write(&path, json).unwrap();
        path
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn readme_walkthrough() {
    let ctl = Ctl::new();
    let out = ctl.ok(&["check"]);
    assert!(out.starts_with("agent: serving, version "), "{out}");
    assert!(out.contains("guest: kernel 6."), "{out}");

    // run: output, exit code.
    let echo = ctl.spec(
        "echo.json",
        &[
            "--hostname",
            "web",
            "--",
            "sh",
            "-c",
            "echo hello from $$ on $(hostname); exit 3",
        ],
    );
    let out = ctl.run(&["run", "--id", "hello", "--spec", s(&echo)]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from 1 on web\n"
    );
    assert_eq!(out.status.code(), Some(3));

    // A memory-limited container that is OOM-killed.
    let oom = ctl.spec(
        "oom.json",
        &["--memory", "33554432", "--", "sh", "-c", "tail /dev/zero"],
    );
    let out = ctl.run(&["run", "--id", "oom", "--spec", s(&oom)]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("oom: OOM-killed"),
        "{out:?}"
    );
    assert_eq!(out.status.code(), Some(137));

    // create / start / exec / update / stats / kill / wait / remove.
    let sleep = ctl.spec("sleep.json", &["--", "sleep", "1000"]);
    assert!(ctl
        .ok(&["create", "--id", "s1", "--spec", s(&sleep)])
        .starts_with("created s1 (guest pid "));
    assert_eq!(ctl.ok(&["start", "--id", "s1"]), "started s1\n");
    let ps = ctl.ok(&[
        "exec",
        "--id",
        "s1",
        "--exec-id",
        "e1",
        "--",
        "ps",
        "-o",
        "args",
    ]);
    assert!(ps.lines().any(|l| l.trim() == "sleep 1000"), "{ps}");
    let out = ctl.run(&[
        "exec",
        "--id",
        "s1",
        "--exec-id",
        "e2",
        "--",
        "sh",
        "-c",
        "exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(
        ctl.ok(&["update", "--id", "s1", "--pids", "20", "--memory", "67108864"]),
        "updated s1\n"
    );
    let stats = ctl.ok(&["stats", "--id", "s1"]);
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("pids current=") && l.ends_with(" limit=20")),
        "{stats}"
    );
    assert!(stats.contains(" limit=67108864 "), "{stats}");
    let list = ctl.ok(&["list"]);
    assert!(
        list.lines().any(|l| l.starts_with("s1\trunning\t")),
        "{list}"
    );
    ctl.ok(&["kill", "--id", "s1", "--signal", "KILL"]);
    let wait = ctl.ok(&["wait", "--id", "s1"]);
    assert!(
        wait.starts_with("exit_code=137 signal=9 oom_killed=false started="),
        "{wait}"
    );
    assert_eq!(ctl.ok(&["remove", "--id", "s1"]), "removed s1\n");

    // Errors are the agent's, with a failing exit status.
    let out = ctl.run(&["start", "--id", "s1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{out:?}"
    );
    let out = ctl.run(&["kill", "--id", "hello", "--signal", "BOGUS"]);
    assert!(!out.status.success());
    let list = ctl.ok(&["list"]);
    assert!(!list.contains("s1"), "{list}");
}
