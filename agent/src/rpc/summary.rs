//! What a request log line says about a request: its ids and numbers, and
//! only the size of everything else. Requests carry stdin data, process
//! environments and specs (secrets), so their contents never reach the
//! log. Generic over the generated messages (protobuf reflection), so a
//! new field is summarised too, never dumped.

use protobuf::reflect::{ReflectFieldRef, ReflectValueRef};
use protobuf::MessageDyn;

/// `name=value` for ids and scalars, `name=<N bytes>` for other strings
/// and bytes, `name=[N]` for lists, nested messages in braces; fields at
/// their default are left out.
pub fn summary(m: &dyn MessageDyn) -> String {
    let mut parts = Vec::new();
    for f in m.descriptor_dyn().fields() {
        let name = f.name();
        match f.get_reflect(m) {
            ReflectFieldRef::Optional(o) => {
                if let Some(v) = o.value() {
                    parts.push(format!("{name}={}", value(name, v)));
                }
            }
            ReflectFieldRef::Repeated(r) if !r.is_empty() => {
                parts.push(format!("{name}=[{}]", r.len()));
            }
            ReflectFieldRef::Map(r) if !r.is_empty() => {
                parts.push(format!("{name}=[{}]", r.len()));
            }
            _ => {}
        }
    }
    parts.join(" ")
}

fn value(name: &str, v: ReflectValueRef<'_>) -> String {
    match v {
        // Ids are what a reader needs to follow a request.
        ReflectValueRef::String(s) if name.ends_with("_id") => format!("{s:?}"),
        ReflectValueRef::String(s) => format!("<{} bytes>", s.len()),
        ReflectValueRef::Bytes(b) => format!("<{} bytes>", b.len()),
        ReflectValueRef::U32(n) => n.to_string(),
        ReflectValueRef::U64(n) => n.to_string(),
        ReflectValueRef::I32(n) => n.to_string(),
        ReflectValueRef::I64(n) => n.to_string(),
        ReflectValueRef::F32(n) => n.to_string(),
        ReflectValueRef::F64(n) => n.to_string(),
        ReflectValueRef::Bool(b) => b.to_string(),
        ReflectValueRef::Enum(d, n) => d
            .value_by_number(n)
            .map(|v| v.name().to_string())
            .unwrap_or_else(|| n.to_string()),
        ReflectValueRef::Message(m) => format!("{{{}}}", summary(&*m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmpod_proto::agent::*;

    #[test]
    fn ids_and_sizes_only() {
        let req = ExecProcessRequest {
            container_id: "c1".into(),
            exec_id: "e1".into(),
            args: vec!["sh".into(), "-c".into(), "echo $TOKEN".into()],
            env: vec!["TOKEN=hunter2".into()],
            cwd: "/secret/place".into(),
            user: Some(User {
                username: "admin".into(),
                ..Default::default()
            })
            .into(),
            terminal: true,
            ..Default::default()
        };
        let s = summary(&req);
        assert_eq!(
            s,
            r#"container_id="c1" exec_id="e1" args=[3] env=[1] cwd=<13 bytes> user={username=<5 bytes>} terminal=true"#
        );
        for secret in ["hunter2", "TOKEN", "secret", "admin", "echo"] {
            assert!(!s.contains(secret), "{secret} in {s}");
        }
        let w = WriteStdinRequest {
            container_id: "c1".into(),
            data: b"password\n".to_vec(),
            ..Default::default()
        };
        assert_eq!(summary(&w), r#"container_id="c1" data=<9 bytes>"#);
        let c = CreateContainerRequest {
            container_id: "c2".into(),
            oci_spec_json: br#"{"process":{"env":["K=secret"]}}"#.to_vec(),
            ..Default::default()
        };
        assert_eq!(summary(&c), r#"container_id="c2" oci_spec_json=<32 bytes>"#);
        let r = ReadStreamRequest {
            container_id: "c1".into(),
            stream: Stream::STDERR.into(),
            wait_ms: 500,
            ..Default::default()
        };
        assert_eq!(
            summary(&r),
            r#"container_id="c1" stream=STDERR wait_ms=500"#
        );
    }
}
