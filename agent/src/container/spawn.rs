//! clone(2) of the staged child. The child only moves file descriptors into
//! place, marks every other descriptor close-on-exec and execs the agent
//! binary again as `__stage2` (no allocation between clone and exec: the
//! agent is multi-threaded). Every descriptor the agent opens is
//! close-on-exec from birth, so another thread's clone cannot carry it
//! into a container; the sweep also catches any that is not.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
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
    let argv: [*const libc::c_char; 3] = [
        c"vmpod-agent".as_ptr(),
        c"__stage2".as_ptr(),
        std::ptr::null(),
    ];
    clone_exec(flags, stdio, exe, &argv)
}

/// Clone a child that gets `stdio` as fds 0-2 and the stage pipes as 3-5,
/// nothing else, and execs `exe` (an fd) with `argv` (NULL-terminated)
/// and an empty environment.
fn clone_exec(
    flags: i32,
    stdio: ChildStdio,
    exe: RawFd,
    argv: &[*const libc::c_char],
) -> std::io::Result<(i32, StagePipes)> {
    if argv.last() != Some(&std::ptr::null()) {
        return Err(std::io::Error::other("argv must end with NULL"));
    }
    let (config_r, config_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let (start_r, start_w) = pipe()?;
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
    // clobber one another, then into 0..5 (dup2 clears CLOEXEC). Every
    // other fd is then marked close-on-exec, so stage 2 starts with 0..5
    // only (the exe fd stays usable: execveat runs an ELF from a CLOEXEC
    // fd).
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
    cloexec_from(fds.len() as RawFd);
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

/// Mark every fd from `low` up close-on-exec: close_range(2) with
/// CLOSE_RANGE_CLOEXEC (Linux 5.11), else fcntl on each possible fd.
/// Async-signal-safe (used between clone and exec).
pub fn cloexec_from(low: RawFd) {
    // SAFETY: plain syscalls on fd numbers; no memory is touched.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            low as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur.min(1 << 20) as RawFd
        } else {
            1 << 16
        };
        for fd in low..max {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// `/dev/null` opened for a child's stdin.
pub fn dev_null() -> std::io::Result<OwnedFd> {
    Ok(File::open("/dev/null")?.into())
}

pub fn pipe_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    pipe()
}

/// A pty pair (master, slave) for terminal processes, both close-on-exec
/// from the start: /dev/ptmx opened with O_CLOEXEC, the slave with
/// TIOCGPTPEER (no path lookup) and O_CLOEXEC.
pub fn pty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    use nix::pty::{grantpt, posix_openpt, unlockpt};
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = posix_openpt(flags)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    // SAFETY: TIOCGPTPEER on our pty master returns a new fd or -1.
    let slave = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags.bits()) };
    if slave < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nothing else.
    Ok(unsafe {
        (
            OwnedFd::from_raw_fd(master.into_raw_fd()),
            OwnedFd::from_raw_fd(slave),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn cloexec(fd: RawFd) -> bool {
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        flags >= 0 && flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn pty_fds_are_cloexec() {
        let (master, slave) = pty().unwrap();
        assert!(cloexec(master.as_raw_fd()) && cloexec(slave.as_raw_fd()));
        // the pair is connected
        nix::unistd::write(&master, b"hi\n").unwrap();
        let mut buf = [0u8; 3];
        File::from(slave).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi\n");
    }

    #[test]
    fn child_gets_only_its_own_fds() {
        // An fd that is not close-on-exec, as another thread's openpty
        // used to leave for a moment: the child must not inherit it.
        let (keep, _w) = pipe().unwrap();
        // SAFETY: F_DUPFD (no CLOEXEC) of an fd we own; closed below.
        let stray = unsafe { libc::fcntl(keep.as_raw_fd(), libc::F_DUPFD, 100) };
        assert!(stray >= 100 && !cloexec(stray));
        let ls = File::open("/bin/ls").unwrap();
        let argv = [
            c"ls".as_ptr(),
            c"-1".as_ptr(),
            c"/proc/self/fd".as_ptr(),
            std::ptr::null(),
        ];
        let (out_r, out_w) = pipe().unwrap();
        let stdio = ChildStdio {
            stdin: dev_null().unwrap(),
            stdout: out_w,
            stderr: dev_null().unwrap(),
        };
        let r = clone_exec(0, stdio, ls.as_raw_fd(), &argv);
        // SAFETY: our own fd.
        unsafe { libc::close(stray) };
        let (pid, pipes) = r.unwrap();
        let mut out = String::new();
        File::from(out_r).read_to_string(&mut out).unwrap();
        drop(pipes);
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        let fds: Vec<RawFd> = out.lines().map(|l| l.trim().parse().unwrap()).collect();
        // 0-2 stdio, 3-5 stage pipes, and the one ls opens to list them.
        assert!(!fds.contains(&stray), "stray fd {stray} inherited: {fds:?}");
        assert!(fds.iter().all(|&fd| fd <= 8), "{fds:?}");
        assert!((0..6).all(|fd| fds.contains(&fd)), "{fds:?}");
    }

    #[test]
    fn cloexec_from_marks_everything_above() {
        // Two fds without CLOEXEC (nix's pipe() sets none).
        let (x, y) = nix::unistd::pipe().unwrap();
        let low = x.as_raw_fd().min(y.as_raw_fd());
        let high = x.as_raw_fd().max(y.as_raw_fd());
        assert!(!cloexec(low) && !cloexec(high));
        let (res_r, res_w) = pipe().unwrap();
        let res_w = res_w.as_raw_fd();
        // In a child, so the test process's fds stay as they are; the
        // verdict comes back through a pipe (a concurrent reaper test may
        // collect the child's exit status).
        // SAFETY: fork; the child only makes syscalls, then _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            cloexec_from(low);
            let verdict = if cloexec(low) && cloexec(high) {
                b"y"
            } else {
                b"n"
            };
            // SAFETY: write to an inherited fd, then exit without unwinding.
            unsafe {
                libc::write(res_w, verdict.as_ptr().cast(), 1);
                libc::_exit(0)
            };
        }
        assert!(pid > 0);
        let mut verdict = [0u8; 1];
        File::from(res_r).read_exact(&mut verdict).unwrap();
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        assert_eq!(&verdict, b"y");
        assert!(!cloexec(low), "the parent's fds are untouched");
    }
}
