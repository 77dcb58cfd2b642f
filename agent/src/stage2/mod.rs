//! The staged child: `vmpod-agent __stage2`, exec'd by the agent right after
//! clone(2) into fresh namespaces (or, for exec, into the container's PID
//! namespace). It is single-threaded and runs these stages in order:
//!
//! 1. read its [`StageConfig`] from fd 3 (JSON, to EOF);
//! 2. namespaces: unshare the cgroup namespace (init) or join the
//!    container's ipc/uts/mnt namespaces (exec);
//! 3. rootfs (init only, `rootfs.rs`): mounts, /dev, move to `/`, sysctls,
//!    masked and read-only paths, read-only root; hostname;
//! 4. process: rlimits, oom_score_adj, user lookup, cwd, executable lookup;
//! 5. identity (`identity.rs`): groups, uid/gid, capabilities, no_new_privs;
//! 6. report `ready` on fd 4 and block on fd 5 until the agent says start;
//! 7. seccomp, then execve. Any failure is written to fd 4 as
//!    `error: <message>` and the child exits; a successful execve closes fd 4
//!    (CLOEXEC), which the agent reads as success. Every fd from 3 up is
//!    close-on-exec by then, so the process starts with 0-2 only.

mod identity;
mod resolve;
mod rootfs;

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};

use crate::container::config::{ProcessConfig, StageConfig, StageMode};

pub const CONFIG_FD: RawFd = 3;
pub const STATUS_FD: RawFd = 4;
pub const START_FD: RawFd = 5;

type StageResult<T> = Result<T, String>;

trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> StageResult<T>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> StageResult<T> {
        self.map_err(|e| format!("{}: {e}", what()))
    }
}

/// Entry point; never returns.
pub fn main() -> ! {
    // SAFETY: fds 3..5 are set up by the agent's clone child for us.
    let mut status = unsafe { File::from_raw_fd(STATUS_FD) };
    let code = match run(&mut status) {
        Ok(never) => match never {},
        Err(msg) => {
            let _ = status.write_all(format!("error: {msg}\n").as_bytes());
            1
        }
    };
    std::process::exit(code)
}

enum Never {}

fn run(status: &mut File) -> StageResult<Never> {
    for fd in [STATUS_FD, START_FD] {
        set_cloexec(fd)?;
    }
    // Whatever else we were handed ends at exec: the container's process
    // gets 0-2 only (the status pipe closing at exec reports success).
    // Done here, before any seccomp filter could deny close_range(2);
    // everything stage 2 opens later is close-on-exec (std opens so).
    crate::container::spawn::cloexec_from(CONFIG_FD);
    // Stage 1: configuration.
    let mut buf = Vec::new();
    // SAFETY: fd 3 is ours (see above).
    unsafe { File::from_raw_fd(CONFIG_FD) }
        .read_to_end(&mut buf)
        .ctx(|| "reading stage config".into())?;
    let cfg: StageConfig = serde_json::from_slice(&buf).ctx(|| "parsing stage config".into())?;
    let p = &cfg.process;

    nix::unistd::setsid().ctx(|| "setsid".into())?;
    if p.terminal {
        // SAFETY: plain ioctl on our stdin (the pty slave).
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY as _, 0) } < 0 {
            return Err(format!("TIOCSCTTY: {}", std::io::Error::last_os_error()));
        }
    }

    // Stages 2 and 3: namespaces and root filesystem.
    match &cfg.mode {
        StageMode::Init(root) => {
            join_namespaces(&root.join_namespaces)?;
            if root.new_cgroupns {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
                    .ctx(|| "unshare cgroup namespace".into())?;
            }
            rootfs::setup(root)?;
            if let Some(h) = &root.hostname {
                nix::unistd::sethostname(h).ctx(|| format!("sethostname {h:?}"))?;
            }
            if let Some(d) = &root.domainname {
                let c = CString::new(d.as_str()).ctx(|| "domainname".into())?;
                // SAFETY: valid C string and length.
                if unsafe { libc::setdomainname(c.as_ptr(), d.len()) } < 0 {
                    return Err(format!(
                        "setdomainname: {}",
                        std::io::Error::last_os_error()
                    ));
                }
            }
        }
        StageMode::Exec { namespaces } => join_namespaces(namespaces)?,
    }

    // Stage 4: process attributes. The agent's own open-file limit is not
    // the container's: start from the default, then the spec's.
    let nofile = libc::rlimit {
        rlim_cur: crate::pid1::CONTAINER_NOFILE.0,
        rlim_max: crate::pid1::CONTAINER_NOFILE.1,
    };
    // SAFETY: valid rlimit struct. Lowering needs no privilege; a failure
    // leaves the inherited limit, which is only more generous.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &nofile) };
    for r in &p.rlimits {
        let lim = libc::rlimit {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        // SAFETY: valid rlimit struct.
        if unsafe { libc::setrlimit(r.resource as _, &lim) } < 0 {
            return Err(format!(
                "setrlimit {}: {}",
                r.resource,
                std::io::Error::last_os_error()
            ));
        }
    }
    if let Some(adj) = p.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .ctx(|| format!("oom_score_adj {adj}"))?;
    }
    let ids = identity::resolve_user(&p.user)?;
    let mut env = p.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", ids.home));
    }
    let cwd = if p.cwd.is_empty() {
        "/"
    } else {
        p.cwd.as_str()
    };
    std::env::set_current_dir(cwd).ctx(|| format!("cwd {cwd:?}"))?;
    let exe = find_executable(&p.args[0], &env)?;

    // Stage 5: identity. Without no_new_privs, installing a filter needs
    // CAP_SYS_ADMIN, which a non-root user is about to lose: install first.
    if !p.no_new_privs {
        for prog in &p.seccomp {
            install_seccomp(prog, p.seccomp_flags)?;
        }
    }
    identity::apply(&ids, p)?;

    // Stage 6: ready; wait for start.
    status.write_all(b"ready\n").ctx(|| "report ready".into())?;
    let mut go = [0u8; 1];
    // SAFETY: fd 5 is ours.
    let n = unsafe { File::from_raw_fd(START_FD) }
        .read(&mut go)
        .ctx(|| "waiting for start".into())?;
    if n == 0 {
        // The agent gave up on us (container removed before start).
        std::process::exit(0);
    }

    // Stage 7: seccomp and exec.
    reset_signals();
    exec(&exe, p, &env)
}

fn set_cloexec(fd: RawFd) -> StageResult<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(drop)
        .ctx(|| format!("cloexec fd {fd}"))
}

fn join_namespaces(paths: &[String]) -> StageResult<()> {
    // Open all first: once in the container's mount namespace the agent's
    // /proc is gone.
    let files: Vec<(String, File)> = paths
        .iter()
        .map(|p| {
            File::open(p)
                .map(|f| (p.clone(), f))
                .ctx(|| format!("open {p}"))
        })
        .collect::<StageResult<_>>()?;
    for (p, f) in files {
        nix::sched::setns(f, nix::sched::CloneFlags::empty()).ctx(|| format!("setns {p}"))?;
    }
    Ok(())
}

fn find_executable(arg0: &str, env: &[String]) -> StageResult<String> {
    use nix::unistd::{access, AccessFlags};
    let ok = |p: &str| {
        std::fs::metadata(p).map(|m| m.is_file()).unwrap_or(false)
            && access(p, AccessFlags::X_OK).is_ok()
    };
    if arg0.contains('/') {
        return if ok(arg0) {
            Ok(arg0.to_string())
        } else {
            Err(format!("executable {arg0:?} not found or not executable"))
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{d}/{arg0}"))
        .find(|c| ok(c))
        .ok_or_else(|| format!("executable {arg0:?} not found in PATH {path:?}"))
}

fn reset_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for s in Signal::iterator() {
        if s != Signal::SIGKILL && s != Signal::SIGSTOP {
            // SAFETY: resetting to the default disposition.
            let _ = unsafe { sigaction(s, &dfl) };
        }
    }
    let _ = SigSet::all().thread_unblock();
}

fn exec(exe: &str, p: &ProcessConfig, env: &[String]) -> StageResult<Never> {
    let cstr = |s: &str| CString::new(s).ctx(|| format!("NUL in {s:?}"));
    let path = cstr(exe)?;
    let args: Vec<CString> = p.args.iter().map(|a| cstr(a)).collect::<StageResult<_>>()?;
    let envs: Vec<CString> = env.iter().map(|a| cstr(a)).collect::<StageResult<_>>()?;
    if p.no_new_privs {
        for prog in &p.seccomp {
            install_seccomp(prog, p.seccomp_flags)?;
        }
    }
    let e = nix::unistd::execve(&path, &args, &envs).unwrap_err();
    Err(format!("exec {exe:?}: {e}"))
}

/// seccomp(2) SECCOMP_SET_MODE_FILTER with the profile's flags
/// (`SECCOMP_FILTER_FLAG_*`).
fn install_seccomp(prog: &[crate::container::config::SockFilter], flags: u32) -> StageResult<()> {
    let filters: Vec<libc::sock_filter> = prog
        .iter()
        .map(|f| libc::sock_filter {
            code: f.code,
            jt: f.jt,
            jf: f.jf,
            k: f.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: filters.len() as u16,
        filter: filters.as_ptr() as *mut _,
    };
    // SAFETY: fprog points at a live, well-formed program. Without
    // no_new_privs this needs CAP_SYS_ADMIN, which root has until exec.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER as libc::c_ulong,
            flags as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(format!(
            "install seccomp filter: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn executable_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let tool = bin.join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = bin.join("data");
        std::fs::write(&data, "x").unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
        let env = vec![format!("PATH=/nonexistent:{}", bin.display())];
        assert_eq!(
            find_executable("tool", &env).unwrap(),
            tool.to_string_lossy()
        );
        assert_eq!(
            find_executable(tool.to_str().unwrap(), &env).unwrap(),
            tool.to_string_lossy()
        );
        let e = find_executable("missing", &env).unwrap_err();
        assert!(e.contains("\"missing\" not found in PATH"), "{e}");
        // a directory or a non-executable file is not a command
        assert!(find_executable(bin.to_str().unwrap(), &env).is_err());
        // (access(2) X_OK fails even for root without any x bit)
        assert!(find_executable("data", &env).is_err());
    }
}
