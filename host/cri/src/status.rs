//! Errors → gRPC status codes. One place, so every RPC answers alike.
//!
//! | `ImageError`        | gRPC code          | why |
//! | ------------------- | ------------------ | --- |
//! | `InvalidReference`  | `InvalidArgument`  | the caller sent a bad name |
//! | `NotFound`          | `NotFound`         | no such image / tag in the registry or store |
//! | `Unauthorized`      | `Unauthenticated`  | registry refused (missing or wrong) credentials |
//! | `DigestMismatch`    | `DataLoss`         | content does not match its digest; nothing stored |
//! | `InUse`             | `FailedPrecondition` | remove the users first |
//! | `Unsupported`       | `FailedPrecondition` | the image is malformed or uses what we don't support; retrying won't help |
//! | `Registry`          | `Unavailable`      | registry unreachable or answered with an error; retryable |
//! | `Store`             | `Internal`         | our disk/metadata failed |
//! | `Unimplemented`     | `Unimplemented`    | |
//!
//! containerd answers most pull failures with `Unknown`; kubelet only looks
//! at the message (it reports `ErrImagePull` either way), so precise codes
//! cost nothing and help `crictl` users and tests.

use tonic::{Code, Status};
use vmpod_images::ImageError;

/// Map an image-store error to a gRPC status; the message keeps the context.
pub fn image_error(e: ImageError) -> Status {
    let code = match &e {
        ImageError::InvalidReference { .. } => Code::InvalidArgument,
        ImageError::NotFound { .. } => Code::NotFound,
        ImageError::Unauthorized { .. } => Code::Unauthenticated,
        ImageError::DigestMismatch { .. } => Code::DataLoss,
        ImageError::InUse(_) => Code::FailedPrecondition,
        ImageError::Unsupported { .. } => Code::FailedPrecondition,
        ImageError::Registry { .. } => Code::Unavailable,
        ImageError::Store { .. } => Code::Internal,
        ImageError::Unimplemented(_) => Code::Unimplemented,
    };
    Status::new(code, e.to_string())
}

/// An RPC this build does not provide yet.
pub fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not implemented by vmpod yet (pod sandboxes and containers are not built; \
         the image service works)"
    ))
}

/// A required request field was empty.
pub fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} must be set"))
}

/// A blocking task panicked or was cancelled.
pub fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("internal task failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let cases = [
            (
                ImageError::InvalidReference {
                    reference: "A".into(),
                    reason: "upper".into(),
                },
                Code::InvalidArgument,
            ),
            (
                ImageError::NotFound {
                    reference: "x".into(),
                    detail: String::new(),
                },
                Code::NotFound,
            ),
            (
                ImageError::Unauthorized {
                    reference: "x".into(),
                    reason: "401".into(),
                },
                Code::Unauthenticated,
            ),
            (
                ImageError::DigestMismatch {
                    what: "layer".into(),
                    expected: "a".into(),
                    actual: "b".into(),
                },
                Code::DataLoss,
            ),
            (ImageError::InUse("x".into()), Code::FailedPrecondition),
            (
                ImageError::Unsupported {
                    reference: "x".into(),
                    reason: "layer media type".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                ImageError::Registry {
                    reference: "x".into(),
                    reason: "503".into(),
                },
                Code::Unavailable,
            ),
            (
                ImageError::Store {
                    op: "put".into(),
                    reason: "disk".into(),
                },
                Code::Internal,
            ),
            (ImageError::Unimplemented("pull"), Code::Unimplemented),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = image_error(e);
            assert_eq!(s.code(), code, "{msg}");
            assert_eq!(s.message(), msg);
        }
    }

    #[test]
    fn unimplemented_names_the_rpc() {
        let s = unimplemented("RunPodSandbox");
        assert_eq!(s.code(), Code::Unimplemented);
        assert!(s.message().starts_with("RunPodSandbox "));
    }
}
