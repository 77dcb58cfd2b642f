//! Driving a microVM from a test: the `vmpod vm run` command line, its
//! serial console log, its exit reason, and host-initiated connections over
//! its hybrid vsock socket (Firecracker-style `CONNECT <port>` on a unix
//! socket).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmpod_runtime::hypervisor::ExitReason;

/// File names inside a VM's directory (see [`vm_run_command`]).
pub const VSOCK_UDS: &str = "vm.vsock";
pub const CONSOLE_LOG: &str = "console.log";
pub const EXIT_JSON: &str = "exit.json";

/// `vmpod vm run` with the VM's files in `dir` (hybrid vsock socket
/// [`VSOCK_UDS`], console log [`CONSOLE_LOG`]) and stdout/stderr piped.
/// The caller adds the hypervisor, kernel, command line, sizes and devices.
pub fn vm_run_command(dir: &Path) -> Command {
    let mut cmd = Command::new(crate::vmpod_bin());
    cmd.args(["vm", "run"])
        .arg("--vsock-uds")
        .arg(dir.join(VSOCK_UDS))
        .arg("--console-log")
        .arg(dir.join(CONSOLE_LOG))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `build/guest/vmlinux`; panics naming `make guest-kernel` when missing.
pub fn guest_kernel() -> PathBuf {
    let kernel = crate::build_dir().join("guest/vmlinux");
    assert!(
        kernel.exists(),
        "{} missing: run `make guest-kernel` first",
        kernel.display()
    );
    kernel
}

/// A VM run in `dir` ended by a guest power-off: exit status 0 and
/// [`ExitReason::PowerOff`] in [`EXIT_JSON`], and its vsock socket removed.
pub fn assert_powered_off(out: &Output, dir: &Path) {
    assert!(
        out.status.success(),
        "power-off → exit 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(exit_reason(&dir.join(EXIT_JSON)), ExitReason::PowerOff);
    assert!(!dir.join(VSOCK_UDS).exists(), "vsock socket removed");
}

/// The exit reason `vmpod vm run --exit-json PATH` wrote.
pub fn exit_reason(path: &Path) -> ExitReason {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Wait until the console log `log` contains `needle`; returns the whole
/// log. With a `child` (the VM process): panics if it exits first (with its
/// stderr when piped) and kills it when `timeout` passes. Panics with the
/// log after `timeout`.
pub fn wait_console(
    log: &Path,
    needle: &str,
    timeout: Duration,
    mut child: Option<&mut Child>,
) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if let Some(c) = child.as_deref_mut() {
            if let Some(status) = c.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(e) = c.stderr.as_mut() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!(
                    "VM exited ({status}) before printing {needle:?}\nstderr: {err}\nconsole:\n{text}"
                );
            }
        }
        if start.elapsed() > timeout {
            if let Some(c) = child.as_deref_mut() {
                let _ = c.kill();
            }
            panic!("no {needle:?} within {timeout:?}; console:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The rest of the first console line starting with `key` (e.g.
/// `VMPOD-NPROC=`), without a trailing `\r`; panics if there is none.
pub fn console_value(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} not on the console:\n{text}"))
        .to_string()
}

/// Open a host-initiated hybrid-vsock connection to guest `port` through
/// the VM's socket `uds` (`CONNECT <port>` in one write, then the `OK`
/// line read byte by byte, so nothing the guest sends after it is
/// consumed); `timeout` applies to every read on the returned stream.
pub fn hybrid_connect(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("writing CONNECT: {e}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        s.read_exact(&mut byte)
            .map_err(|e| format!("handshake reply: {e}"))?;
        line.push(byte[0]);
    }
    if line.starts_with(b"OK ") {
        Ok(s)
    } else {
        Err(format!(
            "hybrid vsock handshake answered {:?}",
            String::from_utf8_lossy(&line)
        ))
    }
}

/// Host-initiated hybrid-vsock connection to guest `port` through the VM's
/// socket `uds` ([`hybrid_connect`]), then one line each way; returns the
/// guest's reply line (trimmed). 20 s read timeout.
pub fn host_to_guest(uds: &Path, port: u32, line: &str) -> String {
    let mut s =
        hybrid_connect(uds, port, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    let mut r = BufReader::new(s.try_clone().unwrap());
    writeln!(s, "{line}").unwrap();
    let mut reply = String::new();
    r.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

/// Answer one guest-initiated connection to host port `port`: the VM's
/// vsock back-end forwards it to the unix socket `<uds>_<port>`, bound
/// here before the guest boots. Replies `host-got:<line>` to the first
/// line; the thread returns that line as received.
pub fn serve_guest_connect(uds: &Path, port: u32) -> JoinHandle<String> {
    let listener = UnixListener::bind(format!("{}_{port}", uds.display()))
        .expect("bind the guest → host vsock socket");
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        writeln!(s, "host-got:{}", line.trim_end()).unwrap();
        line
    })
}
