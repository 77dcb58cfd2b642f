//! OCI seccomp profile → BPF programs (via seccompiler's JSON front end,
//! which knows the x86_64 syscall names).
//!
//! seccompiler filters have one match and one mismatch action, so a profile
//! becomes a stack of filters; the kernel applies the most restrictive
//! result across them:
//! - a base filter: syscalls named by any rule whose action differs from
//!   the default → Allow, everything else → the default action;
//! - one filter per non-Allow, non-default action: its syscalls → that
//!   action, everything else → Allow.

use std::collections::BTreeMap;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use serde_json::{json, Value};

use super::config::SockFilter;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("unsupported seccomp action {0:?}")]
    Action(String),
    #[error("compiling seccomp filter: {0}")]
    Compile(String),
    #[error(
        "linux.seccomp.architectures {0:?} does not include SCMP_ARCH_X86_64, the guest's architecture"
    )]
    Arch(Vec<String>),
    #[error("linux.seccomp.flags: {0}")]
    Flag(String),
}

/// The profile must cover the guest's architecture (x86_64; an empty list
/// means the native one). Other entries are accepted and have no effect:
/// x86 (32-bit) and x32 are ABIs the guest kernel does not run
/// (no IA32_EMULATION, no X32_ABI), others are foreign.
pub fn check_architectures(profile: &LinuxSeccomp) -> Result<(), SeccompError> {
    match profile.architectures().as_deref() {
        None | Some([]) => Ok(()),
        Some(list)
            if list
                .iter()
                .any(|a| matches!(a, Arch::ScmpArchX86_64 | Arch::ScmpArchNative)) =>
        {
            Ok(())
        }
        Some(list) => Err(SeccompError::Arch(
            list.iter().map(|a| a.to_string()).collect(),
        )),
    }
}

/// `SECCOMP_FILTER_FLAG_*` bits for the profile's flags.
pub fn filter_flags(profile: &LinuxSeccomp) -> Result<u32, SeccompError> {
    let mut bits = 0;
    for f in profile.flags().as_deref().unwrap_or_default() {
        bits |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                return Err(SeccompError::Flag(format!(
                    "{f} only applies to SCMP_ACT_NOTIFY listeners, which are not supported"
                )))
            }
        } as u32;
    }
    Ok(bits)
}

fn action_json(
    a: LinuxSeccompAction,
    errno: Option<u32>,
    default_errno: Option<u32>,
) -> Result<Value, SeccompError> {
    Ok(match a {
        LinuxSeccompAction::ScmpActAllow => json!("allow"),
        LinuxSeccompAction::ScmpActErrno => {
            json!({"errno": errno.or(default_errno).unwrap_or(libc::EPERM as u32)})
        }
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            json!("kill_thread")
        }
        LinuxSeccompAction::ScmpActKillProcess => json!("kill_process"),
        LinuxSeccompAction::ScmpActLog => json!("log"),
        LinuxSeccompAction::ScmpActTrap => json!("trap"),
        LinuxSeccompAction::ScmpActTrace => json!({"trace": errno.unwrap_or(0)}),
        other => return Err(SeccompError::Action(format!("{other:?}"))),
    })
}

fn op_json(op: LinuxSeccompOperator, value_two: Option<u64>) -> Value {
    match op {
        LinuxSeccompOperator::ScmpCmpNe => json!("ne"),
        LinuxSeccompOperator::ScmpCmpLt => json!("lt"),
        LinuxSeccompOperator::ScmpCmpLe => json!("le"),
        LinuxSeccompOperator::ScmpCmpEq => json!("eq"),
        LinuxSeccompOperator::ScmpCmpGe => json!("ge"),
        LinuxSeccompOperator::ScmpCmpGt => json!("gt"),
        LinuxSeccompOperator::ScmpCmpMaskedEq => {
            json!({"masked_eq": value_two.unwrap_or(u64::MAX)})
        }
    }
}

/// Compile the profile; syscalls unknown to the x86_64 table are skipped
/// (profiles list syscalls of newer kernels and other architectures).
pub fn compile(profile: &LinuxSeccomp) -> Result<Vec<Vec<SockFilter>>, SeccompError> {
    check_architectures(profile)?;
    let default = profile.default_action();
    let default_json = action_json(default, profile.default_errno_ret(), None)?;
    // action JSON (as string key) → rules
    let mut groups: BTreeMap<String, (Value, Vec<Value>)> = BTreeMap::new();
    let mut non_default_rules = Vec::new();
    for sc in profile.syscalls().as_deref().unwrap_or_default() {
        let eperm = libc::EPERM as u32;
        let same_errno = sc
            .errno_ret()
            .or(profile.default_errno_ret())
            .unwrap_or(eperm)
            == profile.default_errno_ret().unwrap_or(eperm);
        if sc.action() == default && (default != LinuxSeccompAction::ScmpActErrno || same_errno) {
            continue;
        }
        let action = action_json(sc.action(), sc.errno_ret(), profile.default_errno_ret())?;
        let args: Vec<Value> = sc
            .args()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|a| {
                let mut val = a.value();
                if a.op() == LinuxSeccompOperator::ScmpCmpMaskedEq {
                    // OCI: value = mask, valueTwo = expected.
                    val = a.value_two().unwrap_or(0);
                }
                let op = if a.op() == LinuxSeccompOperator::ScmpCmpMaskedEq {
                    json!({"masked_eq": a.value()})
                } else {
                    op_json(a.op(), a.value_two())
                };
                json!({"index": a.index(), "type": "qword", "op": op, "val": val})
            })
            .collect();
        for name in sc.names() {
            let rule = if args.is_empty() {
                json!({"syscall": name})
            } else {
                json!({"syscall": name, "args": args})
            };
            non_default_rules.push(rule.clone());
            if sc.action() != LinuxSeccompAction::ScmpActAllow {
                groups
                    .entry(action.to_string())
                    .or_insert_with(|| (action.clone(), Vec::new()))
                    .1
                    .push(rule);
            }
        }
    }
    let mut filters = Vec::new();
    if default != LinuxSeccompAction::ScmpActAllow {
        filters.push(json!({
            "mismatch_action": default_json,
            "match_action": "allow",
            "filter": non_default_rules,
        }));
    }
    for (_, (action, rules)) in groups {
        filters.push(json!({"mismatch_action": "allow", "match_action": action, "filter": rules}));
    }
    filters.into_iter().map(compile_one).collect()
}

fn compile_one(mut filter: Value) -> Result<Vec<SockFilter>, SeccompError> {
    // Retry without syscall names seccompiler's table does not know.
    for _ in 0..512 {
        let doc = json!({ "f": filter });
        let bytes = serde_json::to_vec(&doc).map_err(|e| SeccompError::Compile(e.to_string()))?;
        match seccompiler::compile_from_json(&bytes[..], seccompiler::TargetArch::x86_64) {
            Ok(mut map) => {
                let prog = map
                    .remove("f")
                    .ok_or_else(|| SeccompError::Compile("no program".into()))?;
                return Ok(prog
                    .into_iter()
                    .map(|i| SockFilter {
                        code: i.code,
                        jt: i.jt,
                        jf: i.jf,
                        k: i.k,
                    })
                    .collect());
            }
            Err(e) => {
                // The front end's error type is private; its message names
                // the unknown syscall.
                let msg = e.to_string();
                let Some(name) = msg
                    .split("Invalid syscall name: ")
                    .nth(1)
                    .and_then(|r| r.split(" for given arch").next())
                else {
                    return Err(SeccompError::Compile(msg));
                };
                let before = filter["filter"].as_array().map(Vec::len);
                if let Some(rules) = filter.get_mut("filter").and_then(Value::as_array_mut) {
                    rules.retain(|r| r.get("syscall").and_then(Value::as_str) != Some(name));
                }
                if filter["filter"].as_array().map(Vec::len) == before {
                    return Err(SeccompError::Compile(msg));
                }
            }
        }
    }
    Err(SeccompError::Compile("too many unknown syscalls".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_errno_with_allow_list() {
        let p: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write","exit_group","not_a_syscall_xyz"],"action":"SCMP_ACT_ALLOW"},
                {"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":13}]}"#,
        )
        .unwrap();
        let progs = compile(&p).unwrap();
        // base filter + the errno(13) group
        assert_eq!(progs.len(), 2);
        assert!(progs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn default_allow_with_args() {
        let p: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
                {"names":["personality"],"action":"SCMP_ACT_ERRNO",
                 "args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                {"names":["clone"],"action":"SCMP_ACT_ERRNO",
                 "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"}]}]}"#,
        )
        .unwrap();
        let progs = compile(&p).unwrap();
        assert_eq!(progs.len(), 1);
    }

    #[test]
    fn notify_rejected() {
        let p: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_NOTIFY"}]}"#,
        )
        .unwrap();
        assert!(compile(&p).is_err());
    }

    #[test]
    fn architectures() {
        let p = |archs: &str| -> LinuxSeccomp {
            serde_json::from_str(&format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","architectures":{archs},
                    "syscalls":[{{"names":["mkdir"],"action":"SCMP_ACT_ERRNO"}}]}}"#
            ))
            .unwrap()
        };
        // Docker's default profile lists x86_64 with x86 and x32.
        assert!(compile(&p(
            r#"["SCMP_ARCH_X86_64","SCMP_ARCH_X86","SCMP_ARCH_X32"]"#
        ))
        .is_ok());
        assert!(compile(&p("[]")).is_ok());
        assert!(compile(&p(r#"["SCMP_ARCH_NATIVE"]"#)).is_ok());
        for bad in [
            r#"["SCMP_ARCH_X86","SCMP_ARCH_X32"]"#,
            r#"["SCMP_ARCH_AARCH64"]"#,
        ] {
            let e = compile(&p(bad)).unwrap_err().to_string();
            assert!(
                e.contains("linux.seccomp.architectures") && e.contains("SCMP_ARCH_X86_64"),
                "{e}"
            );
        }
    }

    #[test]
    fn flags() {
        let p = |flags: &str| -> LinuxSeccomp {
            serde_json::from_str(&format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","flags":{flags}}}"#
            ))
            .unwrap()
        };
        assert_eq!(filter_flags(&p("[]")).unwrap(), 0);
        assert_eq!(
            filter_flags(&p(
                r#"["SECCOMP_FILTER_FLAG_LOG","SECCOMP_FILTER_FLAG_SPEC_ALLOW"]"#
            ))
            .unwrap(),
            (libc::SECCOMP_FILTER_FLAG_LOG | libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW) as u32
        );
        assert_eq!(
            filter_flags(&p(r#"["SECCOMP_FILTER_FLAG_TSYNC"]"#)).unwrap(),
            libc::SECCOMP_FILTER_FLAG_TSYNC as u32
        );
        let e = filter_flags(&p(r#"["SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV"]"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("linux.seccomp.flags"), "{e}");
    }
}
