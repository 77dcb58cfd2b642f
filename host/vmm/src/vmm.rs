//! The run loop: vCPU threads plus one event loop thread (the caller's)
//! that waits for guest exit, SIGTERM/SIGINT, and device back-end I/O.

use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};
use vmpod_runtime::hypervisor::ExitReason;

use crate::builder::{BuiltVm, IoBuses};
use crate::devices::ExitSignal;
use crate::event_loop;
use crate::hypervisor::{Vcpu, VcpuExit};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("event loop set-up ({op}): {source}")]
    Setup {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handler: {0}")]
    Signal(String),
    #[error("event loop set-up: {0}")]
    EventLoop(String),
    #[error("spawning vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Where the SIGTERM/SIGINT handler writes (an eventfd), or -1.
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a local.
        unsafe {
            libc::write(fd, (&one as *const u64).cast(), 8);
        }
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn vcpu_kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// SIGTERM/SIGINT turned into an event the run loop watches. Install it
/// before [`crate::builder::build`]: building binds the vsock socket, and a
/// stop signal taking its default action (death) after that would leave
/// the socket file behind; with the handler in place the run ends at once
/// as `Stopped` and removes it.
pub struct StopSignal {
    evt: Arc<EventFd>,
}

impl StopSignal {
    pub fn install() -> Result<StopSignal, Error> {
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|source| Error::Setup {
            op: "eventfd",
            source,
        })?);
        STOP_FD.store(evt.as_raw_fd(), Ordering::SeqCst);
        for sig in [libc::SIGTERM, libc::SIGINT] {
            register_signal_handler(sig, on_stop_signal)
                .map_err(|e| Error::Signal(e.to_string()))?;
        }
        Ok(StopSignal { evt })
    }

    /// Did a stop signal arrive already (consumes it)?
    fn take_early(&self) -> bool {
        self.evt.read().is_ok()
    }
}

impl Drop for StopSignal {
    fn drop(&mut self) {
        // The handlers stay; with no fd they do nothing.
        STOP_FD.store(-1, Ordering::SeqCst);
    }
}

/// Run the VM until it stops; returns why.
pub fn run(vm: BuiltVm, stop_signal: StopSignal) -> Result<ExitReason, Error> {
    let BuiltVm {
        vcpus,
        vm: _vm_fd,
        mem: _mem,
        io,
        exit,
        virtio,
        serial,
        vsock_uds,
        cmdline: _,
    } = vm;

    register_signal_handler(vcpu_kick_signal(), on_kick)
        .map_err(|e| Error::Signal(e.to_string()))?;

    let mut event_loop = event_loop::setup(event_loop::LoopParts {
        exit: exit.clone(),
        stop: stop_signal.evt.clone(),
        virtio: virtio.clone(),
        serial: serial.clone(),
    })
    .map_err(Error::EventLoop)?;

    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    // Stopped while it was being built: the guest never runs.
    let stopped_early = stop_signal.take_early();
    let vcpus = if stopped_early { Vec::new() } else { vcpus };
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let (io, exit, stop) = (io.clone(), exit.clone(), stop.clone());
        let h = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_loop(id, vcpu, &io, &exit, &stop))
            .map_err(Error::Spawn)?;
        threads.push(h);
    }

    let started = Instant::now();
    let reason = if stopped_early {
        tracing::info!("stop signal received while the VM was built");
        ExitReason::Stopped
    } else {
        event_loop.run()
    };
    drop(event_loop);
    tracing::info!(
        ?reason,
        uptime_ms = started.elapsed().as_millis() as u64,
        "VM stopping"
    );

    stop.store(true, Ordering::SeqCst);
    join_vcpus(threads);
    serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .sink_mut()
        .finish();
    drop(stop_signal);
    for t in &virtio {
        let (name, stats) = t.lock().unwrap_or_else(|e| e.into_inner()).device().stats();
        tracing::info!(device = name, %stats, "device stats");
    }
    // Devices (and their sockets, TAP fds) go away with `virtio`.
    drop(virtio);
    let _ = std::fs::remove_file(&vsock_uds);
    Ok(reason)
}

/// Kick vCPU threads out of KVM_RUN until they notice `stop` and exit.
fn join_vcpus(threads: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    for h in threads {
        while !h.is_finished() && Instant::now() < deadline {
            let _ = h.kill(vcpu_kick_signal());
            std::thread::sleep(Duration::from_millis(5));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            tracing::warn!("vCPU thread did not stop; leaving it to process exit");
        }
    }
}

fn vcpu_loop(
    id: usize,
    mut vcpu: Box<dyn Vcpu>,
    io: &IoBuses,
    exit: &ExitSignal,
    stop: &AtomicBool,
) {
    loop {
        if stop.load(Ordering::SeqCst) {
            // Where the guest was: handy when a guest hangs (e.g. SMP
            // bring-up on PVM); resolve with `nm vmlinux`.
            if let Ok(r) = vcpu.get_regs() {
                tracing::debug!(
                    vcpu = id,
                    rip = format_args!("{:#x}", r.rip),
                    rsp = format_args!("{:#x}", r.rsp),
                    "vCPU stopped"
                );
            }
            return;
        }
        let r = match vcpu.run(io) {
            Ok(VcpuExit::Handled) | Ok(VcpuExit::Interrupted) => continue,
            Ok(VcpuExit::Hlt) => {
                // Only reached without an in-kernel LAPIC; treat as power-off.
                ExitReason::PowerOff
            }
            Ok(VcpuExit::Shutdown) => {
                tracing::info!(vcpu = id, "triple fault / shutdown");
                exit.request_reset();
                return;
            }
            Ok(VcpuExit::PowerOff) => ExitReason::PowerOff,
            Ok(VcpuExit::Reset) => {
                exit.request_reset();
                return;
            }
            Ok(VcpuExit::InternalError { suberror, data }) => ExitReason::Crashed(format!(
                "KVM internal error on vCPU {id}: suberror {suberror} ({}), data {:x?}",
                internal_error_name(suberror),
                data
            )),
            Ok(VcpuExit::FailEntry(reason)) => {
                ExitReason::Crashed(format!("VM entry failed on vCPU {id}: reason {reason:#x}"))
            }
            Ok(VcpuExit::Unexpected(what)) => {
                ExitReason::Crashed(format!("unexpected exit on vCPU {id}: {what}"))
            }
            Err(e) => ExitReason::Crashed(format!("vCPU {id}: {e}")),
        };
        exit.request(r);
        return;
    }
}

fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicUsize;

    use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_sregs, CpuId};

    use super::*;
    use crate::devices::bus::Bus;
    use crate::hypervisor::{self, IoHandler};

    /// A vCPU that returns scripted exits (then stops the test with an
    /// error if the loop asks for more) and counts `run` calls.
    struct FakeVcpu {
        exits: VecDeque<hypervisor::Result<VcpuExit>>,
        runs: Arc<AtomicUsize>,
    }

    impl Vcpu for FakeVcpu {
        fn set_cpuid(&self, _: &CpuId) -> hypervisor::Result<()> {
            Ok(())
        }
        fn set_msrs(&self, msrs: &[(u32, u64)]) -> hypervisor::Result<usize> {
            Ok(msrs.len())
        }
        fn get_regs(&self) -> hypervisor::Result<kvm_regs> {
            Ok(kvm_regs::default())
        }
        fn set_regs(&self, _: &kvm_regs) -> hypervisor::Result<()> {
            Ok(())
        }
        fn get_sregs(&self) -> hypervisor::Result<kvm_sregs> {
            Ok(kvm_sregs::default())
        }
        fn set_sregs(&self, _: &kvm_sregs) -> hypervisor::Result<()> {
            Ok(())
        }
        fn set_fpu(&self, _: &kvm_fpu) -> hypervisor::Result<()> {
            Ok(())
        }
        fn get_lapic(&self) -> hypervisor::Result<kvm_lapic_state> {
            Ok(kvm_lapic_state::default())
        }
        fn set_lapic(&self, _: &kvm_lapic_state) -> hypervisor::Result<()> {
            Ok(())
        }
        fn run(&mut self, _io: &dyn IoHandler) -> hypervisor::Result<VcpuExit> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            self.exits
                .pop_front()
                .unwrap_or_else(|| Ok(VcpuExit::Unexpected("script exhausted".into())))
        }
        fn set_immediate_exit(&mut self, _: bool) {}
    }

    /// Run `vcpu_loop` on vCPU 1 over `exits`; returns the VM's exit reason
    /// and how often the vCPU ran. `panic` is noted on the console first.
    fn run_script(
        exits: Vec<hypervisor::Result<VcpuExit>>,
        panic: Option<&str>,
        stop: bool,
    ) -> (Option<ExitReason>, usize) {
        let runs = Arc::new(AtomicUsize::new(0));
        let vcpu = Box::new(FakeVcpu {
            exits: exits.into(),
            runs: runs.clone(),
        });
        let io = IoBuses {
            pio: Bus::new(),
            mmio: Bus::new(),
        };
        let exit = ExitSignal::new().unwrap();
        if let Some(p) = panic {
            exit.note_panic(p);
        }
        vcpu_loop(1, vcpu, &io, &exit, &AtomicBool::new(stop));
        (exit.reason(), runs.load(Ordering::SeqCst))
    }

    fn crash(exits: Vec<hypervisor::Result<VcpuExit>>) -> String {
        match run_script(exits, None, false).0 {
            Some(ExitReason::Crashed(why)) => why,
            other => panic!("expected a crash, got {other:?}"),
        }
    }

    #[test]
    fn internal_error_is_guest_death_with_its_reason() {
        let why = crash(vec![
            Ok(VcpuExit::Handled),
            Ok(VcpuExit::InternalError {
                suberror: 1,
                data: vec![0x1f, 0x2],
            }),
        ]);
        assert_eq!(
            why,
            "KVM internal error on vCPU 1: suberror 1 (emulation failure), data [1f, 2]"
        );
        let why = crash(vec![Ok(VcpuExit::InternalError {
            suberror: 77,
            data: vec![],
        })]);
        assert!(why.contains("suberror 77 (unknown)"), "{why}");
    }

    #[test]
    fn shutdown_and_reset_are_a_reboot_or_the_noted_panic() {
        let (r, runs) = run_script(vec![Ok(VcpuExit::Shutdown)], None, false);
        assert_eq!(r, Some(ExitReason::Reboot));
        assert_eq!(runs, 1, "the vCPU stops after the exit");
        let (r, _) = run_script(vec![Ok(VcpuExit::Reset)], None, false);
        assert_eq!(r, Some(ExitReason::Reboot));
        let line = "Kernel panic - not syncing: VFS: Unable to mount root fs";
        let (r, _) = run_script(vec![Ok(VcpuExit::Shutdown)], Some(line), false);
        assert_eq!(r, Some(ExitReason::Crashed(line.into())));
        let (r, _) = run_script(vec![Ok(VcpuExit::Reset)], Some(line), false);
        assert_eq!(r, Some(ExitReason::Crashed(line.into())));
    }

    #[test]
    fn power_off_and_hlt_are_a_clean_power_off() {
        let (r, runs) = run_script(
            vec![
                Ok(VcpuExit::Handled),
                Ok(VcpuExit::Interrupted),
                Ok(VcpuExit::Handled),
                Ok(VcpuExit::PowerOff),
            ],
            None,
            false,
        );
        assert_eq!(r, Some(ExitReason::PowerOff));
        assert_eq!(runs, 4, "handled and interrupted exits run again");
        let (r, _) = run_script(vec![Ok(VcpuExit::Hlt)], None, false);
        assert_eq!(r, Some(ExitReason::PowerOff));
    }

    #[test]
    fn failed_entry_unexpected_exits_and_errors_are_crashes() {
        assert_eq!(
            crash(vec![Ok(VcpuExit::FailEntry(0x21))]),
            "VM entry failed on vCPU 1: reason 0x21"
        );
        assert_eq!(
            crash(vec![Ok(VcpuExit::Unexpected("Debug".into()))]),
            "unexpected exit on vCPU 1: Debug"
        );
        let why = crash(vec![Err(hypervisor::Error::Ioctl {
            op: "KVM_RUN",
            source: kvm_ioctls::Error::new(libc::EFAULT),
        })]);
        assert!(why.starts_with("vCPU 1: KVM ioctl KVM_RUN failed"), "{why}");
    }

    /// Once installed (before build), SIGTERM is an event, not death.
    #[test]
    fn stop_signal_turns_sigterm_into_an_event() {
        let s = StopSignal::install().unwrap();
        assert!(!s.take_early());
        // SAFETY: raise(3) on this process; our handler only writes an
        // eventfd.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert!(s.take_early(), "the handler wrote the event");
        assert!(!s.take_early(), "consumed");
    }

    #[test]
    fn a_stopped_vm_does_not_run_its_vcpus() {
        let (r, runs) = run_script(vec![Ok(VcpuExit::PowerOff)], None, true);
        assert_eq!(r, None, "stopping is the event loop's decision");
        assert_eq!(runs, 0);
    }
}
