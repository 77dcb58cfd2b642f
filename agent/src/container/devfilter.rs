//! The device cgroup of cgroup v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program
//! attached to the container's cgroup decides every open(2) and mknod(2)
//! of a device node by its process. The program is assembled here from the
//! spec's list (`linux.resources.devices`, followed by the runtime's
//! default allow list, see [`DEFAULT_ALLOWED`]), as runc does: the last
//! rule that matches decides. An allow rule matches when the device
//! matches and the access wants nothing beyond the rule's accesses (`r`,
//! `w`, `m`): accesses never add up across rules, so `c 1:* r` and
//! `c *:9 w` allow no read-write open of 1:9. A deny rule matches when
//! the device matches and the access wants any of its accesses. When no
//! rule matches, the access is denied.
//!
//! Program shape (eBPF; r1 = `struct bpf_cgroup_dev_ctx *`):
//! ```text
//!   r2 = ctx->access_type        r3 = r2 & 0xffff (type)   r4 = r2 >> 16 (access)
//!   r5 = ctx->major              r6 = ctx->minor
//!   for each rule, last first:   checks that jump past the block on
//!                                mismatch, the access check (allow:
//!                                r4 & ~bits == 0; deny: r4 & bits != 0),
//!                                then r0 = allow; exit
//!   r0 = 0; exit
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// `BPF_DEVCG_ACC_*`: what a process does with a device.
pub const ACC_MKNOD: u32 = 1;
pub const ACC_READ: u32 = 2;
pub const ACC_WRITE: u32 = 4;
const ACC_ALL: u32 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// `BPF_DEVCG_DEV_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevKind {
    Block = 1,
    Char = 2,
}

/// One entry of the allow/deny list; `None` = any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevRule {
    pub allow: bool,
    pub kind: Option<DevKind>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// `ACC_*` bits the rule covers: it matches an access that uses no
    /// other bit.
    pub access: u32,
}

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BpfInsn {
    pub code: u8,
    /// dst register in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcodes (class | op | source).
const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
const AND64_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
const RSH64_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// The devices every container may use whatever its list says, appended
/// after the spec's rules (as runc and the Kata agent do; containerd's CRI
/// sends only "deny all" and relies on them): mknod of any node (so the
/// spec's `linux.devices` can be created), and null, zero, full, random,
/// urandom, tty, console, ptmx and the pts.
pub fn default_rules() -> Vec<DevRule> {
    let c = |major: Option<u32>, minor: Option<u32>, access: u32| DevRule {
        allow: true,
        kind: Some(DevKind::Char),
        major,
        minor,
        access,
    };
    let mut v = vec![
        c(None, None, ACC_MKNOD),
        DevRule {
            kind: Some(DevKind::Block),
            ..c(None, None, ACC_MKNOD)
        },
    ];
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
    ] {
        v.push(c(Some(major), Some(minor), ACC_ALL));
    }
    v.push(c(Some(136), None, ACC_ALL));
    v
}

fn catch_all(r: &DevRule) -> bool {
    r.kind.is_none() && r.major.is_none() && r.minor.is_none()
}

/// One rule: a jump past the block for each of type, major and minor
/// that does not match and for an access the rule does not cover, then
/// the verdict. `None` marks a block that always decides (allow of every
/// access to every device): nothing after it is reachable.
fn rule_block(r: &DevRule) -> (Vec<BpfInsn>, bool) {
    let checks: Vec<(u8, i32)> = [
        r.kind.map(|k| (3, k as i32)),
        r.major.map(|m| (5, m as i32)),
        r.minor.map(|m| (6, m as i32)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let bits = r.access & ACC_ALL;
    // allow: matches when the access wants no bit outside the rule's;
    // deny: when it wants any of the rule's bits.
    let access_check = if r.allow {
        (bits != ACC_ALL).then_some((!bits & ACC_ALL, JNE_K))
    } else {
        Some((bits, JEQ_K))
    };
    let len = checks.len() + access_check.map_or(0, |_| 3) + 2;
    let mut out = Vec::with_capacity(len);
    for (reg, val) in &checks {
        let skip = len - out.len() - 1;
        out.push(insn(JNE_K, *reg, 0, skip as i16, *val));
    }
    if let Some((mask, jump)) = access_check {
        out.push(insn(MOV64_X, 7, 4, 0, 0));
        out.push(insn(AND64_K, 7, 0, 0, mask as i32));
        let skip = len - out.len() - 1;
        out.push(insn(jump, 7, 0, skip as i16, 0));
    }
    out.push(insn(MOV64_K, 0, 0, 0, i32::from(r.allow)));
    out.push(insn(EXIT, 0, 0, 0, 0));
    let always = checks.is_empty() && access_check.is_none();
    (out, always)
}

/// Assemble the filter for `rules` (in list order: the last matching
/// rule decides).
pub fn program(rules: &[DevRule]) -> Vec<BpfInsn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(MOV64_X, 3, 2, 0, 0),
        insn(AND64_K, 3, 0, 0, 0xffff),
        insn(MOV64_X, 4, 2, 0, 0),
        insn(RSH64_K, 4, 0, 0, 16),
        insn(LDX_W, 5, 1, 4, 0),
        insn(LDX_W, 6, 1, 8, 0),
    ];
    // A rule for every device and every access decides alone: the rules
    // before the last such one are never reached.
    let start = rules
        .iter()
        .rposition(|r| catch_all(r) && r.access & ACC_ALL == ACC_ALL)
        .unwrap_or(0);
    for r in rules[start..].iter().rev() {
        let (block, always) = rule_block(r);
        p.extend(block);
        if always {
            // The verifier refuses unreachable instructions.
            return p;
        }
    }
    p.extend([insn(MOV64_K, 0, 0, 0, 0), insn(EXIT, 0, 0, 0, 0)]);
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The part of `union bpf_attr` that BPF_PROG_LOAD reads.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The part of `union bpf_attr` that BPF_PROG_ATTACH reads.
#[repr(C)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a live, properly laid out prefix of union bpf_attr;
    // the kernel reads (and for logs writes) only within its size and the
    // buffers it points to.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn load(prog: &[BpfInsn]) -> std::io::Result<OwnedFd> {
    let license = c"Apache-2.0";
    let mut name = [0u8; 16];
    name[..12].copy_from_slice(b"vmpod_devcg\0");
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    let fd = match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => fd,
        Err(e) => {
            // Again with the verifier's log, to say why.
            let mut log = vec![0u8; 16 << 10];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(BPF_PROG_LOAD, &mut attr);
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let last = text.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
            return Err(std::io::Error::new(
                e.kind(),
                format!("load device filter: {e}; verifier: {last}"),
            ));
        }
    };
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Load the program and attach it to the cgroup directory `dir`,
/// replacing the program attached there before (if any).
pub fn attach(dir: &Path, prog: &[BpfInsn]) -> std::io::Result<()> {
    let cg = std::fs::File::open(dir)?;
    let p = load(prog)?;
    let mut attr = ProgAttachAttr {
        target_fd: cg.as_raw_fd() as u32,
        attach_bpf_fd: p.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        // Single program per cgroup: attaching again replaces it.
        attach_flags: 0,
        replace_bpf_fd: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr)
        .map(drop)
        .map_err(|e| std::io::Error::new(e.kind(), format!("attach device filter: {e}")))
}

#[cfg(test)]
mod tests;
