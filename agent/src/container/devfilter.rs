//! The device cgroup of cgroup v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program
//! attached to the container's cgroup decides every open(2) and mknod(2)
//! of a device node by its process. The program is assembled here from the
//! spec's list (`linux.resources.devices`), with the semantics of the
//! cgroup v1 device lists that the OCI list comes from: before the first
//! rule nothing is allowed; in order, a rule that matches the device adds
//! its accesses (`r`, `w`, `m`) if it allows, takes them away if it
//! denies; an access is let through when every access it needs is left.
//!
//! Program shape (eBPF; r1 = `struct bpf_cgroup_dev_ctx *`):
//! ```text
//!   r2 = ctx->access_type        r3 = r2 & 0xffff (type)   r4 = r2 >> 16 (access)
//!   r5 = ctx->major              r6 = ctx->minor           r7 = 0 (allowed)
//!   for each rule:               checks that jump past the block on
//!                                mismatch, then r7 |= bits (allow) or
//!                                r7 &= ~bits (deny)
//!   r0 = (r4 & ~r7) == 0; exit
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
const AND64_X: u8 = 0x5f; // BPF_ALU64 | BPF_AND | BPF_X
const OR64_K: u8 = 0x47; // BPF_ALU64 | BPF_OR | BPF_K
const XOR64_K: u8 = 0xa7; // BPF_ALU64 | BPF_XOR | BPF_K
const RSH64_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> BpfInsn {
    BpfInsn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

fn catch_all(r: &DevRule) -> bool {
    r.kind.is_none() && r.major.is_none() && r.minor.is_none()
}

/// One rule: a jump past the block for each of type, major and minor
/// that does not match, then the change to the allowed accesses (r7).
fn rule_block(r: &DevRule) -> Vec<BpfInsn> {
    let checks: Vec<(u8, i32)> = [
        r.kind.map(|k| (3, k as i32)),
        r.major.map(|m| (5, m as i32)),
        r.minor.map(|m| (6, m as i32)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let bits = (r.access & ACC_ALL) as i32;
    let mut out = Vec::with_capacity(checks.len() + 1);
    for (i, (reg, val)) in checks.iter().enumerate() {
        // Past the remaining checks and the update.
        let skip = checks.len() - i;
        out.push(insn(JNE_K, *reg, 0, skip as i16, *val));
    }
    out.push(if r.allow {
        insn(OR64_K, 7, 0, 0, bits)
    } else {
        insn(AND64_K, 7, 0, 0, !bits & ACC_ALL as i32)
    });
    out
}

/// Assemble the filter for `rules` (spec order).
pub fn program(rules: &[DevRule]) -> Vec<BpfInsn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(MOV64_X, 3, 2, 0, 0),
        insn(AND64_K, 3, 0, 0, 0xffff),
        insn(MOV64_X, 4, 2, 0, 0),
        insn(RSH64_K, 4, 0, 0, 16),
        insn(LDX_W, 5, 1, 4, 0),
        insn(LDX_W, 6, 1, 8, 0),
        insn(MOV64_K, 7, 0, 0, 0),
    ];
    // A rule for every device and every access decides alone: the rules
    // before the last such one change nothing.
    let start = rules
        .iter()
        .rposition(|r| catch_all(r) && r.access & ACC_ALL == ACC_ALL)
        .unwrap_or(0);
    for r in &rules[start..] {
        p.extend(rule_block(r));
    }
    p.extend([
        insn(MOV64_X, 8, 7, 0, 0),
        insn(XOR64_K, 8, 0, 0, ACC_ALL as i32),
        insn(AND64_X, 8, 4, 0, 0),
        insn(MOV64_K, 0, 0, 0, 0),
        insn(JNE_K, 8, 0, 1, 0),
        insn(MOV64_K, 0, 0, 0, 1),
        insn(EXIT, 0, 0, 0, 0),
    ]);
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
mod tests {
    use super::*;

    /// Runs the instruction subset `program` emits, as the kernel would.
    fn run(prog: &[BpfInsn], kind: DevKind, major: u32, minor: u32, access: u32) -> u64 {
        let ctx = [(access << 16) | kind as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0x0f) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1, "loads only from the context");
                    r[dst] = u64::from(ctx[i.off as usize / 4]);
                }
                MOV64_K => r[dst] = i.imm as i64 as u64,
                MOV64_X => r[dst] = r[src],
                AND64_K => r[dst] &= i.imm as i64 as u64,
                AND64_X => r[dst] &= r[src],
                OR64_K => r[dst] |= i.imm as i64 as u64,
                XOR64_K => r[dst] ^= i.imm as i64 as u64,
                RSH64_K => r[dst] >>= i.imm,
                JNE_K => {
                    if r[dst] != i.imm as i64 as u64 {
                        pc += i.off as usize;
                    }
                }
                EXIT => return r[0],
                other => panic!("opcode {other:#x}"),
            }
        }
        panic!("no exit");
    }

    fn rule(
        allow: bool,
        kind: Option<DevKind>,
        major: Option<u32>,
        minor: Option<u32>,
        access: u32,
    ) -> DevRule {
        DevRule {
            allow,
            kind,
            major,
            minor,
            access,
        }
    }

    const RW: u32 = ACC_READ | ACC_WRITE;

    #[test]
    fn kubernetes_default_list() {
        use DevKind::{Block, Char};
        // Deny everything, then containerd's usual allow list.
        let rules = vec![
            rule(false, None, None, None, ACC_ALL),
            rule(true, Some(Char), None, None, ACC_MKNOD),
            rule(true, Some(Block), None, None, ACC_MKNOD),
            rule(true, Some(Char), Some(1), Some(3), ACC_ALL),
            rule(true, Some(Char), Some(1), Some(8), ACC_ALL),
            rule(true, Some(Char), Some(136), None, ACC_ALL),
            rule(true, Some(Char), Some(5), Some(2), RW),
        ];
        let p = program(&rules);
        assert_eq!(run(&p, Char, 1, 3, ACC_READ), 1, "/dev/null");
        assert_eq!(run(&p, Char, 1, 8, RW), 1, "/dev/random");
        assert_eq!(run(&p, Char, 1, 5, ACC_READ), 0, "/dev/zero not listed");
        assert_eq!(run(&p, Char, 136, 7, RW), 1, "pts, any minor");
        assert_eq!(run(&p, Char, 5, 2, RW), 1, "ptmx rw");
        assert_eq!(run(&p, Char, 5, 2, ACC_MKNOD), 1, "mknod of any char");
        assert_eq!(run(&p, Block, 8, 0, ACC_MKNOD), 1, "mknod of any block");
        assert_eq!(run(&p, Block, 8, 0, ACC_READ), 0, "block read");
        assert_eq!(run(&p, Char, 10, 200, RW), 0, "tun not listed");
    }

    #[test]
    fn rules_apply_in_order_per_access() {
        use DevKind::Char;
        let rules = vec![
            rule(true, None, None, None, ACC_ALL),
            rule(false, Some(Char), Some(1), Some(5), ACC_WRITE),
        ];
        let p = program(&rules);
        assert_eq!(run(&p, Char, 1, 5, ACC_READ), 1, "read is not denied");
        assert_eq!(run(&p, Char, 1, 5, ACC_WRITE), 0);
        assert_eq!(
            run(&p, Char, 1, 5, RW),
            0,
            "read+write needs the denied write"
        );
        assert_eq!(run(&p, Char, 1, 3, RW), 1);
        // Allow r only: a read-write open is not allowed by it.
        let p = program(&[rule(true, Some(Char), Some(1), Some(3), ACC_READ)]);
        assert_eq!(run(&p, Char, 1, 3, ACC_READ), 1);
        assert_eq!(run(&p, Char, 1, 3, RW), 0);
        assert_eq!(run(&p, DevKind::Block, 1, 3, ACC_READ), 0, "type checked");
        // Accesses add up over rules; a later deny takes one back.
        let p = program(&[
            rule(true, Some(Char), Some(1), None, ACC_READ),
            rule(true, Some(Char), None, Some(9), ACC_WRITE),
            rule(false, Some(Char), Some(1), Some(9), ACC_READ),
        ]);
        assert_eq!(run(&p, Char, 1, 8, ACC_READ), 1);
        assert_eq!(run(&p, Char, 1, 8, RW), 0);
        assert_eq!(run(&p, Char, 1, 9, ACC_WRITE), 1);
        assert_eq!(run(&p, Char, 1, 9, ACC_READ), 0);
        // Empty list: nothing allowed.
        assert_eq!(run(&program(&[]), Char, 1, 3, ACC_READ), 0);
    }

    #[test]
    fn catch_all_starts_over() {
        // Everything before the last rule for all devices and accesses is
        // left out: it could not change the outcome.
        let allow_null = rule(true, Some(DevKind::Char), Some(1), Some(3), ACC_ALL);
        let deny_all = rule(false, None, None, None, ACC_ALL);
        let p = program(&[allow_null.clone(), deny_all.clone()]);
        assert_eq!(p, program(std::slice::from_ref(&deny_all)));
        assert_eq!(run(&p, DevKind::Char, 1, 3, ACC_READ), 0);
        let p = program(&[deny_all, allow_null]);
        assert_eq!(run(&p, DevKind::Char, 1, 3, ACC_READ), 1);
        assert_eq!(run(&p, DevKind::Char, 1, 5, ACC_READ), 0);
    }

    #[test]
    fn encoding() {
        let i = insn(LDX_W, 5, 1, 4, 0);
        assert_eq!((i.regs & 0x0f, i.regs >> 4), (5, 1));
        assert_eq!(std::mem::size_of::<BpfInsn>(), 8);
        assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
    }
}
