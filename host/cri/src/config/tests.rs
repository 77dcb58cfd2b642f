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
mirrors = [{ endpoint = "mirror.internal:5000", insecure = true }, { endpoint = "https://m2.example", skip_verify = true }]

[registries."private.example:5000"]
insecure = true

[registries."selfsigned.example"]
skip_verify = true

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
            mirror_only: true,
            insecure: false,
            ca: Default::default(),
            skip_verify: false,
        }]
    );
    assert_eq!(r.mirrors["docker.io"].len(), 2);
    assert_eq!(
        (
            r.mirrors["docker.io"][0].skip_verify,
            r.mirrors["docker.io"][1].skip_verify
        ),
        (false, true),
        "skip_verify stays with its mirror"
    );
    assert_eq!(r.skip_verify, ["selfsigned.example"]);
    assert!(!r.mirrors["docker.io"][0].mirror_only);
    // A mirror's insecure flag stays with that mirror, not its host.
    assert!(r.mirrors["docker.io"][0].insecure);
    assert!(!r.mirrors["docker.io"][1].insecure);
    assert!(!r.insecure.contains(&"mirror.internal:5000".to_string()));
    assert_eq!(r.insecure, vec!["private.example:5000".to_string()]);
}

#[test]
fn docker_hub_aliases_are_docker_io() {
    for alias in ["index.docker.io", "registry-1.docker.io"] {
        let c = parse(&format!(
            "[registries.\"{alias}\"]\nmirrors = [{{ endpoint = \"http://127.0.0.1:5000\" }}]\nmirror_only = true"
        ))
        .unwrap();
        assert!(c.registries.contains_key("docker.io"), "{alias}");
        assert!(!c.registries.contains_key(alias), "{alias}");
        let r = c.registry_config();
        assert_eq!(r.mirrors["docker.io"][0].endpoint, "http://127.0.0.1:5000");
        assert!(r.mirrors["docker.io"][0].mirror_only);
    }
    // Two tables for Docker Hub: which one would win? Refused, naming the key.
    let err =
        parse("[registries.\"docker.io\"]\ninsecure = true\n[registries.\"index.docker.io\"]\n")
            .unwrap_err()
            .to_string();
    assert!(err.contains("registries.\"index.docker.io\""), "{err}");
    assert!(err.contains("docker.io"), "{err}");
    // Other hosts are kept as written.
    let c = parse("[registries.\"quay.io\"]\ninsecure = true").unwrap();
    assert!(c.registries.contains_key("quay.io"));
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
        (
            "[registries.\"quay.io\"]\nca_file = \"ca.pem\"",
            "registries.\"quay.io\".ca_file: ca.pem must be an absolute path",
        ),
        (
            "[registries.\"quay.io\"]\nca_file = \"/nonexistent/ca.pem\"",
            "registries.\"quay.io\".ca_file: cannot read /nonexistent/ca.pem",
        ),
        (
            "[registries.\"quay.io\"]\nmirrors = [{ endpoint = \"m:5000\", ca_file = \"/dev/null\" }]",
            "registries.\"quay.io\".mirrors[0].ca_file: /dev/null: no PEM certificate",
        ),
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
