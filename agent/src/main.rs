//! vmpod-agent: the guest agent (PID 1 in the pod microVM).

fn main() {
    eprintln!("vmpod-agent: not built yet");
    std::process::exit(1);
}
