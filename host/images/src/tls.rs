//! Extra CA certificates for registry endpoints (`ca_file` in the daemon
//! config): a PEM file of one or more certificates, trusted in addition to
//! the system's roots for that endpoint only.

use std::path::Path;

const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

/// One endpoint's extra trust anchors: PEM blocks, one certificate each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaCerts(Vec<Vec<u8>>);

impl CaCerts {
    /// Read and check `path`: every certificate in it must parse, and there
    /// must be at least one. The message names the file and the problem.
    pub fn load(path: &Path) -> Result<CaCerts, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        CaCerts::from_pem(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Split a PEM bundle into certificates, each checked by the TLS
    /// library. Text outside the blocks (comments, keys' absence) is ignored.
    pub fn from_pem(text: &str) -> Result<CaCerts, String> {
        let mut certs = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find(BEGIN) {
            let Some(len) = rest[start..].find(END) else {
                return Err(format!("certificate {} has no {END} line", certs.len() + 1));
            };
            let block = &rest[start..start + len + END.len()];
            reqwest::Certificate::from_pem(block.as_bytes())
                .map_err(|e| format!("certificate {} does not parse: {e}", certs.len() + 1))?;
            certs.push(format!("{block}\n").into_bytes());
            rest = &rest[start + len + END.len()..];
        }
        if certs.is_empty() {
            return Err(format!("no PEM certificate ({BEGIN}) in it"));
        }
        Ok(CaCerts(certs))
    }

    /// Test stand-in: blocks taken as they are.
    #[cfg(test)]
    pub(crate) fn unchecked(blocks: &[&str]) -> CaCerts {
        CaCerts(blocks.iter().map(|b| b.as_bytes().to_vec()).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// For `oci-client`'s `ClientConfig::extra_root_certificates`.
    pub(crate) fn for_oci_client(&self) -> Vec<oci_client::client::Certificate> {
        self.0
            .iter()
            .map(|pem| oci_client::client::Certificate {
                encoding: oci_client::client::CertificateEncoding::Pem,
                data: pem.clone(),
            })
            .collect()
    }

    /// For a `reqwest` client of our own (the identity-token exchange).
    pub(crate) fn add_to(&self, mut b: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        for pem in &self.0 {
            // Checked when loaded.
            if let Ok(c) = reqwest::Certificate::from_pem(pem) {
                b = b.add_root_certificate(c);
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_files_without_certificates_or_with_broken_ones() {
        assert!(CaCerts::from_pem("")
            .unwrap_err()
            .contains("no PEM certificate"));
        let e = CaCerts::from_pem(&format!("{BEGIN}\nbm90IGEgY2VydA==\n{END}\n")).unwrap_err();
        assert!(e.contains("certificate 1 does not parse"), "{e}");
        let e = CaCerts::from_pem(&format!("{BEGIN}\nAAAA\n")).unwrap_err();
        assert!(e.contains("no -----END CERTIFICATE----- line"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let e = CaCerts::load(&d.path().join("missing.pem")).unwrap_err();
        assert!(
            e.contains("cannot read") && e.contains("missing.pem"),
            "{e}"
        );
    }
}
