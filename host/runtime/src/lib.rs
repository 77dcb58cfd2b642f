//! vmpod-runtime: everything between the CRI layer and the machines.
//!
//! No gRPC types live here. The sandbox manager (later) drives a
//! [`hypervisor::Hypervisor`] and an agent client.

pub mod agent_client;
pub mod hypervisor;
