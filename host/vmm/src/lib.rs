//! vmpod-vmm: the built-in KVM VMM (library + `vmpod vm run --hypervisor builtin`).
