//! vmpod-rootfs-builder: the guest initramfs.
//!
//! The product initramfs holds the agent as `/init`, `/dev/console` and the
//! mount points the agent uses, nothing else. `--debug` adds busybox;
//! `--busybox-container NAME` adds a busybox container rootfs under
//! `/containers/NAME` (for end-to-end tests). Output is a deterministic
//! newc cpio, gzip-compressed (or plain).

pub mod cpio;
pub mod image;
