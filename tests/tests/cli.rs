//! The `vmpod` binary's command-line contract: bad input clap rejects is one
//! line on stderr and exit 1 (exit 2 means a crashed guest, so it must never
//! mean "bad flag"); help and version exit 0; `vmpod check` reports this
//! host. Runs the real binary (`cargo build -p vmpod`); no VM is started.

use std::path::Path;
use std::process::{Command, Output};

use vmpod_runtime::hypervisor::host::KvmFlavour;
use vmpod_tests::vmpod_bin;

fn vmpod(args: &[&str]) -> Output {
    Command::new(vmpod_bin())
        .args(args)
        .env_remove("VMPOD_LOG")
        .output()
        .unwrap_or_else(|e| panic!("running vmpod {args:?}: {e}"))
}

/// `vmpod vm run` with otherwise valid flags in `dir` plus `extra`; the
/// kernel does not matter, every case fails before it is read.
fn vm_run(dir: &Path, extra: &[&str]) -> Output {
    let uds = dir.join("vm.vsock").display().to_string();
    let log = dir.join("console.log").display().to_string();
    let mut args = vec![
        "vm",
        "run",
        "--kernel",
        "/nonexistent/vmlinux",
        "--vsock-uds",
        &uds,
        "--console-log",
        &log,
    ];
    args.extend_from_slice(extra);
    vmpod(&args)
}

/// Exit 1 and exactly one stderr line, which is returned.
fn one_line_error(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: bad input → exit 1; stderr:\n{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{what}: one line:\n{stderr}");
    assert!(stderr.starts_with("vmpod: "), "{what}: {stderr}");
    stderr
}

#[test]
fn out_of_range_and_malformed_numbers_are_one_line_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--vcpus", "300"], &["--vcpus", "300"]),
        (&["--vcpus", "-1"], &["--vcpus", "-1"]),
        (&["--vcpus", "two"], &["--vcpus", "two"]),
        (
            &["--memory-mib", "5000000000"],
            &["--memory-mib", "5000000000"],
        ),
        (&["--memory-mib", "-5"], &["--memory-mib"]),
        (&["--cid", "-3"], &["--cid"]),
        (&["--hypervisor", "xen"], &["xen"]),
        (&["--frobnicate"], &["--frobnicate"]),
    ];
    for (extra, needles) in cases {
        let e = one_line_error(&vm_run(dir.path(), extra), &format!("{extra:?}"));
        for n in *needles {
            assert!(e.contains(n), "{extra:?}: error names {n:?}: {e}");
        }
    }
    assert!(
        !dir.path().join("vm.vsock").exists(),
        "nothing created on bad input"
    );
}

#[test]
fn missing_required_flags_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log").display().to_string();
    let out = vmpod(&[
        "vm",
        "run",
        "--kernel",
        "/nonexistent/vmlinux",
        "--console-log",
        &log,
    ]);
    let e = one_line_error(&out, "missing --vsock-uds");
    assert!(e.contains("--vsock-uds"), "{e}");
    let e = one_line_error(&vmpod(&["vm", "run"]), "no flags at all");
    assert!(e.contains("--kernel"), "{e}");
    let e = one_line_error(&vmpod(&[]), "no subcommand");
    assert!(e.contains("subcommand"), "{e}");
    let e = one_line_error(&vmpod(&["frobnicate"]), "unknown subcommand");
    assert!(e.contains("frobnicate"), "{e}");
}

#[test]
fn help_and_version_exit_0_on_stdout() {
    for args in [&["--help"][..], &["vm", "run", "--help"], &["help"]] {
        let out = vmpod(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("Usage:"), "{args:?}: {stdout}");
    }
    let out = vmpod(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("vmpod "),
        "{:?}",
        out
    );
}

/// On a PVM host (these CI machines) `vmpod check` must say so and route
/// the default handler to QEMU/TCG, with the reason.
#[test]
fn check_reports_pvm_and_qemu_tcg_for_the_default_handler() {
    let flavour = KvmFlavour::detect();
    if flavour != KvmFlavour::Pvm {
        eprintln!(
            "SKIP check_reports_pvm_and_qemu_tcg_for_the_default_handler: KVM here is {}, \
             not PVM, so the expected report differs",
            flavour.describe()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "default_runtime = \"pods\"\n[runtimes.pods]\nhypervisor = \"auto\"\n\
         [runtimes.fast]\nhypervisor = \"builtin\"\n",
    )
    .unwrap();
    let out = vmpod(&["check", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let row = |key: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("no {key:?} row:\n{stdout}"))
            .to_string()
    };
    assert!(row("KVM").contains("PVM"), "{stdout}");
    let pods = row("handler pods");
    assert!(pods.contains("qemu/tcg"), "{pods}");
    assert!(pods.contains("syscalls"), "reason given: {pods}");
    assert!(!pods.contains("NOT usable"), "{pods}");
    let fast = row("handler fast");
    assert!(
        fast.contains("builtin") && fast.contains("NOT usable"),
        "builtin on PVM cannot run sandboxes: {fast}"
    );
    // The default handler's usability decides the exit code: usable when
    // the guest kernel is built.
    let kernel_built = vmpod_tests::build_dir().join("guest/vmlinux").exists();
    assert_eq!(out.status.success(), kernel_built, "{stdout}");
}
