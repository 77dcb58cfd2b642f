//! Is there a usable CNI network? Drives the `NetworkReady` condition.
//!
//! Like containerd, the first config file in `conf_dir` (sorted by name,
//! `.conf`, `.conflist`, `.json`) is the pod network. It is usable when it
//! parses, names the network and every plugin it lists exists in a bin dir.

use std::path::{Path, PathBuf};

use crate::config::CniConfig;

/// The network that pods would join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniNetwork {
    pub name: String,
    pub file: PathBuf,
    pub plugins: Vec<String>,
}

/// `Ok(network)` when usable, `Err(reason)` saying what is missing.
pub fn check(cfg: &CniConfig) -> Result<CniNetwork, String> {
    let dir = &cfg.conf_dir;
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
            })
            .collect(),
        Err(e) => return Err(format!("no CNI config: cannot read {}: {e}", dir.display())),
    };
    files.sort();
    let Some(file) = files.into_iter().next() else {
        return Err(format!("no CNI config found in {}", dir.display()));
    };
    let net = parse(&file)?;
    for plugin in &net.plugins {
        if !cfg.bin_dirs.iter().any(|d| is_executable(&d.join(plugin))) {
            return Err(format!(
                "CNI plugin {plugin:?} (from {}) not found in {:?}",
                file.display(),
                cfg.bin_dirs
            ));
        }
    }
    Ok(net)
}

fn parse(file: &Path) -> Result<CniNetwork, String> {
    let bad = |why: String| format!("invalid CNI config {}: {why}", file.display());
    let text = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let name = v["name"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("no \"name\"".into()))?;
    // A .conflist has "plugins"; a single .conf has "type".
    let entries: Vec<&serde_json::Value> = match v["plugins"].as_array() {
        Some(list) => list.iter().collect(),
        None => vec![&v],
    };
    let plugins = entries
        .iter()
        .map(|p| {
            p["type"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_string)
        })
        .collect::<Option<Vec<_>>>()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("a plugin has no \"type\"".into()))?;
    Ok(CniNetwork {
        name: name.to_string(),
        file: file.to_path_buf(),
        plugins,
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, CniConfig) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("net.d")).unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        let cfg = CniConfig {
            conf_dir: d.path().join("net.d"),
            bin_dirs: vec![d.path().join("bin")],
        };
        (d, cfg)
    }

    fn plugin(d: &Path, name: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = d.join("bin").join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn empty_dir_is_not_ready() {
        let (_d, cfg) = setup();
        assert!(check(&cfg).unwrap_err().contains("no CNI config"));
    }

    #[test]
    fn conflist_with_present_plugins_is_ready() {
        let (d, cfg) = setup();
        std::fs::write(
            cfg.conf_dir.join("10-pods.conflist"),
            r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        plugin(d.path(), "bridge");
        let err = check(&cfg).unwrap_err();
        assert!(err.contains("\"portmap\""), "{err}");
        plugin(d.path(), "portmap");
        let net = check(&cfg).unwrap();
        assert_eq!(net.name, "pods");
        assert_eq!(net.plugins, ["bridge", "portmap"]);
    }

    #[test]
    fn first_file_wins_and_must_parse() {
        let (d, cfg) = setup();
        std::fs::write(cfg.conf_dir.join("00-bad.conf"), "{not json").unwrap();
        std::fs::write(
            cfg.conf_dir.join("10-ok.conf"),
            r#"{"name":"n","type":"bridge"}"#,
        )
        .unwrap();
        plugin(d.path(), "bridge");
        assert!(check(&cfg).unwrap_err().contains("00-bad.conf"));
        std::fs::remove_file(cfg.conf_dir.join("00-bad.conf")).unwrap();
        assert_eq!(check(&cfg).unwrap().name, "n");
    }
}
