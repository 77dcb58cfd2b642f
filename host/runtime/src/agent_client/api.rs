//! [`AgentApi`]: the agent operations the sandbox manager needs, as a
//! trait, and its implementation by the real [`AgentClient`].

use std::time::Duration;

use vmpod_proto::agent::*;

use super::{AgentClient, ExecSpec, ExitStatus, OutputStream, Result};

/// The agent operations the sandbox manager needs, as a seam: tests of the
/// layers above can put a fake behind it; [`AgentClient`] is the real one.
#[async_trait::async_trait]
pub trait AgentApi: Send + Sync {
    async fn check(&self) -> Result<()>;
    async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<()>;
    async fn destroy_sandbox(&self) -> Result<()>;
    async fn create_container(
        &self,
        id: &str,
        oci_spec_json: Vec<u8>,
        rootfs: &str,
        username: Option<&str>,
        stdin: bool,
    ) -> Result<u32>;
    async fn start_container(&self, id: &str) -> Result<()>;
    async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()>;
    async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitStatus>;
    async fn remove_container(&self, id: &str) -> Result<()>;
    async fn update_container(&self, id: &str, resources: LinuxResources) -> Result<()>;
    async fn stats(&self, id: &str) -> Result<StatsContainerResponse>;
    async fn exec(&self, id: &str, exec_id: &str, spec: &ExecSpec) -> Result<u32>;
    async fn exec_sync(
        &self,
        id: &str,
        exec_id: &str,
        spec: &ExecSpec,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Vec<u8>, ExitStatus)>;
    async fn read_chunk(
        &self,
        id: &str,
        exec_id: &str,
        stream: OutputStream,
        wait: Duration,
    ) -> Result<(Vec<u8>, bool)>;
    async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<()>;
    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()>;
    async fn resize_tty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()>;
}

#[async_trait::async_trait]
impl AgentApi for AgentClient {
    async fn check(&self) -> Result<()> {
        AgentClient::check(self).await
    }
    async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<()> {
        AgentClient::create_sandbox(self, req).await
    }
    async fn destroy_sandbox(&self) -> Result<()> {
        AgentClient::destroy_sandbox(self).await
    }
    async fn create_container(
        &self,
        id: &str,
        oci_spec_json: Vec<u8>,
        rootfs: &str,
        username: Option<&str>,
        stdin: bool,
    ) -> Result<u32> {
        AgentClient::create_container(self, id, oci_spec_json, rootfs, username, stdin).await
    }
    async fn start_container(&self, id: &str) -> Result<()> {
        AgentClient::start_container(self, id).await
    }
    async fn signal(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        AgentClient::signal(self, id, exec_id, signal, all).await
    }
    async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitStatus> {
        AgentClient::wait(self, id, exec_id).await
    }
    async fn remove_container(&self, id: &str) -> Result<()> {
        AgentClient::remove_container(self, id).await
    }
    async fn update_container(&self, id: &str, resources: LinuxResources) -> Result<()> {
        AgentClient::update_container(self, id, resources).await
    }
    async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        AgentClient::stats(self, id).await
    }
    async fn exec(&self, id: &str, exec_id: &str, spec: &ExecSpec) -> Result<u32> {
        AgentClient::exec(self, id, exec_id, spec).await
    }
    async fn exec_sync(
        &self,
        id: &str,
        exec_id: &str,
        spec: &ExecSpec,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Vec<u8>, ExitStatus)> {
        AgentClient::exec_sync(self, id, exec_id, spec, timeout).await
    }
    async fn read_chunk(
        &self,
        id: &str,
        exec_id: &str,
        stream: OutputStream,
        wait: Duration,
    ) -> Result<(Vec<u8>, bool)> {
        AgentClient::read_chunk(self, id, exec_id, stream, wait).await
    }
    async fn write_stdin(&self, id: &str, exec_id: &str, data: &[u8]) -> Result<()> {
        AgentClient::write_stdin(self, id, exec_id, data).await
    }
    async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        AgentClient::close_stdin(self, id, exec_id).await
    }
    async fn resize_tty(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> Result<()> {
        AgentClient::resize_tty(self, id, exec_id, rows, cols).await
    }
}
