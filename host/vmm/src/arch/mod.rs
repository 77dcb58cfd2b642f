//! x86_64 boot set-up: memory layout, CPUID, registers, zero page, MP table.

pub mod bootparams;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
