use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/vmpod/test.toml"))
}

#[test]
fn empty_file_gives_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.runtimes[DEFAULT_HANDLER].vcpus, 1);
    assert_eq!(c.runtimes[DEFAULT_HANDLER].hypervisor, HypervisorKind::Auto);
}

#[test]
fn missing_optional_file_gives_defaults_but_missing_explicit_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nope.toml");
    assert_eq!(Config::load(&p, true).unwrap(), Config::default());
    let err = Config::load(&p, false).unwrap_err().to_string();
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn full_file_parses_and_maps_to_registry_config() {
    let c = parse(
        r#"
log_level = "debug"
default_runtime = "fast"

[runtimes.fast]
hypervisor = "qemu"
kernel = "/opt/vmpod/vmlinux"
initrd = "/opt/vmpod/initramfs.cpio.zst"
vcpus = 2
memory_mib = 512

[registries."registry.k8s.io"]
mirrors = [{ endpoint = "http://127.0.0.1:5000" }]
mirror_only = true

[registries."docker.io"]
mirrors = [{ endpoint = "mirror.internal:5000", insecure = true }, { endpoint = "https://m2.example" }]

[registries."private.example:5000"]
insecure = true

[cni]
conf_dir = "/tmp/cni"
bin_dirs = ["/tmp/bin"]
"#,
    )
    .unwrap();
    assert_eq!(c.default_runtime, "fast");
    let fast = &c.runtimes["fast"];
    assert_eq!(fast.hypervisor, HypervisorKind::Qemu);
    assert_eq!(fast.vcpus, 2);
    assert_eq!(fast.memory_mib, 512);
    assert!(
        c.runtimes.contains_key("vmpod"),
        "default handler always present"
    );

    let r = c.registry_config();
    assert_eq!(
        r.mirrors["registry.k8s.io"],
        vec![vmpod_images::Mirror {
            endpoint: "http://127.0.0.1:5000".into(),
            mirror_only: true
        }]
    );
    assert_eq!(r.mirrors["docker.io"].len(), 2);
    assert!(!r.mirrors["docker.io"][0].mirror_only);
    assert!(r.insecure.contains(&"mirror.internal:5000".to_string()));
    assert!(r.insecure.contains(&"private.example:5000".to_string()));
    assert!(!r.insecure.contains(&"m2.example".to_string()));
}

#[test]
fn unknown_keys_are_named_with_the_file() {
    for (text, key) in [
        ("bogus = 1", "bogus"),
        ("[runtimes.vmpod]\nvcpu = 2", "vcpu"),
        ("[registries.\"docker.io\"]\nmirror = []", "mirror"),
        (
            "[registries.\"docker.io\"]\nmirrors = [{ endpoint = \"a:1\", weight = 2 }]",
            "weight",
        ),
        ("[cni]\nconfdir = \"/x\"", "confdir"),
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(&format!("`{key}`")), "{text:?} -> {err}");
        assert!(err.contains("/etc/vmpod/test.toml"), "{err}");
        assert!(err.contains("line "), "{err}");
    }
}

#[test]
fn bad_values_are_rejected_with_their_key() {
    for (text, needle) in [
        ("[runtimes.vmpod]\nvcpus = 0", "runtimes.vmpod.vcpus"),
        (
            "[runtimes.vmpod]\nmemory_mib = 8",
            "runtimes.vmpod.memory_mib",
        ),
        (
            "[runtimes.vmpod]\nkernel = \"vmlinux\"",
            "runtimes.vmpod.kernel",
        ),
        ("[runtimes.Fast]", "runtimes.Fast.name"),
        ("[runtimes.vmpod]\nhypervisor = \"xen\"", "hypervisor"),
        ("default_runtime = \"nope\"", "default_runtime"),
        ("log_level = \"info,[[\"", "log_level"),
        (
            "[registries.\"docker.io\"]\nmirror_only = true",
            "mirror_only",
        ),
        (
            "[registries.\"docker.io\"]\nmirrors = [{ endpoint = \"ftp://x\" }]",
            "mirrors[0].endpoint",
        ),
        (
            "[registries.\"docker.io\"]\nmirrors = [{ endpoint = \"x:99999\" }]",
            "mirrors[0].endpoint",
        ),
        ("[registries.\"bad host\"]", "bad host"),
    ] {
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?} -> {err}");
    }
}

#[test]
fn config_serialises_to_json_for_status() {
    let v = Config::default().to_json();
    assert_eq!(v["default_runtime"], "vmpod");
    assert_eq!(v["runtimes"]["vmpod"]["hypervisor"], "auto");
}
