//! Sandbox teardown through the agent, in a VM of its own (DestroySandbox
//! removes every container, so it cannot share the agent_e2e VM): sandbox
//! mounts and containers (running and merely created) are gone afterwards,
//! the agent still answers, and the VM then stops cleanly.

use std::time::Duration;

use vmpod_runtime::agent_client::agent::{CreateSandboxRequest, Mount};
use vmpod_runtime::agent_client::OutputStream;
use vmpod_tests::agent_vm;

#[test]
fn destroy_sandbox_removes_everything() {
    let mut vm = agent_vm::boot("agent-destroy")
        .unwrap_or_else(|e| panic!("booting the agent VM failed: {e}"));
    let c = vm.client.clone();
    let handle = vm.vm.take().expect("vm handle");
    let reason = vm.rt.block_on(async {
        let before = c.guest_details().await.unwrap();
        c.create_sandbox(CreateSandboxRequest {
            sandbox_id: "pod-destroy".into(),
            hostname: "destroy-me".into(),
            mounts: vec![Mount {
                source: "tmpfs".into(),
                target: "/run/sandbox-shared".into(),
                fstype: "tmpfs".into(),
                options: vec!["size=1m".into()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
        let spec = serde_json::to_vec(&agent_vm::busybox_spec(&[
            "sh",
            "-c",
            "echo up; sleep 1000",
        ]))
        .unwrap();
        c.create_container("running", spec.clone(), "", None, false)
            .await
            .unwrap();
        c.start_container("running").await.unwrap();
        let (up, _) = c
            .read_chunk("running", "", OutputStream::Stdout, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(up, b"up\n");
        c.create_container("created-only", spec, "", None, false)
            .await
            .unwrap();
        let during = c.guest_details().await.unwrap();
        assert_eq!(
            during.container_ids,
            vec!["created-only".to_string(), "running".to_string()]
        );
        assert!(during
            .mount_points
            .contains(&"/run/sandbox-shared".to_string()));
        assert_eq!(during.cgroups.len(), 2, "{:?}", during.cgroups);

        c.destroy_sandbox().await.unwrap();

        let after = c.guest_details().await.unwrap();
        assert!(after.container_ids.is_empty(), "{:?}", after.container_ids);
        assert!(after.cgroups.is_empty(), "{:?}", after.cgroups);
        let (mut a, mut b) = (after.mount_points.clone(), before.mount_points.clone());
        a.sort();
        b.sort();
        assert_eq!(a, b, "guest mounts after destroy");
        assert_eq!(
            after.process_count, before.process_count,
            "no container process left"
        );
        c.check().await.unwrap();

        handle.stop().await.unwrap()
    });
    assert!(reason.is_clean(), "{reason:?}");
}
