//! Process RPCs: exec, signal, wait.

use std::sync::Arc;

use vmpod_proto::agent::*;

use crate::container::config::UserConfig;
use crate::container::exec;
use crate::container::kill;
use crate::container::process::ExitInfo;
use crate::container::wait;
use crate::error::Result;
use crate::reaper::Exit;
use crate::state::Agent;

pub async fn exec(agent: &Arc<Agent>, req: ExecProcessRequest) -> Result<ExecProcessResponse> {
    let user = req.user.as_ref().map(|u| UserConfig {
        uid: u.uid,
        gid: u.gid,
        additional_gids: u.additional_gids.clone(),
        username: Some(u.username.clone()).filter(|n| !n.is_empty()),
    });
    let pid = exec::exec(
        agent,
        exec::ExecRequest {
            container_id: req.container_id,
            exec_id: req.exec_id,
            args: req.args,
            env: req.env,
            cwd: req.cwd,
            user,
            terminal: req.terminal,
            stdin: req.stdin,
        },
    )
    .await?;
    Ok(ExecProcessResponse {
        pid,
        ..Default::default()
    })
}

pub async fn signal(
    agent: &Arc<Agent>,
    req: SignalProcessRequest,
) -> Result<SignalProcessResponse> {
    kill::signal(agent, &req.container_id, &req.exec_id, req.signal, req.all)?;
    Ok(SignalProcessResponse::default())
}

pub fn wait_response(info: &ExitInfo, started_at: Option<i64>) -> WaitProcessResponse {
    WaitProcessResponse {
        exit_code: info.exit.code(),
        signal: match info.exit {
            Exit::Signal(s) => s,
            Exit::Code(_) => 0,
        },
        oom_killed: info.oom_killed,
        started_at_unix_nanos: started_at.unwrap_or(0),
        finished_at_unix_nanos: info.finished_at,
        ..Default::default()
    }
}

pub async fn wait(agent: &Arc<Agent>, req: WaitProcessRequest) -> Result<WaitProcessResponse> {
    let (info, started) = wait::wait(agent, &req.container_id, &req.exec_id).await?;
    Ok(wait_response(&info, started))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_mapping() {
        let r = wait_response(
            &ExitInfo {
                exit: Exit::Signal(9),
                finished_at: 20,
                oom_killed: true,
            },
            Some(10),
        );
        assert_eq!((r.exit_code, r.signal, r.oom_killed), (137, 9, true));
        assert_eq!(
            (r.started_at_unix_nanos, r.finished_at_unix_nanos),
            (10, 20)
        );
        let r = wait_response(
            &ExitInfo {
                exit: Exit::Code(3),
                finished_at: 1,
                oom_killed: false,
            },
            None,
        );
        assert_eq!((r.exit_code, r.signal), (3, 0));
    }
}
