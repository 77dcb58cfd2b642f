//! clone(2) of the staged child. The child only moves file descriptors into
//! place and execs the agent binary again as `__stage2` (no allocation
//! between clone and exec: the agent is multi-threaded).

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use nix::fcntl::OFlag;

static AGENT_EXE: OnceLock<OwnedFd> = OnceLock::new();

/// Open our own executable once (before containers change anything).
pub fn init_self_exe() -> std::io::Result<()> {
    let f = File::open("/proc/self/exe")?;
    let _ = AGENT_EXE.set(f.into());
    Ok(())
}

/// Parent ends of the stage pipes.
pub struct StagePipes {
    pub config: File,
    pub status: File,
    pub start: File,
}

/// Child stdio (fds 0,1,2), closed in the parent after the clone.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// Clone a child with `flags` (`CLONE_NEW*`) that becomes `__stage2`.
/// Returns its pid (in our PID namespace) and our ends of its pipes.
pub fn clone_stage2(flags: i32, stdio: ChildStdio) -> std::io::Result<(i32, StagePipes)> {
    let exe = AGENT_EXE
        .get()
        .ok_or_else(|| std::io::Error::other("agent executable not opened"))?
        .as_raw_fd();
    let (config_r, config_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let (start_r, start_w) = pipe()?;
    let argv: [*const libc::c_char; 3] = [
        c"vmpod-agent".as_ptr(),
        c"__stage2".as_ptr(),
        std::ptr::null(),
    ];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let empty = c"";
    let fds: [RawFd; 6] = [
        stdio.stdin.as_raw_fd(),
        stdio.stdout.as_raw_fd(),
        stdio.stderr.as_raw_fd(),
        config_r.as_raw_fd(),
        status_w.as_raw_fd(),
        start_r.as_raw_fd(),
    ];
    // SAFETY: fork-like clone (no new stack, no CLONE_VM). The child runs
    // only async-signal-safe syscalls on memory prepared above, then execs
    // or _exits.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: child side, see above.
        unsafe { child(exe, &fds, argv.as_ptr(), envp.as_ptr(), empty.as_ptr()) }
    }
    drop((config_r, status_w, start_r, stdio));
    Ok((
        pid as i32,
        StagePipes {
            config: File::from(config_w),
            status: File::from(status_r),
            start: File::from(start_w),
        },
    ))
}

unsafe fn child(
    exe: RawFd,
    fds: &[RawFd; 6],
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    empty: *const libc::c_char,
) -> ! {
    // Move every fd we need above 10 first, so that the dup2s below cannot
    // clobber one another, then into 0..5 (dup2 clears CLOEXEC).
    let exe = libc::fcntl(exe, libc::F_DUPFD_CLOEXEC, 10);
    if exe < 0 {
        libc::_exit(120);
    }
    let mut high = [0; 6];
    for (i, fd) in fds.iter().enumerate() {
        high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
        if high[i] < 0 {
            libc::_exit(121);
        }
    }
    for (i, fd) in high.iter().enumerate() {
        if libc::dup2(*fd, i as RawFd) < 0 {
            libc::_exit(122);
        }
    }
    libc::syscall(
        libc::SYS_execveat,
        exe,
        empty,
        argv,
        envp,
        libc::AT_EMPTY_PATH,
    );
    libc::_exit(123);
}

/// `/dev/null` opened for a child's stdin.
pub fn dev_null() -> std::io::Result<OwnedFd> {
    Ok(File::open("/dev/null")?.into())
}

pub fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    pipe()
}

/// A pty pair (master, slave) for terminal processes.
pub fn pty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let r = nix::pty::openpty(None, None)?;
    for fd in [&r.master, &r.slave] {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
    }
    Ok((r.master, r.slave))
}
