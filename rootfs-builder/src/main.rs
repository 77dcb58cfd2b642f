//! vmpod-rootfs-builder: deterministic guest initramfs (newc cpio) builder.

fn main() {
    eprintln!("vmpod-rootfs-builder: not built yet");
    std::process::exit(1);
}
