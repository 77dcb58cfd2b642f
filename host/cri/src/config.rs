//! The daemon's configuration file (`/etc/vmpod/config.toml`).
//!
//! TOML in the style of CRI-O / containerd. Every table rejects unknown keys,
//! and the error names the key and the file. A missing file at the default
//! path means built-in defaults. See `docs/config.md` for the reference.
//!
//! ```toml
//! log_level = "info"
//! default_runtime = "vmpod"
//! cgroup_driver = "cgroupfs"   # or "systemd"
//!
//! [runtimes.vmpod]
//! hypervisor = "auto"        # builtin | qemu | auto
//! vcpus = 1
//! memory_mib = 256
//!
//! [registries."registry.k8s.io"]
//! mirrors = [{ endpoint = "http://127.0.0.1:5000" }]
//! mirror_only = true
//!
//! [cni]
//! conf_dir = "/etc/cni/net.d"
//! bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where `vmpod serve` looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vmpod/config.toml";
/// The runtime handler used when a pod names none.
pub const DEFAULT_HANDLER: &str = "vmpod";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole file. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// tracing `EnvFilter` directives, e.g. `info` or `vmpod_images=debug,info`.
    pub log_level: String,
    /// Handler used when `RunPodSandbox` names none.
    pub default_runtime: String,
    /// Reported to kubelet by `RuntimeConfig`; kubelet's `cgroupDriver`
    /// must match it.
    pub cgroup_driver: CgroupDriver,
    /// `[runtimes.<handler>]`: one table per runtime handler.
    pub runtimes: BTreeMap<String, RuntimeHandler>,
    /// `[registries."<host>"]`: per registry host settings.
    pub registries: BTreeMap<String, RegistryHost>,
    pub cni: CniConfig,
}

/// How pod cgroups on the host are managed: by writing cgroupfs directly or
/// through systemd slices. Must match kubelet's `cgroupDriver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    #[default]
    Cgroupfs,
    Systemd,
}

/// Which VMM runs a handler's sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// Our KVM VMM.
    Builtin,
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
    /// Builtin where hardware KVM runs guest userspace, QEMU otherwise.
    #[default]
    Auto,
}

/// `[runtimes.<handler>]`. Used by the sandbox manager.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeHandler {
    pub hypervisor: HypervisorKind,
    /// Guest kernel (uncompressed vmlinux); unset = the one vmpod installs.
    pub kernel: Option<PathBuf>,
    /// Guest initramfs; unset = the one vmpod installs.
    pub initrd: Option<PathBuf>,
    pub vcpus: u8,
    pub memory_mib: u32,
}

impl Default for RuntimeHandler {
    fn default() -> Self {
        RuntimeHandler {
            hypervisor: HypervisorKind::Auto,
            kernel: None,
            initrd: None,
            vcpus: 1,
            memory_mib: 256,
        }
    }
}

/// `[registries."<host>"]`: settings for one registry host as it appears in
/// normalised references (`docker.io`, `registry.k8s.io`, `127.0.0.1:5000`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryHost {
    /// Allow plain HTTP to this host (always allowed for loopback).
    pub insecure: bool,
    /// Tried first, in order, before the host itself.
    pub mirrors: Vec<MirrorEndpoint>,
    /// Never contact the host itself; only its mirrors.
    pub mirror_only: bool,
    /// PEM file of CA certificates trusted (besides the system's) when
    /// this host is contacted as a registry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// `ca_file`'s certificates, loaded and checked by [`Config::parse`].
    #[serde(skip)]
    pub ca: vmpod_images::CaCerts,
    /// Accept any certificate from this host as a registry (no chain or
    /// name check). For tests and emergencies; logged as a warning.
    pub skip_verify: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorEndpoint {
    /// `host[:port]`, optionally prefixed with `http://` or `https://`.
    pub endpoint: String,
    /// Allow plain HTTP to this mirror (implied by an `http://` endpoint).
    #[serde(default)]
    pub insecure: bool,
    /// PEM file of CA certificates trusted (besides the system's) for this
    /// mirror endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// `ca_file`'s certificates, loaded and checked by [`Config::parse`].
    #[serde(skip)]
    pub ca: vmpod_images::CaCerts,
    /// Accept any certificate from this mirror endpoint.
    #[serde(default)]
    pub skip_verify: bool,
}

/// `[cni]`: where the network configuration and plugins live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CniConfig {
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let mut runtimes = BTreeMap::new();
        runtimes.insert(DEFAULT_HANDLER.to_string(), RuntimeHandler::default());
        Config {
            log_level: "info".to_string(),
            cgroup_driver: CgroupDriver::default(),
            default_runtime: DEFAULT_HANDLER.to_string(),
            runtimes,
            registries: BTreeMap::new(),
            cni: CniConfig::default(),
        }
    }
}

impl Config {
    /// Load `path`. A missing file is only fine when `optional` (the default
    /// path was not overridden): then built-in defaults apply.
    pub fn load(path: &Path, optional: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Parse and validate TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: parse_message(&e, text),
        })?;
        // The default handler always exists, so pods naming none can run.
        config
            .runtimes
            .entry(DEFAULT_HANDLER.to_string())
            .or_default();
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })?;
        config
            .load_ca_files()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: path.to_path_buf(),
                key,
                message,
            })?;
        // Docker Hub's other names: images are named docker.io/..., so a
        // table under another name would never match. (validate() made sure
        // there is only one.)
        config.registries = std::mem::take(&mut config.registries)
            .into_iter()
            .map(|(host, reg)| (canonical_registry(&host).to_string(), reg))
            .collect();
        Ok(config)
    }

    /// Read every `ca_file` (absolute paths only), so a missing file or a
    /// broken certificate stops the daemon at start-up, naming the key.
    fn load_ca_files(&mut self) -> Result<(), (String, String)> {
        fn load(key: String, path: &Path) -> Result<vmpod_images::CaCerts, (String, String)> {
            if !path.is_absolute() {
                return Err((key, format!("{} must be an absolute path", path.display())));
            }
            vmpod_images::CaCerts::load(path).map_err(|m| (key, m))
        }
        for (host, reg) in &mut self.registries {
            if let Some(p) = &reg.ca_file {
                reg.ca = load(format!("registries.\"{host}\".ca_file"), p)?;
            }
            for (i, m) in reg.mirrors.iter_mut().enumerate() {
                if let Some(p) = &m.ca_file {
                    m.ca = load(format!("registries.\"{host}\".mirrors[{i}].ca_file"), p)?;
                }
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log_level) {
            return Err(("log_level".into(), format!("{:?}: {e}", self.log_level)));
        }
        if !self.runtimes.contains_key(&self.default_runtime) {
            return Err((
                "default_runtime".into(),
                format!(
                    "{:?} has no [runtimes.{}] table",
                    self.default_runtime, self.default_runtime
                ),
            ));
        }
        for (name, handler) in &self.runtimes {
            handler
                .validate(name)
                .map_err(|(k, m)| (format!("runtimes.{name}.{k}"), m))?;
        }
        for (host, reg) in &self.registries {
            reg.validate(host)
                .map_err(|(k, m)| (format!("registries.\"{host}\"{k}"), m))?;
        }
        let hub: Vec<&String> = self
            .registries
            .keys()
            .filter(|h| canonical_registry(h) == DOCKER_HUB)
            .collect();
        if hub.len() > 1 {
            let names: Vec<String> = hub.iter().map(|h| format!("\"{h}\"")).collect();
            let other = hub
                .iter()
                .find(|h| h.as_str() != DOCKER_HUB)
                .unwrap_or(&hub[0]);
            return Err((
                format!("registries.\"{other}\""),
                format!(
                    "{} all name Docker Hub (images are named docker.io/...); \
                     write one table, [registries.\"docker.io\"]",
                    names.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// The registry settings in the form `vmpod-images` takes.
    pub fn registry_config(&self) -> vmpod_images::RegistryConfig {
        let mut out = vmpod_images::RegistryConfig::default();
        for (host, reg) in &self.registries {
            if reg.insecure {
                out.insecure.push(host.clone());
            }
            if !reg.ca.is_empty() {
                out.ca.insert(host.clone(), reg.ca.clone());
            }
            if reg.skip_verify {
                out.skip_verify.push(host.clone());
            }
            // A mirror's `insecure` stays with that mirror endpoint.
            let mirrors: Vec<vmpod_images::Mirror> = reg
                .mirrors
                .iter()
                .map(|m| vmpod_images::Mirror {
                    endpoint: m.endpoint.clone(),
                    mirror_only: reg.mirror_only,
                    insecure: m.insecure,
                    ca: m.ca.clone(),
                    skip_verify: m.skip_verify,
                })
                .collect();
            if !mirrors.is_empty() {
                out.mirrors.insert(host.clone(), mirrors);
            }
        }
        out
    }

    /// The effective configuration as JSON (for `Status` verbose info).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

impl RuntimeHandler {
    fn validate(&self, name: &str) -> Result<(), (String, String)> {
        if !is_handler_name(name) {
            return Err((
                "name".into(),
                "handler names are lowercase letters, digits and '-' (not first or last), at most 63 characters".into(),
            ));
        }
        if !(1..=64).contains(&self.vcpus) {
            return Err(("vcpus".into(), format!("{} is not in 1..=64", self.vcpus)));
        }
        if !(64..=262_144).contains(&self.memory_mib) {
            return Err((
                "memory_mib".into(),
                format!("{} is not in 64..=262144", self.memory_mib),
            ));
        }
        for (key, path) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(p) = path {
                if !p.is_absolute() {
                    return Err((
                        key.into(),
                        format!("{} is not an absolute path", p.display()),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl RegistryHost {
    fn validate(&self, host: &str) -> Result<(), (String, String)> {
        validate_hostport(host).map_err(|m| (String::new(), m))?;
        if self.mirror_only && self.mirrors.is_empty() {
            return Err((
                ".mirror_only".into(),
                "mirror_only = true needs at least one entry in mirrors".into(),
            ));
        }
        for (i, m) in self.mirrors.iter().enumerate() {
            let (scheme, hostport) = split_scheme(&m.endpoint);
            if let Some(s) = scheme {
                if s != "http" && s != "https" {
                    return Err((
                        format!(".mirrors[{i}].endpoint"),
                        format!("{:?}: scheme must be http or https", m.endpoint),
                    ));
                }
            }
            validate_hostport(hostport.trim_end_matches('/')).map_err(|e| {
                (
                    format!(".mirrors[{i}].endpoint"),
                    format!("{:?}: {e}", m.endpoint),
                )
            })?;
        }
        Ok(())
    }
}

/// Docker Hub as image names spell it.
const DOCKER_HUB: &str = "docker.io";

/// `index.docker.io` and `registry-1.docker.io` (Docker Hub's API host)
/// → `docker.io`, the name normalised image references carry.
fn canonical_registry(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
        h => h,
    }
}

/// `http://h:1` → (Some("http"), "h:1"); `h:1` → (None, "h:1").
fn split_scheme(endpoint: &str) -> (Option<&str>, &str) {
    match endpoint.split_once("://") {
        Some((s, rest)) => (Some(s), rest),
        None => (None, endpoint),
    }
}

fn validate_hostport(s: &str) -> Result<(), String> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (s, None),
    };
    if host.is_empty() {
        return Err(format!("{s:?} has no host name"));
    }
    let ok = host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '[' | ']' | ':'));
    if !ok || host.contains('/') {
        return Err(format!("{s:?} is not a host[:port]"));
    }
    if let Some(p) = port {
        if p.parse::<u16>().map(|p| p == 0).unwrap_or(true) {
            return Err(format!("{s:?} has an invalid port"));
        }
    }
    Ok(())
}

fn is_handler_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// toml's message prefixed with the line and followed by that line's text,
/// so both an unknown key and a bad value are named.
fn parse_message(e: &toml::de::Error, text: &str) -> String {
    let msg = e.message().trim().to_string();
    let Some(span) = e.span() else { return msg };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line_start = text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = text[start..]
        .find('\n')
        .map(|i| start + i)
        .unwrap_or(text.len());
    let line = text[line_start..line_end].trim();
    if line.is_empty() {
        format!("line {line_no}: {msg}")
    } else {
        format!("line {line_no}: {msg} (in `{line}`)")
    }
}

#[cfg(test)]
mod tests;
