//! The agent's error type; each variant maps onto one ttrpc status code.

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    DeadlineExceeded(String),
}

pub type Result<T> = std::result::Result<T, AgentError>;

impl AgentError {
    pub fn internal(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        AgentError::Internal(format!("{what}: {e}"))
    }

    pub fn code(&self) -> ttrpc::Code {
        match self {
            AgentError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            AgentError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            AgentError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            AgentError::Internal(_) => ttrpc::Code::INTERNAL,
            AgentError::DeadlineExceeded(_) => ttrpc::Code::DEADLINE_EXCEEDED,
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_to_ttrpc_status() {
        let e: ttrpc::Error = AgentError::NotFound("container \"x\" not found".into()).into();
        match e {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::NOT_FOUND);
                assert_eq!(s.message(), "container \"x\" not found");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            AgentError::InvalidArgument(String::new()).code(),
            ttrpc::Code::INVALID_ARGUMENT
        );
    }
}
