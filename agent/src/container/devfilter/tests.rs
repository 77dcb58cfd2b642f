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
            RSH64_K => r[dst] >>= i.imm,
            JNE_K | JEQ_K => {
                let ne = r[dst] != i.imm as i64 as u64;
                if ne == (i.code == JNE_K) {
                    pc += i.off as usize;
                }
            }
            EXIT => return r[0],
            other => panic!("opcode {other:#x}"),
        }
    }
    panic!("no exit");
}

/// Every instruction can be reached (the verifier refuses the program
/// otherwise) and every jump lands inside it.
fn assert_all_reachable(prog: &[BpfInsn]) {
    let mut seen = vec![false; prog.len()];
    let mut todo = vec![0usize];
    while let Some(pc) = todo.pop() {
        if pc >= prog.len() {
            panic!("jump out of the program");
        }
        if std::mem::replace(&mut seen[pc], true) {
            continue;
        }
        match prog[pc].code {
            EXIT => {}
            JNE_K | JEQ_K => {
                todo.push(pc + 1);
                todo.push(pc + 1 + prog[pc].off as usize);
            }
            _ => todo.push(pc + 1),
        }
    }
    assert!(
        seen.iter().all(|s| *s),
        "unreachable instructions: {seen:?}"
    );
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
fn containerd_cri_list_gets_the_defaults() {
    use DevKind::{Block, Char};
    // What containerd's CRI sends: deny all (the runtime adds its
    // defaults after it).
    let mut rules = vec![rule(false, None, None, None, ACC_ALL)];
    rules.extend(default_rules());
    let p = program(&rules);
    assert_all_reachable(&p);
    for (minor, what) in [
        (3, "null"),
        (5, "zero"),
        (7, "full"),
        (8, "random"),
        (9, "urandom"),
    ] {
        assert_eq!(run(&p, Char, 1, minor, RW), 1, "/dev/{what}");
    }
    assert_eq!(run(&p, Char, 5, 0, RW), 1, "/dev/tty");
    assert_eq!(run(&p, Char, 5, 1, RW), 1, "/dev/console");
    assert_eq!(run(&p, Char, 5, 2, RW), 1, "/dev/ptmx");
    assert_eq!(run(&p, Char, 136, 7, RW), 1, "pts, any minor");
    assert_eq!(run(&p, Char, 10, 229, ACC_MKNOD), 1, "mknod of any char");
    assert_eq!(run(&p, Block, 8, 0, ACC_MKNOD), 1, "mknod of any block");
    assert_eq!(run(&p, Block, 8, 0, ACC_READ), 0, "block read");
    assert_eq!(run(&p, Char, 1, 1, ACC_READ), 0, "/dev/mem");
    assert_eq!(run(&p, Char, 10, 200, RW), 0, "tun not listed");
    // Without the defaults, deny all is just that.
    let p = program(&rules[..1]);
    assert_all_reachable(&p);
    assert_eq!(run(&p, Char, 1, 3, ACC_READ), 0);
}

#[test]
fn the_last_matching_rule_decides() {
    use DevKind::Char;
    let rules = vec![
        rule(true, None, None, None, ACC_ALL),
        rule(false, Some(Char), Some(1), Some(5), ACC_WRITE),
    ];
    let p = program(&rules);
    assert_all_reachable(&p);
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
    // A later allow overrides an earlier deny.
    let p = program(&[
        rule(false, Some(Char), Some(1), None, ACC_ALL),
        rule(true, Some(Char), Some(1), Some(3), RW),
    ]);
    assert_eq!(run(&p, Char, 1, 3, RW), 1);
    assert_eq!(run(&p, Char, 1, 3, ACC_MKNOD), 0);
    assert_eq!(run(&p, Char, 1, 5, ACC_READ), 0);
    // Empty list: nothing allowed.
    let p = program(&[]);
    assert_all_reachable(&p);
    assert_eq!(run(&p, Char, 1, 3, ACC_READ), 0);
}

#[test]
fn accesses_do_not_add_up_across_rules() {
    use DevKind::Char;
    // As runc: an access must be covered by one rule alone.
    let p = program(&[
        rule(true, Some(Char), Some(1), None, ACC_READ),
        rule(true, Some(Char), None, Some(9), ACC_WRITE),
    ]);
    assert_all_reachable(&p);
    assert_eq!(run(&p, Char, 1, 9, ACC_READ), 1);
    assert_eq!(run(&p, Char, 1, 9, ACC_WRITE), 1);
    assert_eq!(run(&p, Char, 1, 9, RW), 0, "r and w from two rules");
    assert_eq!(run(&p, Char, 1, 8, ACC_READ), 1);
    assert_eq!(run(&p, Char, 1, 8, RW), 0);
    assert_eq!(run(&p, Char, 4, 9, ACC_READ), 0);
    // A later deny of one access takes it back only.
    let p = program(&[
        rule(true, Some(Char), Some(1), Some(9), RW),
        rule(false, Some(Char), Some(1), Some(9), ACC_READ),
    ]);
    assert_eq!(run(&p, Char, 1, 9, ACC_WRITE), 1);
    assert_eq!(run(&p, Char, 1, 9, ACC_READ), 0);
    assert_eq!(run(&p, Char, 1, 9, RW), 0);
}

#[test]
fn catch_all_starts_over() {
    // Everything before the last rule for all devices and accesses is
    // left out: it could not change the outcome.
    let allow_null = rule(true, Some(DevKind::Char), Some(1), Some(3), ACC_ALL);
    let deny_all = rule(false, None, None, None, ACC_ALL);
    let allow_all = rule(true, None, None, None, ACC_ALL);
    let p = program(&[allow_null.clone(), deny_all.clone()]);
    assert_eq!(p, program(std::slice::from_ref(&deny_all)));
    assert_all_reachable(&p);
    assert_eq!(run(&p, DevKind::Char, 1, 3, ACC_READ), 0);
    let p = program(&[deny_all.clone(), allow_null.clone()]);
    assert_eq!(run(&p, DevKind::Char, 1, 3, ACC_READ), 1);
    assert_eq!(run(&p, DevKind::Char, 1, 5, ACC_READ), 0);
    // Allow all ends the program: no unreachable tail.
    let p = program(&[deny_all, allow_all, allow_null]);
    assert_all_reachable(&p);
    assert_eq!(run(&p, DevKind::Block, 8, 0, RW), 1);
}

#[test]
fn encoding() {
    let i = insn(LDX_W, 5, 1, 4, 0);
    assert_eq!((i.regs & 0x0f, i.regs >> 4), (5, 1));
    assert_eq!(std::mem::size_of::<BpfInsn>(), 8);
    assert_eq!(std::mem::size_of::<ProgLoadAttr>(), 72);
}
