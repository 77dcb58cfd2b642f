//! `vmpod agent-ctl`: talk to a guest agent directly over the VM's
//! hybrid-vsock socket (debugging; the CRI daemon uses the same client).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use vmpod_runtime::agent_client::{agent, AgentClient, ExecSpec, OutputStream, AGENT_VSOCK_PORT};

#[derive(Args)]
pub struct AgentCtlArgs {
    /// The VM's hybrid-vsock unix socket (`vmpod vm run --vsock-uds`).
    #[arg(long)]
    uds: PathBuf,
    /// Guest vsock port of the agent.
    #[arg(long, default_value_t = AGENT_VSOCK_PORT)]
    port: u32,
    /// Per-call timeout in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Keep retrying the connection this many seconds (VM still booting).
    #[arg(long, default_value_t = 10)]
    wait_ready: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Health check, agent version and guest details.
    Check,
    /// Print a minimal OCI runtime spec (config.json) for ARGS.
    Spec {
        /// Root filesystem directory inside the guest.
        #[arg(long, default_value = "/containers/busybox")]
        rootfs: String,
        /// Hostname of the container.
        #[arg(long)]
        hostname: Option<String>,
        /// memory.max in bytes.
        #[arg(long)]
        memory: Option<i64>,
        #[arg(long)]
        tty: bool,
        #[arg(trailing_var_arg = true, required = true)]
        args: Vec<String>,
    },
    /// Create a container from an OCI spec file.
    Create {
        #[arg(long)]
        id: String,
        /// OCI runtime spec (config.json).
        #[arg(long)]
        spec: PathBuf,
        /// Root filesystem in the guest (overrides root.path).
        #[arg(long)]
        rootfs: Option<String>,
        /// `user[:group]` resolved in the container.
        #[arg(long)]
        user: Option<String>,
        /// Keep stdin open.
        #[arg(long)]
        stdin: bool,
    },
    /// Start a created container.
    Start {
        #[arg(long)]
        id: String,
    },
    /// Create, start, print output, wait, remove: exit with the container's code.
    Run {
        #[arg(long)]
        id: String,
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        rootfs: Option<String>,
        /// Keep the container (do not remove it after it exits).
        #[arg(long)]
        keep: bool,
    },
    /// Run a process in a running container; prints its output and exits with its code.
    Exec {
        #[arg(long)]
        id: String,
        #[arg(long)]
        exec_id: String,
        #[arg(long)]
        tty: bool,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(long = "env")]
        env: Vec<String>,
        /// Return right after the process started.
        #[arg(long)]
        detach: bool,
        #[arg(trailing_var_arg = true, required = true)]
        args: Vec<String>,
    },
    /// Wait for a container (or exec) to exit; prints its exit status.
    Wait {
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "")]
        exec_id: String,
    },
    /// Send a signal (number or name such as TERM, KILL).
    Kill {
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "")]
        exec_id: String,
        #[arg(long, default_value = "TERM")]
        signal: String,
        /// Signal every process of the container.
        #[arg(long)]
        all: bool,
    },
    /// Remove a container (kills what still runs).
    Remove {
        #[arg(long)]
        id: String,
    },
    /// Print a process's output; with --follow until the stream ends.
    Output {
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "")]
        exec_id: String,
        #[arg(long, default_value = "stdout", value_parser = ["stdout", "stderr"])]
        stream: String,
        #[arg(long)]
        follow: bool,
    },
    /// Change a container's resources: an OCI `linux.resources` JSON file
    /// and/or the flags (which override the file's values).
    Update {
        #[arg(long)]
        id: String,
        /// OCI LinuxResources JSON (as in config.json's linux.resources).
        #[arg(long)]
        resources: Option<PathBuf>,
        /// memory.max in bytes (-1: unlimited).
        #[arg(long, allow_hyphen_values = true)]
        memory: Option<i64>,
        /// cpu.max quota in microseconds per period (-1: unlimited).
        #[arg(long, allow_hyphen_values = true)]
        cpu_quota: Option<i64>,
        #[arg(long)]
        cpu_period: Option<u64>,
        /// cpuset.cpus, e.g. 0-1.
        #[arg(long)]
        cpuset_cpus: Option<String>,
        /// pids.max (0 or -1: unlimited).
        #[arg(long, allow_hyphen_values = true)]
        pids: Option<i64>,
    },
    /// cgroup statistics of a container.
    Stats {
        #[arg(long)]
        id: String,
    },
    /// List containers.
    List,
    /// Destroy the sandbox: remove every container and sandbox mount.
    Destroy,
    /// Measure health round trips and create+start+wait of `true`; prints JSON.
    Bench {
        #[arg(long, default_value_t = 100)]
        health: usize,
        #[arg(long, default_value_t = 10)]
        containers: usize,
        #[arg(long, default_value = "/containers/busybox")]
        rootfs: String,
    },
}

pub fn run(args: AgentCtlArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

fn parse_signal(s: &str) -> anyhow::Result<u32> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    // Linux x86_64 signal numbers (the guest's).
    Ok(match name.as_str() {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        "CONT" => 18,
        "STOP" => 19,
        _ => bail!("unknown signal {s:?}"),
    })
}

/// A minimal OCI spec: default mounts are added by the agent.
pub fn minimal_spec(
    rootfs: &str,
    args: &[String],
    hostname: Option<&str>,
    memory: Option<i64>,
    tty: bool,
) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": tty,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": false},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    if let Some(h) = hostname {
        spec["hostname"] = h.into();
    }
    if let Some(m) = memory {
        spec["linux"]["resources"] = serde_json::json!({"memory": {"limit": m}});
    }
    spec
}

/// Flags of `update` that override the resources file.
#[derive(Default)]
pub struct ResourceFlags {
    pub memory: Option<i64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub pids: Option<i64>,
}

/// The OCI LinuxResources for `update`: the file's JSON (if any) with the
/// flags set over it.
pub fn update_resources(
    file: Option<&[u8]>,
    flags: &ResourceFlags,
) -> anyhow::Result<agent::LinuxResources> {
    let mut v: serde_json::Value = match file {
        Some(b) => serde_json::from_slice(b).context("resources file is not JSON")?,
        None => serde_json::json!({}),
    };
    if !v.is_object() {
        bail!("resources must be a JSON object (OCI linux.resources)");
    }
    let mut set = |section: &str, key: &str, val: serde_json::Value| {
        if !v[section].is_object() {
            v[section] = serde_json::json!({});
        }
        v[section][key] = val;
    };
    if let Some(m) = flags.memory {
        set("memory", "limit", m.into());
    }
    if let Some(q) = flags.cpu_quota {
        set("cpu", "quota", q.into());
    }
    if let Some(p) = flags.cpu_period {
        set("cpu", "period", p.into());
    }
    if let Some(c) = &flags.cpuset_cpus {
        set("cpu", "cpus", c.clone().into());
    }
    if let Some(p) = flags.pids {
        set("pids", "limit", p.into());
    }
    serde_json::from_value(v).context("not an OCI LinuxResources")
}

async fn print_stream(
    c: &AgentClient,
    id: &str,
    exec_id: &str,
    stream: OutputStream,
) -> anyhow::Result<()> {
    let mut out: Box<dyn Write> = match stream {
        OutputStream::Stdout => Box::new(std::io::stdout()),
        OutputStream::Stderr => Box::new(std::io::stderr()),
    };
    loop {
        let (d, eof) = c
            .read_chunk(id, exec_id, stream, Duration::from_secs(5))
            .await?;
        out.write_all(&d)?;
        out.flush()?;
        if eof {
            return Ok(());
        }
    }
}

/// Print stdout and stderr until both end.
async fn print_output(c: &AgentClient, id: &str, exec_id: &str) -> anyhow::Result<()> {
    let (a, b) = tokio::join!(
        print_stream(c, id, exec_id, OutputStream::Stdout),
        print_stream(c, id, exec_id, OutputStream::Stderr)
    );
    a.and(b)
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(code.clamp(0, 255) as u8)
}

async fn run_async(a: AgentCtlArgs) -> anyhow::Result<ExitCode> {
    if let Cmd::Spec {
        rootfs,
        hostname,
        memory,
        tty,
        args,
    } = &a.command
    {
        let spec = minimal_spec(rootfs, args, hostname.as_deref(), *memory, *tty);
        println!("{}", serde_json::to_string_pretty(&spec)?);
        return Ok(ExitCode::SUCCESS);
    }
    let c = AgentClient::connect_retry(&a.uds, a.port, Duration::from_secs(a.wait_ready))
        .await?
        .with_timeout(Duration::from_secs(a.timeout));
    let long = c.with_timeout(Duration::from_secs(24 * 3600));
    match a.command {
        Cmd::Spec { .. } => unreachable!("handled above"),
        Cmd::Check => {
            let v = c.version().await?;
            let d = c.guest_details().await?;
            println!(
                "agent: serving, version {} (protocol {})",
                v.agent_version, v.protocol_version
            );
            println!(
                "guest: kernel {}, {} cpus, {} MiB",
                d.kernel_release,
                d.cpus,
                d.mem_total_bytes >> 20
            );
            println!(
                "containers: {}",
                if d.container_ids.is_empty() {
                    "-".into()
                } else {
                    d.container_ids.join(", ")
                }
            );
            println!(
                "cgroups: {}",
                if d.cgroups.is_empty() {
                    "-".into()
                } else {
                    d.cgroups.join(", ")
                }
            );
            println!("mounts: {}", d.mount_points.join(" "));
        }
        Cmd::Create {
            id,
            spec,
            rootfs,
            user,
            stdin,
        } => {
            let json =
                std::fs::read(&spec).with_context(|| format!("reading {}", spec.display()))?;
            let pid = c
                .create_container(
                    &id,
                    json,
                    rootfs.as_deref().unwrap_or(""),
                    user.as_deref(),
                    stdin,
                )
                .await?;
            println!("created {id} (guest pid {pid})");
        }
        Cmd::Start { id } => {
            c.start_container(&id).await?;
            println!("started {id}");
        }
        Cmd::Run {
            id,
            spec,
            rootfs,
            keep,
        } => {
            let json =
                std::fs::read(&spec).with_context(|| format!("reading {}", spec.display()))?;
            c.create_container(&id, json, rootfs.as_deref().unwrap_or(""), None, false)
                .await?;
            c.start_container(&id).await?;
            print_output(&c, &id, "").await?;
            let st = long.wait(&id, "").await?;
            if !keep {
                c.remove_container(&id).await?;
            }
            if st.oom_killed {
                eprintln!("{id}: OOM-killed");
            }
            return Ok(exit_code(st.exit_code));
        }
        Cmd::Exec {
            id,
            exec_id,
            tty,
            user,
            cwd,
            env,
            detach,
            args,
        } => {
            let spec = ExecSpec {
                args,
                env,
                cwd: cwd.unwrap_or_default(),
                username: user,
                terminal: tty,
                stdin: false,
            };
            let pid = c.exec(&id, &exec_id, &spec).await?;
            if detach {
                println!("exec {exec_id} started (guest pid {pid})");
                return Ok(ExitCode::SUCCESS);
            }
            print_output(&c, &id, &exec_id).await?;
            let st = long.wait(&id, &exec_id).await?;
            return Ok(exit_code(st.exit_code));
        }
        Cmd::Wait { id, exec_id } => {
            let st = long.wait(&id, &exec_id).await?;
            println!(
                "exit_code={} signal={} oom_killed={} started={} finished={}",
                st.exit_code,
                st.signal,
                st.oom_killed,
                st.started_at_unix_nanos,
                st.finished_at_unix_nanos
            );
        }
        Cmd::Kill {
            id,
            exec_id,
            signal,
            all,
        } => {
            c.signal(&id, &exec_id, parse_signal(&signal)?, all).await?;
        }
        Cmd::Remove { id } => {
            c.remove_container(&id).await?;
            println!("removed {id}");
        }
        Cmd::Output {
            id,
            exec_id,
            stream,
            follow,
        } => {
            let s = if stream == "stderr" {
                OutputStream::Stderr
            } else {
                OutputStream::Stdout
            };
            if follow {
                print_stream(&long, &id, &exec_id, s).await?;
            } else {
                let (d, _) = c
                    .read_chunk(&id, &exec_id, s, Duration::from_millis(0))
                    .await?;
                std::io::stdout().write_all(&d)?;
            }
        }
        Cmd::Update {
            id,
            resources,
            memory,
            cpu_quota,
            cpu_period,
            cpuset_cpus,
            pids,
        } => {
            let file = match &resources {
                Some(p) => {
                    Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
                }
                None => None,
            };
            let flags = ResourceFlags {
                memory,
                cpu_quota,
                cpu_period,
                cpuset_cpus,
                pids,
            };
            let r = update_resources(file.as_deref(), &flags)?;
            c.update_container(&id, r).await?;
            println!("updated {id}");
        }
        Cmd::Stats { id } => {
            let s = c.stats(&id).await?;
            println!(
                "cpu usage_usec={} user_usec={} system_usec={} throttled_usec={}",
                s.cpu.usage_usec, s.cpu.user_usec, s.cpu.system_usec, s.cpu.throttled_usec
            );
            println!(
                "memory current={} limit={} anon={} file={} oom={} oom_kill={}",
                s.memory.current_bytes,
                s.memory.limit_bytes,
                s.memory.anon_bytes,
                s.memory.file_bytes,
                s.memory.oom_events,
                s.memory.oom_kill_events
            );
            println!("pids current={} limit={}", s.pids.current, s.pids.limit);
        }
        Cmd::List => {
            for ci in c.list_containers().await? {
                println!("{}\t{}\t{}", ci.container_id, ci.status, ci.pid);
            }
        }
        Cmd::Bench {
            health,
            containers,
            rootfs,
        } => {
            let r = bench(&c, health, containers, &rootfs).await?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Cmd::Destroy => {
            c.destroy_sandbox().await?;
            println!("sandbox destroyed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// median, spread (p10/p90, min/max) in milliseconds.
fn summary(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    serde_json::json!({
        "n": v.len(),
        "median_ms": at(0.5),
        "p10_ms": at(0.1),
        "p90_ms": at(0.9),
        "min_ms": v[0],
        "max_ms": v[v.len() - 1],
    })
}

async fn bench(
    c: &AgentClient,
    health: usize,
    containers: usize,
    rootfs: &str,
) -> anyhow::Result<serde_json::Value> {
    if health == 0 || containers == 0 {
        bail!("--health and --containers must be at least 1");
    }
    c.check().await?; // warm-up
    let mut h = Vec::with_capacity(health);
    for _ in 0..health {
        let t = std::time::Instant::now();
        c.check().await?;
        h.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let spec = serde_json::to_vec(&minimal_spec(
        rootfs,
        &["true".to_string()],
        None,
        None,
        false,
    ))?;
    let mut runs = Vec::with_capacity(containers);
    for i in 0..containers {
        let id = format!("bench-true-{i}");
        let t = std::time::Instant::now();
        c.create_container(&id, spec.clone(), "", None, false)
            .await?;
        c.start_container(&id).await?;
        let st = c.wait(&id, "").await?;
        runs.push(t.elapsed().as_secs_f64() * 1e3);
        c.remove_container(&id).await?;
        if st.exit_code != 0 {
            bail!("`true` exited with {}", st.exit_code);
        }
    }
    Ok(serde_json::json!({
        "health_rpc": summary(h),
        "container_create_start_wait_true": summary(runs),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_stats() {
        let s = summary(vec![5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!(s["median_ms"], 3.0);
        assert_eq!(s["min_ms"], 1.0);
        assert_eq!(s["max_ms"], 5.0);
        assert_eq!(s["n"], 5);
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("SIGKILL").unwrap(), 9);
        assert!(parse_signal("BOGUS").is_err());
    }

    #[test]
    fn spec_is_valid_oci() {
        let s = minimal_spec(
            "/containers/busybox",
            &["echo".into(), "hi".into()],
            Some("h"),
            Some(1 << 25),
            false,
        );
        let text = serde_json::to_string(&s).unwrap();
        // The agent parses specs with oci-spec; the same shape must be valid JSON
        // with the fields we rely on.
        assert_eq!(s["process"]["args"][1], "hi");
        assert_eq!(s["linux"]["resources"]["memory"]["limit"], 1 << 25);
        assert!(text.contains("\"hostname\":\"h\""));
    }

    #[test]
    fn update_resources_from_file_and_flags() {
        let file = br#"{"memory":{"limit":1048576,"swap":2097152},"unified":{"memory.high":"1"}}"#;
        let flags = ResourceFlags {
            memory: Some(4194304),
            cpuset_cpus: Some("0".into()),
            pids: Some(-1),
            ..Default::default()
        };
        let r = update_resources(Some(file), &flags).unwrap();
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["memory"]["limit"], 4194304, "flag over file");
        assert_eq!(v["memory"]["swap"], 2097152);
        assert_eq!(v["cpu"]["cpus"], "0");
        assert_eq!(v["pids"]["limit"], -1);
        assert_eq!(v["unified"]["memory.high"], "1");
        let none = update_resources(None, &ResourceFlags::default()).unwrap();
        assert_eq!(serde_json::to_value(&none).unwrap(), serde_json::json!({}));
        assert!(update_resources(Some(b"[1]"), &ResourceFlags::default()).is_err());
        assert!(update_resources(
            Some(br#"{"memory":{"limit":"x"}}"#),
            &ResourceFlags::default()
        )
        .is_err());
    }
}
