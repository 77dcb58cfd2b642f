//! vmpod-cri: the CRI v1 gRPC services and the daemon around them.
//!
//! Thin by design: handlers convert CRI messages (`convert`), call into
//! `vmpod-images` / `vmpod-runtime`, and map errors (`status`).

pub mod cni;
pub mod config;
pub mod convert;
pub mod daemon;
pub mod image_service;
pub mod runtime_service;
pub mod status;
pub mod uds_authority;
