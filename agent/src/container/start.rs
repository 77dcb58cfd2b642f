//! Start: release the staged init into exec.

use std::sync::Arc;

use super::Status;
use crate::error::{AgentError, Result};
use crate::state::Agent;

pub async fn start(agent: &Arc<Agent>, id: &str) -> Result<()> {
    let c = agent.get(id)?;
    if c.status() != Status::Created {
        return Err(AgentError::FailedPrecondition(format!(
            "container {id:?} is {}, not created",
            c.status().as_str()
        )));
    }
    let what = format!("container {id:?}");
    let init = c.init.clone();
    tokio::task::spawn_blocking(move || init.start(&what))
        .await
        .map_err(|e| AgentError::internal("start task", e))??;
    tracing::info!(container = %id, "container started");
    Ok(())
}
