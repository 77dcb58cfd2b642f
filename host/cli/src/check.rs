//! `vmpod check`: what this host can run, and which backend each runtime
//! handler will use here, with reasons. Exit 0 when the default handler can
//! run pod sandboxes, 1 (with the problems listed) otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use vmpod_cri::config::{Config, HypervisorKind as HandlerHypervisor, DEFAULT_CONFIG_PATH};
use vmpod_runtime::hypervisor::host::{self, CgroupMode, KvmFlavour};
use vmpod_runtime::hypervisor::qemu::EffectiveAccel;
use vmpod_runtime::hypervisor::{select, tools, HypervisorKind};

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Daemon config file (its [runtimes.*] handlers are reported).
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

struct Report {
    rows: Vec<(String, String)>,
    problems: Vec<String>,
}

impl Report {
    fn row(&mut self, key: &str, value: impl Into<String>) {
        self.rows.push((key.to_string(), value.into()));
    }
}

pub fn run(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config, args.config == Path::new(DEFAULT_CONFIG_PATH))?;
    let mut r = Report {
        rows: Vec::new(),
        problems: Vec::new(),
    };
    let flavour = KvmFlavour::detect();
    r.row("KVM", flavour.describe());
    r.row(
        "host",
        format!("{} CPUs, {} MiB RAM", host::cpus(), host::memory_mib()),
    );
    for dev in ["/dev/vhost-vsock", "/dev/vhost-net", "/dev/net/tun"] {
        let state = if Path::new(dev).exists() {
            "present".to_string()
        } else {
            match dev {
                "/dev/vhost-vsock" => {
                    "absent (vsock is served in userspace: built-in VMM device / vmpod vm vhost-user-vsock)"
                        .into()
                }
                "/dev/vhost-net" => "absent (virtio-net is served in userspace)".into(),
                _ => {
                    r.problems
                        .push("/dev/net/tun missing: no TAP networking".into());
                    "absent".into()
                }
            }
        };
        r.row(dev, state);
    }
    r.row(
        "cgroups",
        match host::cgroup_mode() {
            CgroupMode::V2 => "v2 (unified)",
            CgroupMode::Hybrid => "hybrid (v1 controllers + v2 at /sys/fs/cgroup/unified)",
            CgroupMode::V1 => "v1",
            CgroupMode::Unknown => "unknown (nothing mounted at /sys/fs/cgroup?)",
        },
    );
    let qemu = tool_row(
        &mut r,
        "qemu-system-x86_64",
        "install Debian's qemu-system-x86",
    );
    r.row(
        "vsock back-end",
        "built in (QEMU: `vmpod vm vhost-user-vsock`; built-in VMM: its own device)",
    );
    tool_row(
        &mut r,
        "virtiofsd",
        "run `make tools` (needed for shared dirs)",
    );

    let default_kernel = find_in_checkout("build/guest/vmlinux");
    let default_initrd = find_in_checkout("build/guest/initramfs.cpio.gz");
    r.row(
        "guest kernel",
        describe_file(default_kernel.as_deref(), "make guest-kernel"),
    );
    r.row(
        "guest initramfs",
        describe_file(default_initrd.as_deref(), "make guest"),
    );

    let mut default_ok = false;
    for (name, handler) in &config.runtimes {
        let requested = match handler.hypervisor {
            HandlerHypervisor::Auto => None,
            HandlerHypervisor::Builtin => Some(HypervisorKind::Builtin),
            HandlerHypervisor::Qemu => Some(HypervisorKind::Qemu),
        };
        let choice = select::choose(requested, &flavour);
        let backend = match choice.accel {
            Some(EffectiveAccel::Tcg) => "qemu/tcg".to_string(),
            Some(EffectiveAccel::Kvm { .. }) => "qemu/kvm".to_string(),
            None => choice.kind.to_string(),
        };
        let mut ok = choice.runs_sandboxes;
        let kernel = handler.kernel.clone().or_else(|| default_kernel.clone());
        if kernel.as_deref().is_none_or(|k| !k.exists()) {
            ok = false;
            r.problems.push(format!(
                "handler {name}: no guest kernel (make guest-kernel)"
            ));
        }
        if choice.kind == HypervisorKind::Qemu && qemu.is_none() {
            ok = false;
            r.problems
                .push(format!("handler {name}: qemu-system-x86_64 missing"));
        }
        if !choice.runs_sandboxes {
            r.problems
                .push(format!("handler {name}: {}", choice.reason));
        }
        r.row(
            &format!("handler {name}"),
            format!(
                "{backend}{}: {}",
                if ok { "" } else { " (NOT usable)" },
                choice.reason
            ),
        );
        if *name == config.default_runtime {
            default_ok = ok;
        }
    }
    // The built-in VMM's own status on this host, whatever handlers say.
    r.row(
        "builtin VMM",
        match &flavour {
            KvmFlavour::Hardware { .. } => "usable for sandboxes".to_string(),
            KvmFlavour::Pvm => {
                "boots guest kernels (kernel mode emulated, PVM masks appended); no guest userspace"
                    .to_string()
            }
            KvmFlavour::None(why) => format!("unusable ({why})"),
        },
    );

    let width = r.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("vmpod check");
    for (k, v) in &r.rows {
        println!("  {k:width$}  {v}");
    }
    if r.problems.is_empty() {
        println!(
            "ok: the default handler {:?} can run pod sandboxes",
            config.default_runtime
        );
    } else {
        println!("problems:");
        for p in &r.problems {
            println!("  - {p}");
        }
    }
    Ok(if default_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Report a helper binary: path and version, or how to get it.
fn tool_row(r: &mut Report, name: &str, hint: &str) -> Option<PathBuf> {
    match tools::find(name) {
        Some(path) => {
            let version = Command::new(&path)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "version unknown".into());
            r.row(name, format!("{} ({version})", path.display()));
            Some(path)
        }
        None => {
            r.row(name, format!("missing ({hint})"));
            None
        }
    }
}

/// `rel` under the checkout holding this executable, or under the cwd.
fn find_in_checkout(rel: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok();
    let from_exe = exe
        .iter()
        .flat_map(|e| e.ancestors().skip(1))
        .map(|d| d.join(rel));
    let from_cwd = std::env::current_dir().ok().map(|d| d.join(rel));
    from_exe.chain(from_cwd).find(|p| p.exists())
}

fn describe_file(path: Option<&Path>, hint: &str) -> String {
    match path.and_then(|p| std::fs::metadata(p).ok().map(|m| (p, m))) {
        Some((p, m)) => format!("{} ({} MiB)", p.display(), m.len() / (1024 * 1024)),
        None => format!("not built ({hint})"),
    }
}
