//! The crate's one error type. The CRI layer maps variants to gRPC codes.

#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageError {
    /// Unparseable reference.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    /// Registry says the image or tag does not exist (or has no linux/amd64
    /// entry). `detail` (may be empty) says where we looked or why, e.g.
    /// `tried 127.0.0.1:5000 (mirror): not found`.
    #[error("image {reference:?} not found{}", in_parens(.detail))]
    NotFound { reference: String, detail: String },
    /// Registry refused our credentials (or wants some and we gave none).
    #[error("unauthorized pulling {reference:?}: {reason}")]
    Unauthorized { reference: String, reason: String },
    /// A blob's content does not match its digest (nothing is stored).
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// The image is in use and cannot be removed (later: by containers).
    #[error("image {0} is in use")]
    InUse(String),
    /// The registry served an image we cannot use: malformed or unsupported
    /// manifest, index or config, unknown layer media type, bad digests in
    /// it. Retrying will not help until the image changes.
    #[error("unsupported image {reference:?}: {reason}")]
    Unsupported { reference: String, reason: String },
    /// Any other registry or transport failure (connection refused, HTTP
    /// errors, a pull aborted because another layer failed...).
    #[error("registry error for {reference:?}: {reason}")]
    Registry { reference: String, reason: String },
    /// Local storage failure (disk, metadata database, unpack).
    #[error("image store error during {op}: {reason}")]
    Store { op: String, reason: String },
    #[error("not implemented yet: {0}")]
    Unimplemented(&'static str),
}

pub type Result<T> = std::result::Result<T, ImageError>;

impl ImageError {
    pub(crate) fn not_found(reference: impl Into<String>, detail: impl Into<String>) -> Self {
        ImageError::NotFound {
            reference: reference.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn store(op: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        ImageError::Store {
            op: op.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn unsupported(
        reference: impl Into<String>,
        reason: impl std::fmt::Display,
    ) -> Self {
        ImageError::Unsupported {
            reference: reference.into(),
            reason: reason.to_string(),
        }
    }

    pub(crate) fn registry(reference: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        ImageError::Registry {
            reference: reference.into(),
            reason: reason.to_string(),
        }
    }
}

/// `e` and its causes, `: `-joined: HTTP clients put the telling part (a
/// refused connection, a certificate that does not verify) in a source,
/// while their own message is only "error sending request for url (...)".
/// A cause whose text the message so far already holds is left out.
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

/// `" (detail)"`, or nothing when `detail` is empty.
fn in_parens(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

/// `io::Result` -> `ImageError::Store` with the operation and path as context.
pub(crate) trait StoreContext<T> {
    fn ctx(self, op: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: std::fmt::Display> StoreContext<T> for std::result::Result<T, E> {
    fn ctx(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| ImageError::store(op(), e))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn with_causes_appends_each_new_cause_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let e = E(
            "error sending request",
            Some(Box::new(E(
                "client error (Connect)",
                Some(Box::new(E(
                    "Connect",
                    Some(Box::new(E("certificate verify failed", None))),
                ))),
            ))),
        );
        assert_eq!(
            super::with_causes(&e),
            "error sending request: client error (Connect): certificate verify failed"
        );
    }
}
